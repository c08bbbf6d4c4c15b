"""`dng bench prompted`: a positive class with classifier-free guidance meets a negative class.

The shipped generator is a prompted model: eps(x | class) for ten classes and eps_u. CFG on a positive class plus
a negative class is the text-to-image situation with three branches (unconditional, positive, negative), scored
with the shipped classifier. Each cell is one (positive, negative) pair and one setting, drawn from the same noise
and step noise as every other cell (`dng.bench.sweep`):

- `cfg`: CFG on the positive, no negative (the reference every other cell is compared with);
- `np`: negative prompting on top of CFG, eps_u + w (eps_p - eps_u) - lam (eps_n - eps_u). At lam = w - 1 this is
  the negative prompt diffusers users get (the negative branch in place of the unconditional one,
  eps_n + w (eps_p - eps_n));
- `dng`: DNG on top of the same CFG, the library default with the generator's calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dng import metrics
from dng.bench.class_removal import Reference
from dng.bench.sweep import SampleSet, Sweep, calibration_record, read_npz
from dng.bench.table import (
    Table,
    dng_cells,
    dng_params,
    grouped,
    markdown,
    mean_std,
    setting_label,
    stored_trace,
    summary_notes,
)
from dng.config import check_scale
from dng.defaults import BENCH_IMAGES, CFG_SCALE, GENERATOR_BATCH, GENERATOR_SAMPLER, GENERATOR_STEPS, NP_FACTORS
from dng.distributed import World
from dng.errors import ConfigError
from dng.io import write_atomic, write_json
from dng.sampler import ACTIVATION_P
from dng.vision import generate
from dng.vision.branches import check_dtype
from dng.vision.data import CLASS_NAMES, NUM_CLASSES, parse_class
from dng.vision.images import classify, grid, npz_bytes
from dng.vision.models import (
    default_weights,
    dng_source,
    generator_calibration,
    generator_sampler,
    load_classifier,
    load_generator,
    weights_sha256,
)

METHODS = ("cfg", "np", "dng")
METRICS = ("positive_rate", "negative_rate", "change_vs_cfg", "fid_vs_cfg", "mean_scale", "max_scale",
           "activated_rate", "artifact_rate", "saturated_rate", "seconds")
# CFG's own negative rate separates the pairs: a negative CFG never produces is unrelated, one it often produces is
# related; pairs in between are reported apart.
UNRELATED, RELATED = 0.01, 0.03
GRID_IMAGES = 32
TRACE_SAMPLES = 60
# NP's labels write its scale with "g" ("np 1"): they name the stored cells.
TABLE = Table(("positive", "negative"), METHODS, METRICS,
              {"positive": lambda r: CLASS_NAMES[r["positive"]], "negative": lambda r: CLASS_NAMES[r["negative"]],
               "relation": lambda r: r["relation"]}, scale_format="g")


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """'positive:negative' pairs, comma-separated, classes by index or name; 'all' is every ordered pair of
    distinct classes."""
    if text.strip().lower() == "all":
        return [(k, j) for k in range(NUM_CLASSES) for j in range(NUM_CLASSES) if k != j]
    pairs = []
    for item in (part for part in text.split(",") if part.strip()):
        positive, sep, negative = item.partition(":")
        if not sep:
            raise ConfigError(f"--pairs {item!r}: write POSITIVE:NEGATIVE, e.g. Trouser:Bag or 1:8")
        pairs.append((parse_class(positive), parse_class(negative)))
    if not pairs:
        raise ConfigError("--pairs needs at least one POSITIVE:NEGATIVE pair, e.g. Trouser:Bag, or 'all'")
    return list(dict.fromkeys(pairs))


def cell_key(positive: int, negative: int, method: str, params: dict) -> str:
    return f"pos{positive}-neg{negative}-{setting_label(method, params, TABLE.scale_format).replace(' ', '-')}"


def configs(positive: int, negative: int, methods: list[str], cfg_scale: float, np_scales, dng: list) -> list[tuple]:
    """(method, params, SampleSet) of every cell of one pair. The cfg samples of a positive class are shared by
    all its pairs; `dng` is the negative's DNG cells, (preset, what the user set, config) each
    (`dng.bench.table.dng_cells`)."""
    cfg = {"cfg_scale": cfg_scale}
    cells = [("cfg", cfg, SampleSet(f"pos{positive}-cfg", None, (), positive, cfg_scale, params=cfg))]
    for method in methods:
        if method == "np":
            for scale in np_scales:
                params = {"cfg_scale": cfg_scale, "scale": scale, "diffusers": scale == cfg_scale - 1}
                key = cell_key(positive, negative, method, params)
                cells.append((method, params, SampleSet(key, generate.make_rule("np", np_scale=scale),
                                                        (negative,), positive, cfg_scale, params=params)))
        elif method == "dng":
            for preset, user, config in dng:
                params = {"cfg_scale": cfg_scale, **dng_params(preset, user, config)}
                key = cell_key(positive, negative, method, params)
                rule = generate.make_rule("dng", dng=config)
                cells.append((method, params, SampleSet(key, rule, (negative,), positive, cfg_scale, params=params)))
    return cells


def activated_rate(stored: dict, method: str) -> float:
    """Share of samples the negative acted on: every sample for NP at a scale above 0, for DNG those whose tracked
    p_t reached `ACTIVATION_P` (the threshold `dng sd`'s summary uses) at a step it guided, none for CFG."""
    if method == "dng":
        acted = (stored["p"][..., 0] >= ACTIVATION_P) & (stored["scale"][..., 0] > 0)
        return float(acted.any(axis=0).mean())
    return float(method == "np" and stored["scale"].max() > 0)


def relation(cfg_negative_rate: float, positive: int, negative: int) -> str:
    """How a pair's negative relates to its positive, by CFG's own negative rate (`UNRELATED`, `RELATED`)."""
    if positive == negative:
        return "self"
    if cfg_negative_rate <= UNRELATED:
        return "unrelated"
    return "related" if cfg_negative_rate >= RELATED else "between"


SELF_NOTE = ("positive = negative: the rule pushes away from the class CFG pulls towards; the images stay finite, "
             "and the rates show which pull won")


class PromptedBench:
    """One generator, classifier, scheduler, CFG scale and seed; `run(pairs, methods)` fills DIR."""

    def __init__(self, out, steps: int = GENERATOR_STEPS, num_samples: int = BENCH_IMAGES,
                 scheduler: str = GENERATOR_SAMPLER, seed: int = 0,
                 cfg_scale: float = CFG_SCALE, generator=None, classifier=None, batch_size: int = GENERATOR_BATCH,
                 progress: bool = True, dtype: str = "float32", world: World | None = None, calibration=None):
        if steps < 1 or num_samples < 4 or batch_size < 1:
            raise ConfigError(f"need --steps >= 1, --num-samples >= 4 and --batch-size >= 1, got {steps}, "
                              f"{num_samples} and {batch_size}")
        if check_scale("--cfg-scale", cfg_scale) <= 1:
            raise ConfigError(f"--cfg-scale must be above 1 (at 1 CFG is the positive branch alone and diffusers "
                              f"ignores the negative prompt), got {cfg_scale}")
        generator_sampler(scheduler)
        check_dtype(dtype)
        gen_path = Path(generator) if generator else default_weights("generator")
        clf_path = Path(classifier) if classifier else default_weights("classifier")
        self.classifier_path, self._reference = clf_path, None
        # `calibration` as in `generator_calibration`; the folder records it and `run` recomputes DNG's cells under
        # another (`ClassRemovalBench`).
        self.calibration, self.calibration_file = generator_calibration(calibration, gen_path)
        settings = {
            "bench": "prompted", "steps": steps, "num_samples": num_samples, "scheduler": scheduler, "seed": seed,
            "cfg_scale": float(cfg_scale), "dtype": dtype, "batch_size": batch_size,
            "generator_weights_sha256": weights_sha256(gen_path, "generator"),
            "classifier_weights_sha256": weights_sha256(clf_path, "classifier"),
        }
        # The folder's settings are checked before any model loads; the generator loads when a shard is drawn.
        self.sweep = Sweep(out, settings, lambda: load_generator(gen_path), world, progress)
        self.out, self.settings = self.sweep.out, self.sweep.settings
        self._scored: dict[str, tuple] = {}

    @property
    def reference(self) -> Reference:
        """The classifier, and the test split that the degeneracy check compares with; loaded when the first cell is
        scored."""
        if self._reference is None:
            self._reference = Reference(load_classifier(self.classifier_path))
        return self._reference

    def cells(self, pairs, methods, np_scales=None, dng_preset="default", dng_set=None, dng_scales=None) -> list:
        w = self.settings["cfg_scale"]
        np_scales = np_scales or tuple(f * (w - 1) for f in NP_FACTORS)
        return [(k, j, *c) for k, j in pairs
                for c in configs(k, j, methods, w, np_scales, [(dng_preset, *cell) for cell in dng_cells(
                    self.calibration, j, dng_preset, dng_set, dng_scales)])]

    def _classified(self, sample_set: SampleSet) -> tuple[dict, np.ndarray, np.ndarray]:
        """A stored sample set with its predicted classes and features; the cfg sets, which every cell of their
        positive class reads, stay in memory."""
        if sample_set.key in self._scored:
            return self._scored[sample_set.key]
        stored = self.sweep.load(sample_set)
        scored = (stored, *classify(self.reference.classifier, stored["images"]))
        if sample_set.key.endswith("-cfg"):
            self._scored[sample_set.key] = scored
        return scored

    def score_cell(self, positive: int, negative: int, method: str, params: dict, sample_set: SampleSet,
                   cfg_set: SampleSet) -> None:
        """Score one cell from its stored `sample_set` against its positive class's CFG samples (`cfg_set`)."""
        stored, pred, feats = self._classified(sample_set)
        cfg, _, cfg_feats = (stored, pred, feats) if method == "cfg" else self._classified(cfg_set)
        diff = (stored["images"].astype(np.float64) - cfg["images"].astype(np.float64)) / 127.5
        scale = stored["scale"][..., 0] if "scale" in stored else np.zeros((1, len(pred)))
        row = {
            "positive": positive, "negative": negative, "method": method, "params": params,
            "positive_rate": float((pred == positive).mean()), "negative_rate": float((pred == negative).mean()),
            "change_vs_cfg": float(np.sqrt((diff ** 2).mean(axis=(1, 2))).mean()),
            "fid_vs_cfg": 0.0 if method == "cfg" else metrics.fid(feats, cfg_feats),
            "mean_scale": float(scale.mean()), "max_scale": float(scale.max()),
            "activated_rate": activated_rate(stored, method),
            **self.reference.degeneracy(stored["images"]),
            "seconds": float(stored["seconds"]),
        }
        if positive == negative:
            row["note"] = SELF_NOTE
        arrays = {"grid": stored["images"][:GRID_IMAGES]}
        if method == "dng":
            arrays.update(sigma=stored["sigma"], p=stored["p"][:, :TRACE_SAMPLES, 0],
                          scale=stored["scale"][:, :TRACE_SAMPLES, 0], negative=pred[:TRACE_SAMPLES] == negative)
        path = self.sweep.cell_path(cell_key(positive, negative, method, params))
        write_atomic(path.with_suffix(".npz"), npz_bytes(**arrays))
        write_json(path, {"row": row})

    def run(self, pairs, methods, np_scales=None, dng_preset="default", dng_set=None, dng_scales=None) -> int:
        """Draw and score every missing cell, split over the ranks; returns how many cells were missing."""
        cells = self.cells(pairs, methods, np_scales, dng_preset, dng_set, dng_scales)
        by_key = {cell_key(*c[:4]): c for c in cells}
        self.sweep.refuse_stale({key: c[3] for key, c in by_key.items()},
                                calibration_record(self.calibration, self.calibration_file),
                                {key for key, c in by_key.items() if c[2] == "dng"},
                                dng_source(self.calibration, dng_preset, self.calibration_file))
        missing = [key for key in by_key if not self.sweep.cell_path(key).is_file()]
        cfg_sets = {c[0]: c[4] for c in cells if c[2] == "cfg"}
        # A cell is scored against the cfg samples of its positive class: those are drawn too.
        self.sweep.draw([s for key in missing for s in (by_key[key][4], cfg_sets[by_key[key][0]])])
        self.sweep.score(list(by_key), lambda key: self.score_cell(*by_key[key], cfg_sets[by_key[key][0]]))
        return len(missing)


def load_cells(out) -> list[dict]:
    """Every stored row, each with its pair's relation, ordered by pair and setting."""
    rows = [c["row"] for c in TABLE.load(out)]
    cfg = {(r["positive"], r["negative"]): r["negative_rate"] for r in rows if r["method"] == "cfg"}
    for r in rows:
        pair = (r["positive"], r["negative"])
        r["relation"] = relation(cfg[pair], *pair) if pair in cfg else None
        for metric in ("artifact_rate", "saturated_rate"):  # cells stored before they were measured
            r.setdefault(metric, None)
        r.setdefault("degenerate", metrics.degenerate(r["saturated_rate"], r["artifact_rate"]))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over pairs of every metric, per relation and setting. Only pairs that have every
    setting their relation's pairs have count: a mean over other pairs would compare settings on different pairs
    (a sweep of CFG alone over all pairs beside a few pairs with every rule)."""
    comparable = TABLE.comparable(rows, family=lambda r: r["relation"])
    groups = grouped(comparable, lambda r: (r["relation"], r["method"], TABLE.label(r)))
    relations = ("unrelated", "related", "between", "self", None)
    out = []
    for (rel, method, label), members in sorted(groups.items(), key=lambda g: (relations.index(g[0][0]),
                                                                                 METHODS.index(g[0][1]))):
        # A calibrated DNG has a prior per negative class: the parameters all pairs share, and those by pair.
        first = members[0]["params"]
        shared = {k: v for k, v in first.items() if all(m["params"].get(k) == v for m in members)}
        by_group = {k: {f"{CLASS_NAMES[m['positive']]}:{CLASS_NAMES[m['negative']]}": m["params"].get(k)
                        for m in members} for k in first if k not in shared}
        out.append({"relation": rel, "method": method, "setting": label, "params": shared, "by_group": by_group,
                    "pairs": len(members), "degenerate": sum(bool(m.get("degenerate")) for m in members),
                    **TABLE.stats(members)})
    return out


def claims(rows: list[dict]) -> dict:
    """The paper's text-to-image claim, pair by pair, for the default DNG row against CFG and NP.

    Unrelated pairs: DNG changes the CFG images by at most a quarter of what diffusers' negative prompt changes,
    and keeps the positive rate within 1 pp. Related pairs: DNG halves CFG's negative rate, with a smaller change
    than every NP setting that gets as low.
    """
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["positive"], r["negative"]), {}).setdefault(r["method"], []).append(r)
    out = {"unrelated": [0, 0], "related": [0, 0]}
    for methods in pairs.values():
        cfg, dng = methods.get("cfg"), [r for r in methods.get("dng", []) if not r["params"]["set"]]
        if not cfg or not dng or cfg[0]["relation"] not in out:
            continue
        cfg, dng, nps = cfg[0], dng[0], methods.get("np", [])
        if cfg["relation"] == "unrelated":
            diffusers = [r for r in nps if r["params"]["diffusers"]]
            if not diffusers:
                continue
            ok = (dng["change_vs_cfg"] <= 0.25 * diffusers[0]["change_vs_cfg"]
                  and dng["positive_rate"] >= cfg["positive_rate"] - 0.01)
        else:
            as_safe = [r["change_vs_cfg"] for r in nps if r["negative_rate"] <= dng["negative_rate"]]
            ok = (dng["negative_rate"] <= 0.5 * cfg["negative_rate"]
                  and all(dng["change_vs_cfg"] < c for c in as_safe))
        out[cfg["relation"]][0] += int(ok)
        out[cfg["relation"]][1] += 1
    return {k: {"held": v[0], "pairs": v[1]} for k, v in out.items()}


def write_results(out) -> dict[str, Path]:
    """results.json, results.csv, summary.md and the figures, rebuilt from the stored cells."""
    from dng import plots  # matplotlib: an optional extra, and slow to import

    out = Path(out)
    rows = load_cells(out)
    summary, held = summarize(rows), claims(rows)
    files = TABLE.write(out, {"rows": rows, "summary": summary, "claims": held}, rows,
                        format_summary(summary, held, rows))
    figures = out / "figures"
    files["summary_plot"] = plots.change_vs_negative(rows, figures / "change_vs_negative_rate.png",
                                                     [TABLE.label(r) for r in rows])
    for k, j in sorted({(r["positive"], r["negative"]) for r in rows}):
        mine = [r for r in rows if (r["positive"], r["negative"]) == (k, j)]
        name = f"pos{k}-neg{j}"
        grids = [(TABLE.label(r), read_npz(out / "cells" / f"{cell_key(k, j, r['method'], r['params'])}.npz"))
                 for r in mine]
        title = f"{CLASS_NAMES[k]} with the negative {CLASS_NAMES[j]} (CFG {mine[0]['params']['cfg_scale']:g})"
        files[f"grids_{name}"] = plots.grids_side_by_side(
            [(label, grid(f["grid"])) for label, f in grids], figures / "grids" / f"{name}.png", title)
        for label, f in grids:
            if "negative" in f:
                files[f"trajectories_{name}"] = plots.trajectories(
                    stored_trace(f), figures / "trajectories" / f"{name}-{label.replace(' ', '-')}.png",
                    TRACE_SAMPLES, f"{label}: {CLASS_NAMES[k]} against {CLASS_NAMES[j]}, per sample", f["negative"],
                    f"classified {CLASS_NAMES[j]}")
    return files


def format_summary(summary: list[dict], held: dict, rows: list[dict]) -> str:
    """Markdown: mean ± std over pairs per relation and setting, then the claim's pair counts."""
    shown = ("positive_rate", "negative_rate", "change_vs_cfg", "fid_vs_cfg", "mean_scale", "max_scale",
             "activated_rate", "artifact_rate", "saturated_rate")
    table = markdown(["pairs", "setting", "n", *(m.replace("_", " ") for m in shown)],
                     [[s["relation"], s["setting"], s["pairs"], *(mean_std(s, m) for m in shown)] for s in summary])
    lines = ["", f"Relation by CFG's own negative rate: unrelated <= {UNRELATED:.0%}, related >= {RELATED:.0%}.", ""]
    for rel, count in held.items():
        if count["pairs"]:
            lines.append(f"- {rel} pairs where the claim holds for `dng default`: {count['held']} of {count['pairs']}")
    if any(r["positive"] == r["negative"] for r in rows):
        lines.append(f"- {SELF_NOTE}")
    return table + "\n".join(lines) + "\n" + summary_notes(summary, "pair", "pairs", lambda s: s["setting"])
