"""The results table both Fashion-MNIST benches build from their stored cells (`dng.bench.sweep`).

Setting labels (every bench's), DNG's cells, the order of rows, which groups compare, mean ± std summaries, and
results.json, results.csv and summary.md, each written atomically. A bench says what its rows are with a `Table`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dng.bench.sweep import read_json
from dng.config import DNGConfig
from dng.errors import ConfigError
from dng.guidance import SLD_PRESETS
from dng.io import write_atomic, write_json
from dng.sampler import Trace
from dng.vision.models import dng_config


def setting_label(method: str, params: dict, scale_format: str = "") -> str:
    """Short name of a setting in every bench: 'none', 'np 2.0' (with `scale_format` 'g': 'np 2'), 'sld medium',
    'dng default', 'dng default lam0=3', 'dng-branches default'. Labels name stored cells: a change orphans them."""
    if method in ("dng", "dng-branches"):
        user = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
                       for k, v in params.get("set", {}).items())
        return f"{method} {params.get('preset', 'default')}{user}"
    if method == "np":
        return f"np {params['scale']:{scale_format}}"
    if method == "sld":
        return f"sld {params['preset']}"
    return method


def dng_cells(calibration, klass: int, preset: str, user: dict | None, lam0s=None) -> list[tuple[dict, DNGConfig]]:
    """DNG's cells for removing `klass` (both benches): the preset with the generator's `calibration` and the user's
    settings over it (`dng.vision.models.dng_config`), one cell, or one per lam0 in `lam0s`. Returns (what the user
    set, the configuration) per cell."""
    cells = []
    for lam0 in lam0s or [None]:
        changes = {**(user or {}), **({} if lam0 is None else {"lam0": lam0})}
        cells.append((changes, dng_config(calibration, [klass], preset, **changes)))
    return cells


def dng_params(preset: str, user: dict, config: DNGConfig) -> dict:
    """A DNG cell's stored params: the preset and what the user set ("set"), which name the cell, and every value
    the rule ran with, so that a changed preset or calibration makes stored cells stale, not mixed."""
    return {"preset": preset, "set": user, **config.to_dict()}


def value_text(value) -> str:
    """A setting's value as reports write it: floats to 4 significant digits, lists in brackets."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def dng_values(values: dict) -> str:
    """DNG's values in force (a `DNGConfig.to_dict()`, or a cell's params), every one, as NAME=VALUE: what every
    report, printed line and summary lists, so that a preset is seen to be what it says."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in values.items())


# Settings without a negative rule: no scale to lower.
UNGUIDED = ("none", "cfg", "data")


def degenerate_warning(name: str, how_many: str, method: str) -> str:
    """The warning every report gives a set of images flagged by `dng.metrics.degenerate`: `name` is its setting,
    `how_many` says which images, e.g. '100% of its images'; a guided `method` is told to lower its scale."""
    advice = "" if method in UNGUIDED else ": lower its scale"
    return f"{name}: {how_many} are saturated noise or speckled, so its metrics describe noise, not garments{advice}"


def grouped(rows: list[dict], key: Callable[[dict], object]) -> dict[object, list[dict]]:
    """The rows by `key`, in the order each key first appears."""
    groups: dict[object, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def mean_std(summary: dict, metric: str) -> str:
    """A summary's cell of summary.md: '0.1234 ± 0.0056', whole seconds, '-' where unknown."""
    if summary[metric] is None:
        return "-"
    if metric == "seconds":
        return f"{summary[metric]:.0f}"
    return f"{summary[metric]:.4f} ± {summary[metric + '_std']:.4f}"


def markdown(header: list[str], lines: list[list]) -> str:
    """A markdown table."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, lines)]) + "\n"


def stored_trace(arrays: dict) -> Trace:
    """The trace a cell's .npz keeps (first negative, some samples) as a `Trace`, for `plots.trajectories`."""
    sigma = torch.from_numpy(arrays["sigma"])
    steps = torch.from_numpy(arrays["timesteps"]) if "timesteps" in arrays else torch.arange(len(sigma))
    return Trace(steps, torch.from_numpy(arrays["p"])[..., None], torch.from_numpy(arrays["scale"])[..., None],
                 torch.empty(0), sigma[:, None].expand(-1, 2))


@dataclass(frozen=True)
class Table:
    """What a bench's rows are: the keys that name a row besides its setting (`group`, e.g. the removed class), its
    methods in the order rows list them, its metrics, results.csv's leading columns, and how labels write NP's scale."""

    group: tuple[str, ...]
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    columns: Mapping[str, Callable[[dict], object]]
    scale_format: str = ""

    def label(self, row: dict) -> str:
        return setting_label(row["method"], row["params"], self.scale_format)

    def key(self, row: dict) -> tuple:
        return tuple(row[k] for k in self.group)

    def order(self, row: dict) -> tuple:
        """Sort key of a row: by group, method, then strength (SLD weak to max), whichever sweep made the cell."""
        method, params = row["method"], row["params"]
        if method == "sld":
            return *self.key(row), self.methods.index(method), list(SLD_PRESETS).index(params["preset"]), ""
        strength = params.get("lam0", params.get("scale", 0.0))  # DNG's lam0, NP's scale
        return *self.key(row), self.methods.index(method), strength, self.label(row)

    def load(self, out) -> list[dict]:
        """Every stored cell of DIR ({"row": ..., and what else the bench stored}), in `order`."""
        cells = [read_json(p) for p in sorted((Path(out) / "cells").glob("*.json"))]
        if not cells:
            raise ConfigError(f"{out} holds no finished cells")
        return sorted(cells, key=lambda c: self.order(c["row"]))

    def comparable(self, rows: list[dict], family: Callable[[dict], object] = lambda row: None) -> list[dict]:
        """The rows of the groups that have every setting any group of their `family` has (one family: all rows).
        A mean over the groups of an interrupted or uneven sweep would compare settings on different groups."""
        labels = {key: {self.label(r) for r in members} for key, members in grouped(rows, self.key).items()}
        wanted: dict[object, set] = {}
        for r in rows:
            wanted.setdefault(family(r), set()).update(labels[self.key(r)])
        return [r for r in rows if labels[self.key(r)] == wanted[family(r)]]

    def stats(self, members: list[dict]) -> dict:
        """Mean and standard deviation of every metric over `members`; None where some member lacks it, since a mean
        over the others would mislead."""
        out = {}
        for m in self.metrics:
            values = np.array([r[m] for r in members if r.get(m) is not None], dtype=np.float64)
            full = len(values) == len(members)
            out[m] = float(values.mean()) if full else None
            out[f"{m}_std"] = float(values.std()) if full else None
        return out

    def write(self, out, results: dict, rows: list[dict], summary: str) -> dict[str, Path]:
        """results.json (`results`), results.csv (one line per row) and summary.md (`summary`)."""
        out = Path(out)
        files = {"results": write_json(out / "results.json", results)}
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([*self.columns, "method", "setting", "params", *self.metrics])
        for r in rows:
            writer.writerow([*(column(r) for column in self.columns.values()), r["method"], self.label(r),
                             json.dumps(r["params"]), *(r[m] for m in self.metrics)])
        files["csv"] = write_atomic(out / "results.csv", buf.getvalue())
        files["summary"] = write_atomic(out / "summary.md", summary)
        return files


# A DNG cell's params that name the cell or belong to the bench, not to DNG's configuration.
NOT_DNG = ("preset", "set", "cfg_scale")


def summary_notes(summary: list[dict], unit: str, units: str, label: Callable[[dict], str]) -> str:
    """The lines under a bench's summary table: a warning per setting that gave degenerate images
    (`dng.metrics.degenerate`) for some of its groups (`units`: classes, pairs), then the DNG values in force of
    each DNG setting, those that differ by group (`by_group`: a calibrated prior per removed class) one per group.
    Each summary entry has "method", "params", how many groups (under the key `units`), how many of them gave
    degenerate images ("degenerate") and "by_group"."""
    lines = []
    for s in summary:
        if s.get("degenerate"):
            how_many = f"most images of {s['degenerate']} of its {s[units]} {units}"
            lines.append(f"**{degenerate_warning(label(s), how_many, s['method'])}.**")
    lines += [""] if lines else []
    for s in summary:
        if s["method"] in ("dng", "dng-branches"):
            values = {k: v for k, v in s["params"].items() if k not in NOT_DNG}
            varying = "".join(f"; {k} per {unit}: " + ", ".join(f"{g} {value_text(v)}" for g, v in per.items())
                              for k, per in s.get("by_group", {}).items() if k not in NOT_DNG)
            lines.append(f"- `{label(s)}`: DNG values in force {dng_values(values)}{varying}")
    return "\n" + "\n".join(lines) + "\n" if lines else ""
