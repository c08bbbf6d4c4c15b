"""A pipeline trace as CSV, as a per-image summary of the guidance's action, and as a plot of p_t and the scale."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dng.io import write_atomic
from dng.sampler import ACTIVATION_P, Trace

SUMMARY_COLUMNS = ["image", "concept", "mean_scale", "max_scale", "final_p", "max_p", "activated"]


def write_trace_csv(trace: Trace, path: Path, concepts: list[str]) -> None:
    """One row per step, image and negative concept: timestep, noise level sigma (empty where the rule read none),
    p (empty without a posterior), scale, llr."""
    steps, images, negatives = trace.scale.shape
    sigma = [float("nan")] * steps if trace.sigma is None else trace.sigma[:, 0].tolist()
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(["step", "timestep", "sigma", "image", "concept", "p", "scale", "llr"])
    for s in range(steps):
        for i in range(images):
            for k in range(negatives):
                p, scale, llr = (float(v[s, i, k]) for v in (trace.p, trace.scale, trace.llr))
                out.writerow([s, float(trace.timesteps[s]), _num(sigma[s]), i, concepts[k], _num(p), _num(scale),
                              _num(llr)])
    write_atomic(path, text.getvalue())


def summarize_trace(trace: Trace, concepts: list[str], images: list[str]) -> list[dict]:
    """Per image and concept, the guidance's action over the steps: mean and max applied scale, final and largest
    p_t, and whether DNG activated (p_t reached ACTIVATION_P at a step where it guided, as the prompted bench
    counts it); p and activated are None for rules without a posterior (NP, SLD)."""
    rows = []
    for i, image in enumerate(images):
        for k, concept in enumerate(concepts):
            scale, p = trace.scale[:, i, k], trace.p[:, i, k]
            known = p[~p.isnan()]
            tracked = len(known) > 0
            rows.append({
                "image": image, "concept": concept, "mean_scale": float(scale.mean()), "max_scale": float(scale.max()),
                "final_p": float(known[-1]) if tracked else None, "max_p": float(known.max()) if tracked else None,
                "activated": bool(((p >= ACTIVATION_P) & (scale > 0)).any()) if tracked else None,
            })
    return rows


def write_summary_csv(rows: list[dict], path: Path) -> None:
    """The rows of `summarize_trace`; empty cells where a rule has no posterior."""
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(SUMMARY_COLUMNS)
    for row in rows:
        out.writerow([_cell(row[c]) for c in SUMMARY_COLUMNS])
    write_atomic(path, text.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return _num(value) if isinstance(value, float) else str(value)


def _num(value: float) -> str:
    return "" if value != value else f"{value:.6g}"


def plot_trace(trace: Trace, path: Path, concepts: list[str]) -> None:
    """p_t and the scale per step, one line per image and concept."""
    from dng.plots import _save, plt

    has_p = not bool(trace.p.isnan().all())
    fig, axes = plt.subplots(1, 2 if has_p else 1, figsize=(10 if has_p else 5, 3.5), squeeze=False)
    panels = ([("posterior p_t(c-|x_t)", trace.p)] if has_p else []) + [("applied scale", trace.scale)]
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        for i in range(values.shape[1]):
            for k in range(values.shape[2]):
                ax.plot(values[:, i, k].numpy(), label=f"image {i}: {concepts[k]}")
        ax.set_title(title)
        if values is trace.p:
            ax.set_yscale("log")  # p moves over orders of magnitude from a small prior
        ax.set_xlabel("step")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
