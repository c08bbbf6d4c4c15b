"""A training run's files: one checkpoint (modules, optimizer, RNG, scalars) and a CSV log of its progress.

The checkpoint is one safetensors file whose metadata carries the scalars, so a single os.replace is atomic.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from dng.errors import ConfigError
from dng.io import write_atomic

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"


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
    write_atomic(Path(run) / CHECKPOINT, save(tensors, metadata=meta))


def load_checkpoint(run: Path, modules: dict, optimizer, rng: torch.Generator) -> dict:
    """Restore modules, optimizer and RNG from run/checkpoint.safetensors; return its scalars."""
    from safetensors import safe_open

    with safe_open(str(Path(run) / CHECKPOINT), framework="pt") as f:
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


def _path(run) -> Path:
    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: train first with `dng train ... --out {run}`")
    return path


def run_kind(run) -> str:
    """'generator' or 'classifier': only a generator run checkpoints an EMA of its model."""
    from safetensors import safe_open

    with safe_open(str(_path(run)), framework="pt") as f:
        return "generator" if any(k.startswith("ema.") for k in f.keys()) else "classifier"


def read_checkpoint(run: Path, module: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict of one module (e.g. 'ema') and the scalars of a run's checkpoint."""
    from safetensors import safe_open

    with safe_open(str(_path(run)), framework="pt") as f:
        prefix = module + "."
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        scalars = json.loads(f.metadata()["scalars"])
    return state, scalars


class RunLog:
    """Appends rows to run/log.csv, dropping rows newer than the checkpoint a run resumes from."""

    def __init__(self, run: Path, fields: list[str], resume_step: int):
        self.path = Path(run) / LOG
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
