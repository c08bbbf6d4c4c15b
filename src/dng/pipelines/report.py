"""A pipeline trace as CSV and as a plot of p_t and the applied scale over the steps (the paper's Figure 2)."""

from __future__ import annotations

import csv
from pathlib import Path

from dng.sampler import Trace


def write_trace_csv(trace: Trace, path: Path, concepts: list[str]) -> None:
    """One row per step, image and negative concept: timestep, noise level sigma (empty where the rule read none),
    p (empty without a posterior), scale, llr."""
    steps, images, negatives = trace.scale.shape
    sigma = [float("nan")] * steps if trace.sigma is None else trace.sigma[:, 0].tolist()
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "timestep", "sigma", "image", "concept", "p", "scale", "llr"])
        for s in range(steps):
            for i in range(images):
                for k in range(negatives):
                    p, scale, llr = (float(v[s, i, k]) for v in (trace.p, trace.scale, trace.llr))
                    out.writerow([s, float(trace.timesteps[s]), _num(sigma[s]), i, concepts[k], _num(p), _num(scale),
                                  _num(llr)])


def _num(value: float) -> str:
    return "" if value != value else f"{value:.6g}"


def plot_trace(trace: Trace, path: Path, concepts: list[str]) -> None:
    """p_t and the scale per step, one line per image and concept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
    plt.close(fig)
