"""Export a training run's weights and model card to a weights folder, keeping whatever they replace."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dng.errors import ConfigError
from dng.io import write_atomic
from dng.vision import data, models
from dng.vision.checkpoint import read_checkpoint, run_kind
from dng.vision.train import evaluate_classifier, evaluate_generator


@dataclass
class Exported:
    """What an export wrote, and where it kept the files it replaced or retired."""

    weights: Path
    card: Path
    backups: list[Path] = field(default_factory=list)  # of the replaced weights and card
    stale_calibration: Path | None = None  # where the calibration fitted to other weights went


def backup_path(path: Path, stamp: str) -> Path:
    """`<name>.<stamp>.bak` beside `path`, numbered when that name is taken, so no backup overwrites another."""
    candidate, n = path.with_name(f"{path.name}.{stamp}.bak"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{stamp}-{n}.bak")
    return candidate


def export(
    run, kind: str, weights_dir=None, data_root=None, half: bool | None = None, metrics: dict | None = None,
    force: bool = False,
) -> Exported:
    """Write a run's final weights (the EMA for the generator) and model card to the shipped weights.

    Existing weights are replaced only with `force`, and then kept (with their card) as `<name>.<UTC time>.bak`.
    A generator's calibration fitted to other weights than the new ones is moved aside the same way, so it is
    never applied to them. `metrics` adds figures measured elsewhere (e.g. class-conditional sample accuracy) to
    the card.
    """
    if kind not in models.KINDS:
        raise ConfigError(f"unknown model kind {kind!r}: use one of {', '.join(models.KINDS)}")
    run = Path(run)
    found = run_kind(run)
    if found != kind:
        raise ConfigError(f"{run} is a {found} run: export it with --kind {found}")
    weights_dir = Path(weights_dir) if weights_dir else models.WEIGHTS_DIR
    if weights_dir.exists() and not weights_dir.is_dir():
        raise ConfigError(f"--weights-dir {weights_dir} is a file: give a directory")
    path, card_path = weights_dir / f"{kind}.safetensors", weights_dir / f"{kind}.md"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: pass --force to replace it (the old weights are then kept as "
                          f"{path.name}.<UTC time>.bak)")
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
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    exported = Exported(path, card_path)
    if path.exists():
        for old in (path, card_path):
            if old.exists():
                exported.backups.append(Path(shutil.copy2(old, backup_path(old, stamp))))
    models.save_model(model, path, kind, config, card, half=half)
    write_atomic(card_path, render_card(card))
    calibration = models.calibration_path(path)
    # Re-exported weights keep their calibration: weights_sha256 leaves the card out.
    if (kind == "generator" and calibration.exists()
            and models.calibration_sha256(calibration) != models.weights_sha256(path, kind)):
        exported.stale_calibration = backup_path(calibration, stamp)
        os.replace(calibration, exported.stale_calibration)
    return exported


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


def render_card(card: dict) -> str:
    """The Markdown model card of an exported model's card metadata."""
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
    return f"""# Fashion-MNIST {card["kind"]}

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
