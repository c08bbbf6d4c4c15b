"""Figures: the safety / fidelity trade-off of guidance rules and DNG's posterior and scale over the steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _label(row: dict) -> str:
    params = row["params"]
    for key in ("preset", "scale"):
        if key in params and row["method"] in ("np", "sld"):
            return f"{row['method']} {params[key]}"
    return row["method"]


def tradeoff(rows: list[dict], path, x: str = "class_kl", y: str = "forbidden_rate", title: str = "") -> Path:
    """Scatter of one metric against another, one point per row, labelled by method and setting."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"none": "o", "np": "s", "sld": "^", "dng": "*", "dng-oracle": "P", "target": "X"}
    for row in rows:
        ax.scatter(row[x], row[y], marker=markers.get(row["method"], "o"), s=70, label=_label(row))
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or f"{y} vs {x} (lower-left is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def trajectories(trace, path, max_lines: int = 40, title: str = "DNG along the sampling chain") -> Path:
    """p_t and the applied scale of the first negative per sample along the chain (like the paper's Figure 2).

    Against the noise level sigma (high noise on the left) where the trace has it, else against the step.
    """
    sigma = None if trace.sigma is None else trace.sigma[:, 0].numpy()
    if sigma is not None and not (sigma > 0).any():
        sigma = None  # a rule that reads no noise level (NP, SLD) leaves it NaN
    x = range(len(trace.timesteps)) if sigma is None else sigma
    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i in range(min(max_lines, trace.p.shape[1])):
        ax_p.plot(x, trace.p[:, i, 0].numpy(), lw=0.8, alpha=0.7)
        ax_s.plot(x, trace.scale[:, i, 0].numpy(), lw=0.8, alpha=0.7)
    ax_p.set_ylabel("posterior p_t(c- | x_t)")
    ax_s.set_ylabel("applied scale")
    ax_p.set_yscale("log")
    # The scale spans orders of magnitude and is 0 where the rule is off: logarithmic above 0.01.
    ax_s.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax_p, ax_s):
        if sigma is None:
            ax.set_xlabel("step")
        else:
            # High noise on the left; the last step's sigma 0 (clean data) has no place on a log axis.
            ax.set_xscale("log")
            ax.set_xlim(sigma[sigma > 0].max(), sigma[sigma > 0].min())
            ax.set_xlabel("noise level sigma")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
