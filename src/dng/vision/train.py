"""Seeded, resumable CPU training of the generator and the classifier: one loop, the per-model parts passed in."""

from __future__ import annotations

import hashlib
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dng.defaults import CLASSIFIER_EPOCHS, TRAIN_CLASSIFIER, TRAIN_GENERATOR
from dng.errors import ConfigError
from dng.vision import data, models
from dng.vision.batches import augment, batch_indices
from dng.vision.checkpoint import CHECKPOINT, RunLog, load_checkpoint, read_scalars, save_checkpoint

# ---- checks and set-up, before any data is read


def _check(option: str, value, low: float, high: float = math.inf, integer: bool = False, above: bool = False):
    """ConfigError naming `option` unless `value` is None or a finite number from `low` (excluded if `above`)
    to `high`."""
    if value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if above else value >= low) and value <= high)
    if not ok:
        want = f"{'an integer' if integer else 'a finite number'} {'above' if above else 'of at least'} {low:g}"
        raise ConfigError(f"{option} {value!r}: give {want}" + (f" and at most {high:g}" if high < math.inf else ""))


def _check_common(batch_size, lr, threads, checkpoint_minutes) -> None:
    _check("--batch-size", batch_size, 1, integer=True)
    _check("--lr", lr, 0)
    _check("--threads", threads, 1, integer=True)
    _check("--checkpoint-minutes", checkpoint_minutes, 0)


def _python_call(function: str, **arguments) -> str:
    """How a run started from Python is recorded among its commands: the call with the arguments it was given."""
    given = (f"{k}={str(v)!r}" if isinstance(v, Path) else f"{k}={v!r}" for k, v in arguments.items() if v is not None)
    return f"dng.vision.train.{function}({', '.join(given)})"


def _resolve(run: Path, given: dict, defaults: dict) -> dict:
    """Hyperparameters in effect: given values win; otherwise a resumed run keeps its own, a new run the defaults.

    Falling back to the defaults on resume would silently change a run started with other values.
    """
    saved = read_scalars(run) if (run / CHECKPOINT).exists() else {}
    return {k: given[k] if given.get(k) is not None else saved.get(k, defaults[k]) for k in given}


def _start(run, threads: int | None, resume: bool) -> Path:
    run = Path(run)
    if not resume and (run / CHECKPOINT).exists():
        raise ConfigError(f"{run} already holds a checkpoint: resume (the default) or choose another --out")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run} is a file: give a directory for the run")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {run} cannot be created ({err.strerror}): give a writable directory") from None
    if threads:
        torch.set_num_threads(threads)
    return run


def _open(run: Path, modules: dict, optimizer, rng: torch.Generator, hyper: dict, command: str) -> dict:
    """The run's scalars: a new run's, or the checkpoint's it resumes (restoring modules, optimizer and RNG)."""
    scalars = {"step": 0, "seconds": 0.0, "commands": []}
    if (run / CHECKPOINT).exists():
        scalars = load_checkpoint(run, modules, optimizer, rng)
    scalars.update(hyper)
    scalars["commands"].append(command)
    # The step each command started from, so the card can say how to replay a run whose settings changed.
    scalars.setdefault("started_at", []).append(scalars["step"])
    return scalars


# ---- the shared loop


def _lr(step: int, base: float, warmup: int, total: int | None) -> float:
    """Linear warmup, then cosine decay to 10 % when the total is known, else constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not total:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while training, so a stopped background run checkpoints first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Trainee:
    """What differs between the models' training; `_train` is the loop they share."""

    name: str  # of the progress bar
    modules: dict  # checkpointed under these names
    optimizer: torch.optim.Optimizer
    step: Callable[[int], tuple[float, float]]  # takes optimizer step number `step`: (loss, learning rate)
    log_fields: list[str]
    log_every: int
    report: Callable[[int, float, float, float], dict]  # (step, mean loss, lr, seconds) -> the log row
    checkpoint_at_report: bool = False
    progress_scalars: Callable[[int], dict] = lambda step: {}  # kept current in the checkpoint


def _train(run: Path, trainee: Trainee, rng: torch.Generator, scalars: dict, total: int | None,
           minutes: float | None, checkpoint_minutes: float, progress: bool) -> dict:
    """Steps until `total` steps or `minutes` of wall time (both over all resumes), checkpointing on a timer, at
    the end and on an interrupt."""
    log = RunLog(run, trainee.log_fields, scalars["step"])
    step, started, last_save = scalars["step"], time.monotonic() - scalars["seconds"], time.monotonic()
    budget = 60 * minutes if minutes else math.inf
    bar = tqdm(total=total, initial=step, desc=trainee.name, disable=not progress, dynamic_ncols=True)
    running = []

    def checkpoint():
        scalars.update(step=step, seconds=time.monotonic() - started, **trainee.progress_scalars(step))
        save_checkpoint(run, trainee.modules, trainee.optimizer, rng, scalars)

    with _sigterm_as_interrupt():
        try:
            while (total is None or step < total) and time.monotonic() - started < budget:
                loss, rate = trainee.step(step)
                step += 1
                running.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(running) / len(running):.4f}")
                reported = step % trainee.log_every == 0
                if reported:
                    log.write(**trainee.report(step, sum(running) / len(running), rate, time.monotonic() - started))
                    running = []
                due = time.monotonic() - last_save > 60 * checkpoint_minutes
                if due or (reported and trainee.checkpoint_at_report):
                    checkpoint()
                    last_save = time.monotonic()
            checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise
        finally:
            bar.close()
    return scalars


# ---- classifier


@torch.no_grad()
def evaluate_classifier(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Accuracy of `model` on images [N, 1, 28, 28] in [-1, 1]."""
    model.eval()
    correct = sum(
        (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def train_classifier(
    out,
    epochs: int = CLASSIFIER_EPOCHS,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    resume: bool = True,
    threads: int | None = None,
    checkpoint_minutes: float = 2.0,
    data_root=None,
    limit: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train the classifier with flips and shifts; returns the run's scalars (test accuracy included).

    Hyperparameters left as None take the resumed run's values, or `dng.defaults.TRAIN_CLASSIFIER` for a new run.
    `command` is recorded on the model card (the `dng` command line; by default this call).
    """
    _check("--epochs", epochs, 1, integer=True)
    _check_common(batch_size, lr, threads, checkpoint_minutes)
    _check("limit", limit, 1, integer=True)
    command = command or _python_call("train_classifier", out=out, epochs=epochs, batch_size=batch_size, lr=lr,
                                      seed=seed, threads=threads, data_root=data_root, limit=limit)
    run = _start(out, threads, resume)
    given = dict(batch_size=batch_size, lr=lr, seed=seed)
    hyper = _resolve(run, given, TRAIN_CLASSIFIER)
    batch_size, lr, seed = (hyper[k] for k in given)
    x, y = data.load_tensors("train", data_root)
    xt, yt = data.load_tensors("test", data_root)
    if limit:
        x, y, xt, yt = x[:limit], y[:limit], xt[:limit], yt[:limit]
    per_epoch = len(x) // batch_size
    if per_epoch == 0:
        raise ConfigError(f"--batch-size {batch_size} is larger than the {len(x)} training images")
    torch.manual_seed(seed)
    model = models.make_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    rng = torch.Generator().manual_seed(seed)
    data_dir = str(data.data_dir() if data_root is None else data_root)
    hyper.update(config=models.CLASSIFIER_CONFIG, epochs=epochs, data=data_dir)
    scalars = _open(run, {"model": model}, optimizer, rng, hyper, command)
    total = epochs * per_epoch

    def step(i: int) -> tuple[float, float]:
        model.train()
        idx = batch_indices(len(x), batch_size, seed, i)
        rate = _lr(i, lr, per_epoch // 4, total)
        _set_lr(optimizer, rate)
        loss = F.cross_entropy(model(augment(x[idx], rng)), y[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), rate

    def report(i: int, loss: float, rate: float, seconds: float) -> dict:
        scalars["test_accuracy"] = evaluate_classifier(model, xt, yt)
        tqdm.write(f"epoch {i // per_epoch}: test accuracy {scalars['test_accuracy']:.4f}")
        return dict(step=i, epoch=i // per_epoch, loss=loss, lr=rate, test_accuracy=scalars["test_accuracy"],
                    seconds=round(seconds, 1))

    trainee = Trainee("classifier", {"model": model}, optimizer, step,
                      ["step", "epoch", "loss", "lr", "test_accuracy", "seconds"], per_epoch, report,
                      checkpoint_at_report=True)
    scalars = _train(run, trainee, rng, scalars, total, None, checkpoint_minutes, progress)
    if "test_accuracy" not in scalars:
        scalars["test_accuracy"] = evaluate_classifier(model, xt, yt)
    return scalars


# ---- generator


def denoising_loss(model, scheduler, x0, labels, gen: torch.Generator) -> torch.Tensor:
    """Epsilon-MSE at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
    return F.mse_loss(pred, noise)


@torch.no_grad()
def evaluate_generator(model, images, labels, seed: int = 0, batch_size: int = 500) -> float:
    """Mean denoising loss on fixed noise and timesteps: comparable across checkpoints and precisions."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    scheduler = models.training_scheduler()
    losses = [
        denoising_loss(model, scheduler, images[i : i + batch_size], labels[i : i + batch_size], gen).item()
        for i in range(0, len(images), batch_size)
    ]
    return sum(losses) / len(losses)


def train_generator(
    out,
    minutes: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    ema_decay: float | None = None,
    label_dropout: float | None = None,
    warmup_steps: int | None = None,
    resume: bool = True,
    threads: int | None = None,
    checkpoint_minutes: float = 5.0,
    log_every: int = 50,
    data_root=None,
    limit: int | None = None,
    config: dict | None = None,
    progress: bool = True,
    init=None,
    command: str | None = None,
) -> dict:
    """DDPM epsilon training with label dropout and EMA until `minutes` of wall time or `steps` (totals).

    Hyperparameters left as None take the resumed run's values, or `dng.defaults.TRAIN_GENERATOR` for a new run.
    `init`, a generator file written by `export` (the shipped weights, say), starts a new run from those weights
    (model and EMA, with a fresh optimizer): runs/ does not outlive a machine, the shipped weights do. `command` is
    recorded on the model card (the `dng` command line; by default this call).
    """
    _check("--minutes", minutes, 0, above=True)
    _check("--steps", steps, 1, integer=True)
    _check_common(batch_size, lr, threads, checkpoint_minutes)
    _check("--ema-decay", ema_decay, 0, 1)
    _check("--label-dropout", label_dropout, 0, 1)
    _check("--warmup-steps", warmup_steps, 0, integer=True)
    _check("log_every", log_every, 1, integer=True)
    _check("limit", limit, 1, integer=True)
    if minutes is None and steps is None:
        raise ConfigError("give --minutes or --steps (totals over all resumes of the run)")
    command = command or _python_call(
        "train_generator", out=out, minutes=minutes, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        ema_decay=ema_decay, label_dropout=label_dropout, warmup_steps=warmup_steps, threads=threads,
        data_root=data_root, limit=limit, config=config, init=init)
    run = _start(out, threads, resume)
    init_state = init_card = None
    if init is not None:
        if (run / CHECKPOINT).exists():
            raise ConfigError(f"{run} already holds a checkpoint: --init starts a new run, so resume without it "
                              f"or choose another --out")
        init_state, init_config, init_card = models.read_model_file(init, "generator")
        if config is not None and config != init_config:
            raise ConfigError(f"{init} was trained with another architecture than the one given: drop the config")
        config = init_config
    given = dict(batch_size=batch_size, lr=lr, seed=seed, ema_decay=ema_decay, label_dropout=label_dropout,
                 warmup_steps=warmup_steps, config=config)
    hyper = _resolve(run, given, {**TRAIN_GENERATOR, "config": models.GENERATOR_CONFIG})
    batch_size, lr, seed, ema_decay, label_dropout, warmup_steps, config = (hyper[k] for k in given)
    x, y = data.load_tensors("train", data_root)
    if limit:
        x, y = x[:limit], y[:limit]
    if len(x) < batch_size:
        raise ConfigError(f"--batch-size {batch_size} is larger than the {len(x)} training images")
    torch.manual_seed(seed)
    model = models.make_generator(config)
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = models.make_generator(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = models.training_scheduler()
    rng = torch.Generator().manual_seed(seed)
    hyper["data"] = str(data.data_dir() if data_root is None else data_root)
    modules = {"model": model, "ema": ema}
    scalars = _open(run, modules, optimizer, rng, hyper, command)
    if init is not None:
        # The init file's own card travels with the run: the file it names may be overwritten by this run's export.
        scalars["init"] = {"path": str(init), "sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest(),
                           "card": init_card or None}

    def step(i: int) -> tuple[float, float]:
        idx = batch_indices(len(x), batch_size, seed, i)
        labels = torch.where(torch.rand(batch_size, generator=rng) < label_dropout, models.NULL_LABEL, y[idx])
        rate = _lr(i, lr, warmup_steps, None)
        _set_lr(optimizer, rate)
        loss = denoising_loss(model, scheduler, x[idx], labels, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # Warm-up of the EMA so early checkpoints are not dominated by the random init.
        decay = min(ema_decay, (2 + i) / (11 + i))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        return loss.item(), rate

    def report(i: int, loss: float, rate: float, seconds: float) -> dict:
        return dict(step=i, epoch=round(i * batch_size / len(x), 3), loss=round(loss, 5), lr=rate,
                    seconds=round(seconds, 1))

    model.train()
    trainee = Trainee("generator", modules, optimizer, step, ["step", "epoch", "loss", "lr", "seconds"], log_every,
                      report, progress_scalars=lambda i: {"epochs": i * batch_size / len(x)})
    return _train(run, trainee, rng, scalars, steps, minutes, checkpoint_minutes, progress)
