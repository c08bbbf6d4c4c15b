"""Figures: the safety / fidelity trade-off of guidance rules and DNG's posterior and scale over the steps.

Settings are labelled by the caller (`dng.bench.table.setting_label`): the figures only draw.
"""

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


def tradeoff(rows: list[dict], path, x: str = "class_kl", y: str = "forbidden_rate", title: str = "") -> Path:
    """Scatter of one metric against another, one point per row, labelled by its "setting"."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"none": "o", "np": "s", "sld": "^", "dng": "*", "dng-oracle": "P", "target": "X"}
    for row in rows:
        ax.scatter(row[x], row[y], marker=markers.get(row["method"], "o"), s=70, label=row["setting"])
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or f"{y} vs {x} (lower-left is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def trajectories(trace, path, max_lines: int = 40, title: str = "DNG along the sampling chain",
                 highlight=None, highlight_label: str = "") -> Path:
    """p_t and the applied scale of the first negative per sample along the chain (like the paper's Figure 2).

    Against the noise level sigma (high noise on the left) where the trace has it, else against the step.
    `highlight` (a boolean per sample) draws those samples in red, the others in blue, with `highlight_label`.
    """
    sigma = None if trace.sigma is None else trace.sigma[:, 0].numpy()
    if sigma is not None and not (sigma > 0).any():
        sigma = None  # a rule that reads no noise level (NP, SLD) leaves it NaN
    x = range(len(trace.timesteps)) if sigma is None else sigma
    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i in range(min(max_lines, trace.p.shape[1])):
        style = {"lw": 0.8, "alpha": 0.7}
        if highlight is not None:
            style["color"] = "tab:red" if highlight[i] else "tab:blue"
        ax_p.plot(x, trace.p[:, i, 0].numpy(), **style)
        ax_s.plot(x, trace.scale[:, i, 0].numpy(), **style)
    if highlight is not None:
        from matplotlib.lines import Line2D

        ax_p.legend([Line2D([], [], color="tab:red"), Line2D([], [], color="tab:blue")],
                    [highlight_label, "the others"], fontsize=8)
    ax_p.set_ylabel("posterior p_t(c- | x_t)")
    ax_s.set_ylabel("applied scale")
    ax_p.set_yscale("log")
    # The scale spans orders of magnitude and is 0 where the rule is off: logarithmic above 0.01.
    ax_s.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax_p, ax_s):
        if sigma is None:
            ax.set_xlabel("step")
        else:
            # High noise on the left; the last step's sigma 0 (clean data) and a flow schedule's first, inf (pure
            # noise), have no place on a log axis.
            shown = sigma[(sigma > 0) & (sigma < float("inf"))]
            ax.set_xscale("log")
            ax.set_xlim(shown.max(), shown.min())
            ax.set_xlabel("noise level sigma")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def grids_side_by_side(panels: list[tuple[str, object]], path, title: str = "", width: float = 3.2,
                       height: float = 2.2) -> Path:
    """Image grids (uint8 arrays) next to each other, each under its label: `width` inches per grid, `height` inches
    tall with the titles."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False, layout="constrained")
    for ax, (label, image) in zip(axes[0], panels, strict=True):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def change_vs_negative(rows: list[dict], path, labels: list[str]) -> Path:
    """Each (pair, setting) of the prompted bench, labelled by `labels` (one per row): its change from the CFG images
    against its negative rate."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    markers = {"unrelated": "o", "related": "^", "between": "s", "self": "x", None: "."}
    guided = [(r, label) for r, label in zip(rows, labels, strict=True) if r["method"] != "cfg"]
    colours = dict(zip(sorted({label for _, label in guided}, key=lambda lab: (lab.split()[0] != "np", lab)),
                       plt.cm.tab10.colors, strict=False))
    for r, label in guided:
        ax.scatter(r["change_vs_cfg"], r["negative_rate"], marker=markers[r["relation"]], color=colours[label],
                   s=28, alpha=0.8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", color=c, label=lab) for lab, c in colours.items()]
    handles += [Line2D([], [], ls="none", marker=m, color="gray", label=rel) for rel, m in markers.items()
                if rel and any(r["relation"] == rel for r in rows)]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_xlabel("change from the CFG image (RMS pixel difference, images in [-1, 1])")
    ax.set_ylabel("share classified as the negative")
    ax.set_title("every pair and setting: a good rule moves only the images that need it (lower-left)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def removal_tradeoff(summary: list[dict], path, x: str, labels: list[str]) -> Path:
    """Forbidden rate against `x`, one point per setting (labelled by `labels`): mean with the spread over removed
    classes as bars."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"data": "D", "none": "o", "np": "s", "sld": "^", "dng": "*", "dng-branches": "P"}
    # One colour family per method, darker for stronger settings, so that ten or more settings stay apart.
    shades = {"data": None, "none": None, "np": plt.cm.Oranges, "sld": plt.cm.Purples, "dng": plt.cm.Greens,
              "dng-branches": plt.cm.Blues}
    for s, setting in zip(summary, labels, strict=True):
        family = [t for t in summary if t["method"] == s["method"]]
        cmap = shades[s["method"]]
        color = {"data": "gray", "none": "black"}.get(s["method"]) or cmap(
            0.45 + 0.5 * family.index(s) / max(1, len(family) - 1))
        # Spread bars stop at 0: neither metric can be negative.
        xerr = [[min(s[f"{x}_std"], s[x])], [s[f"{x}_std"]]]
        yerr = [[min(s["forbidden_rate_std"], s["forbidden_rate"])], [s["forbidden_rate_std"]]]
        ax.errorbar(s[x], s["forbidden_rate"], xerr=xerr, yerr=yerr, capsize=2, color=color,
                    marker=markers[s["method"]], ms=8, ls="none", label=setting)
    # Each rule's settings, weakest to strongest, joined: the frontier it traces.
    for method in ("np", "sld", "dng", "dng-branches"):
        family = [s for s in summary if s["method"] == method]
        if len(family) > 1:
            ax.plot([s[x] for s in family], [s["forbidden_rate"] for s in family], color=shades[method](0.7), lw=1,
                    alpha=0.6, zorder=0)
    # The forbidden rate spans 0 to tens of percent: linear near 0, logarithmic above 0.1 %.
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    label = {"fid": "FID (classifier features)", "unguided_kl": "class KL to the unguided samples"}.get(
        x, x.replace("_", " "))
    ax.set_xlabel(label)
    ax.set_ylabel("forbidden rate")
    ax.set_title(f"forbidden rate vs {label}, mean over removed classes (lower-left is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def class_histogram(cells: list[dict], path, labels: list[str]) -> Path:
    """Grouped bars: share of samples classified as each class, one bar per setting (one removed class), labelled by
    `labels`."""
    import numpy as np

    from dng.vision.data import CLASS_NAMES, NUM_CLASSES

    klass = cells[0]["row"]["class"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(cells)
    for j, (c, label) in enumerate(zip(cells, labels, strict=True)):
        share = np.array(c["counts"], dtype=np.float64) / max(1, sum(c["counts"]))
        ax.bar(np.arange(NUM_CLASSES) + (j - (len(cells) - 1) / 2) * width, share, width, label=label)
    ax.axhline(1 / (NUM_CLASSES - 1), color="k", lw=0.8, ls="--", label="uniform over kept")
    ax.set_xticks(range(NUM_CLASSES), [n.split("/")[0] for n in CLASS_NAMES], rotation=30)
    ax.set_ylabel("share of samples (classifier)")
    ax.set_title(f"predicted classes with {CLASS_NAMES[klass]} removed")
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, path)
