"""Seeded, resumable CPU training of the generator and the classifier, and export to shipped weights."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dng.errors import ConfigError
from dng.io import write_atomic
from dng.vision import data, models

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"


# ---- checkpoints: one safetensors file whose metadata carries the scalars, so a single os.replace is atomic


def _flatten_optimizer(state: dict) -> dict[str, torch.Tensor]:
    return {f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(run: Path, modules: dict, optimizer, rng: torch.Generator, scalars: dict) -> None:
    """Write modules, optimizer, RNG state and scalars to run/checkpoint.safetensors atomically."""
    from safetensors.torch import save

    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    tensors.update(_flatten_optimizer(opt))
    tensors["rng"] = rng.get_state()
    meta = {"scalars": json.dumps(scalars), "param_groups": json.dumps(opt["param_groups"])}
    write_atomic(run / CHECKPOINT, save(tensors, metadata=meta))


def load_checkpoint(run: Path, modules: dict, optimizer, rng: torch.Generator) -> dict:
    """Restore modules, optimizer and RNG from run/checkpoint.safetensors; return its scalars."""
    from safetensors import safe_open

    with safe_open(str(run / CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_unflatten_optimizer(optim, json.loads(meta["param_groups"])))
    rng.set_state(tensors["rng"])
    return json.loads(meta["scalars"])


def read_scalars(run: Path) -> dict:
    """The scalars (step, hyperparameters, commands) of a run's checkpoint, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(Path(run) / CHECKPOINT), framework="pt") as f:
        return json.loads(f.metadata()["scalars"])


def read_checkpoint(run: Path, module: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict of one module (e.g. 'ema') and the scalars of a run's checkpoint."""
    from safetensors import safe_open

    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: train first with `dng train ... --out {run}`")
    with safe_open(str(path), framework="pt") as f:
        prefix = module + "."
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        scalars = json.loads(f.metadata()["scalars"])
    return state, scalars


# ---- shared loop pieces


class _Log:
    """Appends rows to run/log.csv, dropping rows newer than the checkpoint a run resumes from."""

    def __init__(self, run: Path, fields: list[str], resume_step: int):
        self.path = run / LOG
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
        self.fields = fields

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of batch `step`: a fresh permutation per epoch, a function of (seed, epoch) so resumes agree."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts up to `shift` pixels (background padded)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=gen)).unbind(0)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def _command() -> str:
    return shlex.join(["dng", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("dng", "cli.py") else shlex.join(sys.argv)


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


GENERATOR_DEFAULTS = {"batch_size": 128, "lr": 5e-4, "seed": 0, "ema_decay": 0.999, "label_dropout": 0.15,
                      "warmup_steps": 100}
CLASSIFIER_DEFAULTS = {"batch_size": 128, "lr": 2e-3, "seed": 0}


def _resolve(run: Path, given: dict, defaults: dict) -> dict:
    """Hyperparameters in effect: given values win; otherwise a resumed run keeps its own, a new run the defaults.

    Falling back to the defaults on resume would silently change a run started with other values.
    """
    saved = read_scalars(run) if (run / CHECKPOINT).exists() else {}
    return {k: given[k] if given.get(k) is not None else saved.get(k, defaults[k]) for k in given}


def _start(run, threads: int | None, resume: bool) -> Path:
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    if not resume and (run / CHECKPOINT).exists():
        raise ConfigError(f"{run} already holds a checkpoint: resume (the default) or choose another --out")
    return run


def _lr(step: int, base: float, warmup: int, total: int | None) -> float:
    """Linear warmup, then cosine decay to 10 % when the total is known, else constant."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not total:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


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
    epochs: int = 8,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    resume: bool = True,
    threads: int | None = None,
    checkpoint_minutes: float = 2.0,
    data_root=None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Train the classifier with flips and shifts; returns the run's scalars (test accuracy included).

    Hyperparameters left as None take the resumed run's values, or CLASSIFIER_DEFAULTS for a new run.
    """
    run = _start(out, threads, resume)
    given = dict(batch_size=batch_size, lr=lr, seed=seed)
    hyper = _resolve(run, given, CLASSIFIER_DEFAULTS)
    batch_size, lr, seed = (hyper[k] for k in given)
    x, y = data.load_tensors("train", data_root)
    xt, yt = data.load_tensors("test", data_root)
    if limit:
        x, y, xt, yt = x[:limit], y[:limit], xt[:limit], yt[:limit]
    torch.manual_seed(seed)
    model = models.make_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    rng = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the {len(x)} training images")
    total = epochs * per_epoch
    scalars = {
        "step": 0,
        "seconds": 0.0,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "config": models.CLASSIFIER_CONFIG,
        "commands": [],
    }
    if (run / CHECKPOINT).exists():
        scalars = load_checkpoint(run, {"model": model}, optimizer, rng)
    scalars.update(hyper)
    scalars["commands"].append(_command())
    # The step each command started from, so the card can say how to replay a run whose settings changed.
    scalars.setdefault("started_at", []).append(scalars["step"])
    scalars.update(epochs=epochs, data=str(data.data_dir() if data_root is None else data_root))
    log = _Log(run, ["step", "epoch", "loss", "lr", "test_accuracy", "seconds"], scalars["step"])
    step, started, last_save = scalars["step"], time.monotonic() - scalars["seconds"], time.monotonic()
    bar = tqdm(total=total, initial=step, desc="classifier", disable=not progress, dynamic_ncols=True)
    running = []
    with _sigterm_as_interrupt():
        try:
            while step < total:
                model.train()
                idx = _batch_indices(len(x), batch_size, seed, step)
                rate = _lr(step, lr, per_epoch // 4, total)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                loss = F.cross_entropy(model(_augment(x[idx], rng)), y[idx], label_smoothing=0.05)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                running.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % per_epoch == 0:
                    scalars["test_accuracy"] = evaluate_classifier(model, xt, yt)
                    scalars["seconds"] = time.monotonic() - started
                    log.write(
                        step=step,
                        epoch=step // per_epoch,
                        loss=sum(running) / len(running),
                        lr=rate,
                        test_accuracy=scalars["test_accuracy"],
                        seconds=round(scalars["seconds"], 1),
                    )
                    bar.write(f"epoch {step // per_epoch}: test accuracy {scalars['test_accuracy']:.4f}")
                    running = []
                if step % per_epoch == 0 or time.monotonic() - last_save > 60 * checkpoint_minutes or step == total:
                    scalars.update(step=step, seconds=time.monotonic() - started)
                    save_checkpoint(run, {"model": model}, optimizer, rng, scalars)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            scalars.update(step=step, seconds=time.monotonic() - started)
            save_checkpoint(run, {"model": model}, optimizer, rng, scalars)
            raise
        finally:
            bar.close()
    if "test_accuracy" not in scalars:
        scalars["test_accuracy"] = evaluate_classifier(model, xt, yt)
    return scalars


# ---- generator


def make_scheduler():
    """The DDPM training schedule: 1000 steps, linear betas (diffusers defaults)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


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
    scheduler = make_scheduler()
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
) -> dict:
    """DDPM epsilon training with label dropout and EMA until `minutes` of wall time or `steps` (totals).

    Hyperparameters left as None take the resumed run's values, or GENERATOR_DEFAULTS for a new run. `init`, a
    generator file written by `export` (the shipped weights, say), starts a new run from those weights (model and
    EMA, with a fresh optimizer): runs/ does not outlive a machine, the shipped weights do.
    """
    if not minutes and not steps:
        raise ConfigError("give --minutes or --steps (totals over all resumes of the run)")
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
    hyper = _resolve(run, given, {**GENERATOR_DEFAULTS, "config": models.GENERATOR_CONFIG})
    batch_size, lr, seed, ema_decay, label_dropout, warmup_steps, config = (hyper[k] for k in given)
    x, y = data.load_tensors("train", data_root)
    if limit:
        x, y = x[:limit], y[:limit]
    if len(x) < batch_size:
        raise ConfigError(f"batch size {batch_size} is larger than the {len(x)} training images")
    torch.manual_seed(seed)
    model = models.make_generator(config)
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = models.make_generator(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = make_scheduler()
    rng = torch.Generator().manual_seed(seed)
    scalars = {
        "step": 0,
        "seconds": 0.0,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "label_dropout": label_dropout,
        "warmup_steps": warmup_steps,
        "config": config,
        "commands": [],
    }
    if init is not None:
        # The init file's own card travels with the run: the file it names may be overwritten by this run's export.
        scalars["init"] = {"path": str(init), "sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest(),
                           "card": init_card or None}
    if (run / CHECKPOINT).exists():
        scalars = load_checkpoint(run, {"model": model, "ema": ema}, optimizer, rng)
    scalars.update(hyper)
    scalars["commands"].append(_command())
    # The step each command started from, so the card can say how to replay a run whose settings changed.
    scalars.setdefault("started_at", []).append(scalars["step"])
    scalars["data"] = str(data.data_dir() if data_root is None else data_root)
    log = _Log(run, ["step", "epoch", "loss", "lr", "seconds"], scalars["step"])
    step, started, last_save = scalars["step"], time.monotonic() - scalars["seconds"], time.monotonic()
    budget = 60 * minutes if minutes else math.inf
    bar = tqdm(total=steps, initial=step, desc="generator", disable=not progress, dynamic_ncols=True)
    running = []

    def checkpoint():
        scalars.update(step=step, seconds=time.monotonic() - started, epochs=step * batch_size / len(x))
        save_checkpoint(run, {"model": model, "ema": ema}, optimizer, rng, scalars)

    model.train()
    with _sigterm_as_interrupt():
        try:
            while (steps is None or step < steps) and time.monotonic() - started < budget:
                idx = _batch_indices(len(x), batch_size, seed, step)
                labels = torch.where(torch.rand(batch_size, generator=rng) < label_dropout, models.NULL_LABEL, y[idx])
                rate = _lr(step, lr, warmup_steps, None)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                loss = denoising_loss(model, scheduler, x[idx], labels, rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                # Warm-up of the EMA so early checkpoints are not dominated by the random init.
                decay = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                        p_ema.lerp_(p, 1 - decay)
                running.append(loss.item())
                bar.update(1)
                if step % log_every == 0:
                    mean = sum(running) / len(running)
                    bar.set_postfix(loss=f"{mean:.4f}")
                    log.write(
                        step=step,
                        epoch=round(step * batch_size / len(x), 3),
                        loss=round(mean, 5),
                        lr=rate,
                        seconds=round(time.monotonic() - started, 1),
                    )
                    running = []
                if time.monotonic() - last_save > 60 * checkpoint_minutes:
                    checkpoint()
                    last_save = time.monotonic()
            checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise
        finally:
            bar.close()
    return scalars


# ---- export


def export(
    run, kind: str, weights_dir=None, data_root=None, half: bool | None = None, metrics: dict | None = None
) -> Path:
    """Write a run's final weights (the EMA for the generator) and model card to the shipped weights.

    `metrics` adds figures measured elsewhere (e.g. class-conditional sample accuracy) to the card.
    """
    if kind not in models.KINDS:
        raise ConfigError(f"unknown model kind {kind!r}: use one of {', '.join(models.KINDS)}")
    run = Path(run)
    weights_dir = Path(weights_dir) if weights_dir else models.WEIGHTS_DIR
    state, scalars = read_checkpoint(run, "ema" if kind == "generator" else "model")
    xt, yt = data.load_tensors("test", data_root)
    if kind == "generator":
        config = scalars["config"]
        model = models.make_generator(config)

        def score(m):
            return evaluate_generator(m, xt[:2000], yt[:2000])

        metric = "test_denoising_loss"
    else:
        config = scalars.get("config", models.CLASSIFIER_CONFIG)
        model = models.make_classifier(config)

        def score(m):
            return evaluate_classifier(m, xt, yt)

        metric = "test_accuracy"
    model.load_state_dict(state)
    full = score(model)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})
    halved = score(model)
    if half is None:
        # fp16 is kept when it moves the metric by under 0.2 % (relative).
        half = abs(halved - full) <= 0.002 * abs(full)
    model.load_state_dict(state)
    card = {
        "kind": kind,
        "commands": scalars["commands"],
        "started_at": scalars.get("started_at"),
        "seed": scalars["seed"],
        "data": f"Fashion-MNIST train split ({scalars.get('data', data.DEFAULT_DATA_DIR)})",
        "wall_time_minutes": round(scalars["seconds"] / 60, 1),
        "steps": scalars["step"],
        "init": scalars.get("init"),
        "batch_size": scalars["batch_size"],
        "dtype": "float16" if half else "float32",
        "metrics": {metric: round(halved if half else full, 5), f"{metric}_float32": round(full, 5), **(metrics or {})},
        "hyperparameters": {
            k: scalars[k] for k in ("lr", "ema_decay", "label_dropout", "warmup_steps", "epochs") if k in scalars
        },
    }
    path = weights_dir / f"{kind}.safetensors"
    models.save_model(model, path, kind, config, card, half=half)
    _write_card(weights_dir / f"{kind}.md", card)
    return path


def _commands(card: dict) -> tuple[str, str]:
    """A card's commands, each with its step range where known, and how to replay them."""
    starts = card.get("started_at")
    if starts and len(starts) == len(card["commands"]):
        ends = [*starts[1:], card["steps"]]
        commands = "\n".join(f"# steps {a}-{b}\n{c}" for a, b, c in zip(starts, ends, card["commands"], strict=True))
        replay = ("Each `--minutes` budget stopped at a machine-dependent step: to replay the run, give each command\n"
                  "`--steps` with the last step of its range in place of `--minutes`")
    else:
        commands = "\n".join(card["commands"])
        replay = ("A `--minutes` budget stops at a machine-dependent step: the same weights come back from the first "
                  f"command with\n`--steps {card['steps']}` in its place")
    return commands, replay


def _ancestors(card: dict) -> list[dict]:
    """Cards of the weights a run started from (`--init`), nearest first, as far back as they were recorded."""
    found = []
    while (card.get("init") or {}).get("card"):
        card = card["init"]["card"]
        found.append(card)
    return found


def _bullets(values: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in values.items())


def _write_card(path: Path, card: dict) -> None:
    metrics, hyper = _bullets(card["metrics"]), _bullets(card["hyperparameters"])
    commands, replay = _commands(card)
    init, earlier = card.get("init"), _ancestors(card)
    origin = ""
    if init:
        told = "its training is under \"Earlier training\"" if earlier else "whose own card tells how it was trained"
        origin = (f"- started from: {init['path']} (sha256 {init['sha256'][:16]}...), {told}; the steps below come "
                  "on top\n")
    history = ""
    if earlier:
        total_steps = card["steps"] + sum(c["steps"] for c in earlier)
        total_minutes = card["wall_time_minutes"] + sum(c["wall_time_minutes"] for c in earlier)
        origin += f"- in all, with earlier training: {total_steps} steps, {round(total_minutes, 1)} minutes\n"
        parts = []
        for c in earlier:
            cmds, how = _commands(c)
            dropout = c.get("hyperparameters", {}).get("label_dropout")
            parts.append(f"{c['steps']} steps (batch {c['batch_size']}, seed {c['seed']}), {c['wall_time_minutes']} "
                         f"minutes, label dropout {dropout} at the end; its metrics:\n\n"
                         + _bullets(c["metrics"])
                         + f"\n\n```\n{cmds}\n```\n\n{how}.\n")
        history = "\n## Earlier training (nearest first)\n\n" + "\n".join(parts)
    text = f"""# Fashion-MNIST {card["kind"]}

Trained on CPU by `dng train {card["kind"]}`; weights exported with `dng train export`.

{origin}- data: {card["data"]}
- seed: {card["seed"]}
- steps: {card["steps"]} (batch {card["batch_size"]})
- wall time: {card["wall_time_minutes"]} minutes
- stored as: {card["dtype"]}

## Metrics (Fashion-MNIST test split)

{metrics}

## Hyperparameters (as of the last command)

{hyper}

## Commands (the first started the run, the others resumed it)

```
{commands}
```

{replay} (thread counts may change float rounding).
{history}"""
    write_atomic(path, text)
