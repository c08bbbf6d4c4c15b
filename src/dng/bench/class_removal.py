"""`dng bench class-removal`: remove one Fashion-MNIST class at a time from the unconditional generator.

Every finished cell (class, method, params) is a JSON file under DIR/cells (plus an .npz of its sample grid and
DNG trace), scored from the sample sets of `dng.bench.sweep`; results.json, the CSV and the figures are rebuilt
from the cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dng import metrics
from dng.bench.sweep import SampleSet, Sweep, calibration_record, one_thread, read_npz
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
from dng.defaults import BENCH_IMAGES, GENERATOR_BATCH, GENERATOR_SAMPLER, GENERATOR_STEPS, NP_SCALES
from dng.distributed import World
from dng.errors import ConfigError
from dng.guidance import SLD_PRESETS
from dng.io import write_atomic, write_json
from dng.vision import generate
from dng.vision.branches import check_dtype
from dng.vision.data import CLASS_NAMES, NUM_CLASSES, load_split
from dng.vision.images import classify, grid, npz_bytes, save_png
from dng.vision.models import (
    default_weights,
    dng_source,
    generator_calibration,
    generator_sampler,
    load_classifier,
    load_generator,
    weights_sha256,
)

# "data" is the metric's own floor: real train images of the kept classes, scored like samples (the test images are
# the FID reference, so the train split keeps the two sets apart). "dng-branches" is DNG's rule with the model's own
# posterior read from every class's branch (`dng.vision.branches.ClassPosterior`) instead of tracked: what tracking
# costs.
METHODS = ("data", "none", "np", "sld", "dng", "dng-branches")
METRICS = ("forbidden_rate", "class_kl", "unguided_kl", "fid", "precision", "recall", "artifact_rate",
           "saturated_rate", "seconds")
GRID_IMAGES = 64
TRACE_SAMPLES = 40
TABLE = Table(("class",), METHODS, METRICS,
              {"class": lambda r: r["class"], "class_name": lambda r: CLASS_NAMES[r["class"]]})


def parse_methods(text: str, methods=METHODS) -> list[str]:
    """Comma-separated method names out of `methods`, checked and deduplicated in order."""
    chosen = list(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    unknown = [m for m in chosen if m not in methods]
    if unknown or not chosen:
        raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(methods)}")
    return chosen


def parse_scales(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated guidance scales, each a finite number >= 0 (checked as the rules check them)."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers, e.g. 1,3,10; got {text!r}") from None
    scales = tuple(dict.fromkeys(check_scale(option, v) for v in values))
    if not scales:
        raise ConfigError(f"{option} needs at least one scale, e.g. 1,3,10")
    return scales


def configs(methods: list[str], dng: list, np_scales=NP_SCALES) -> list[tuple[str, dict, object]]:
    """(method, params, rule or None) of every cell the methods ask for, for one removed class; `dng` is that
    class's DNG cells (`dng.bench.table.dng_cells`)."""
    cells = []
    for method in methods:
        if method == "data":
            cells.append((method, {}, "data"))
        elif method == "none":
            cells.append((method, {}, None))
        elif method == "np":
            cells += [(method, {"scale": s}, generate.make_rule("np", np_scale=s)) for s in np_scales]
        elif method == "sld":
            cells += [(method, {"preset": name, **preset}, generate.make_rule("sld", sld_preset=name))
                      for name, preset in SLD_PRESETS.items()]
        else:  # dng, dng-branches
            cells += [(method, dng_params(preset, user, config), generate.make_rule("dng", dng=config))
                      for preset, user, config in dng]
    return cells


def cell_key(klass: int, method: str, params: dict) -> str:
    return f"class{klass}-{setting_label(method, params).replace(' ', '-')}"


class Reference:
    """The classifier and the test split (its first `limit` images): scores samples against the kept classes, and
    flags sets of saturated noise or specks against the real images (`degeneracy`)."""

    def __init__(self, classifier, limit: int | None = None):
        self.classifier = classifier
        images, labels = load_split("test")
        self.images, self.labels = images[:limit], labels[:limit]
        self.artifact_threshold = metrics.artifact_threshold(self.images)
        self._features = None
        self._stats: dict[tuple, tuple] = {}

    @property
    def features(self) -> np.ndarray:
        """The classifier's features of the reference images (computed on first use: the degeneracy check needs
        none)."""
        if self._features is None:
            _, self._features = classify(self.classifier, self.images)
        return self._features

    def degeneracy(self, images: np.ndarray) -> dict:
        """artifact_rate and saturated_rate of uint8 samples, and whether they make the set degenerate
        (`dng.metrics.degenerate`): what `dng demo`, `dng sample` and both benches report."""
        artifacts = metrics.artifact_rate(images, self.artifact_threshold)
        saturated = metrics.saturated_rate(images, self.images)
        return {"artifact_rate": artifacts, "saturated_rate": saturated,
                "degenerate": metrics.degenerate(saturated, artifacts)}

    def metrics(self, removed: list[int], images: np.ndarray, pred: np.ndarray, feats: np.ndarray,
                seed: int = 0) -> dict:
        """forbidden_rate, class_kl, fid, precision, recall, and `degeneracy`, of uint8 samples with their
        predicted labels and features."""
        kept = [c for c in range(NUM_CLASSES) if c not in removed]
        mask = np.isin(self.labels, kept)
        key = tuple(removed)
        if key not in self._stats:
            self._stats[key] = metrics.gaussian_stats(self.features[mask])
        # k-NN precision/recall depend on the set sizes: compare against as many real images as samples.
        real = self.features[mask]
        pick = np.random.default_rng(seed).permutation(len(real))[: len(feats)]
        precision, recall = metrics.precision_recall(real[pick], feats)
        return {
            "forbidden_rate": metrics.safety(pred, removed),
            "class_kl": metrics.class_kl(pred, kept, metrics.class_distribution(self.labels, kept)),
            "fid": metrics.frechet_distance(*metrics.gaussian_stats(feats), *self._stats[key]),
            "precision": precision,
            "recall": recall,
            **self.degeneracy(images),
        }


class ClassRemovalBench:
    """One generator, classifier, scheduler and seed; `run(classes, methods)` fills DIR (`dng.bench.sweep`)."""

    def __init__(self, out, steps: int = GENERATOR_STEPS, num_samples: int = BENCH_IMAGES,
                 scheduler: str = GENERATOR_SAMPLER, seed: int = 0,
                 generator=None, classifier=None, batch_size: int = GENERATOR_BATCH, progress: bool = True,
                 dtype: str = "float32", world: World | None = None, calibration=None):
        if steps < 1 or num_samples < 4 or batch_size < 1:
            raise ConfigError(f"need --steps >= 1, --num-samples >= 4 and --batch-size >= 1, got {steps}, "
                              f"{num_samples} and {batch_size}")
        generator_sampler(scheduler)  # fails early on an unknown name
        check_dtype(dtype)
        gen_path = Path(generator) if generator else default_weights("generator")
        self.classifier_path = Path(classifier) if classifier else default_weights("classifier")
        self._reference = None
        # `calibration` as in `generator_calibration`: the file beside the generator by default.
        self.calibration, self.calibration_file = generator_calibration(calibration, gen_path)
        # The calibration is not in the settings: it only sets DNG's parameters, which every cell stores and `run`
        # checks (the folder records which calibration its DNG cells ran with, and `run` recomputes them under
        # another), so NP and SLD cells stay valid when the generator is recalibrated. The batch size is: the UNet's
        # arithmetic depends on the batch it runs in (in its last bits, and more under bfloat16).
        settings = {
            "steps": steps, "num_samples": num_samples, "scheduler": scheduler, "seed": seed, "dtype": dtype,
            "batch_size": batch_size,
            "generator_weights_sha256": weights_sha256(gen_path, "generator"),
            "classifier_weights_sha256": weights_sha256(self.classifier_path, "classifier"),
        }
        # The folder's settings are checked before any model loads; the generator loads when a shard is drawn.
        self.sweep = Sweep(out, settings, lambda: load_generator(gen_path), world, progress)
        self.out, self.settings = self.sweep.out, self.sweep.settings

    @property
    def reference(self) -> Reference:
        """The classifier and the test split, loaded when the first cell is scored."""
        if self._reference is None:
            with one_thread():  # the reference features, like every score, do not depend on the thread count
                self._reference = Reference(load_classifier(self.classifier_path))
        return self._reference

    def real_images(self, klass: int) -> np.ndarray:
        """`num_samples` train images of the classes other than `klass`, drawn with the sweep's seed."""
        images, labels = load_split("train")
        kept = np.flatnonzero(labels != klass)
        if len(kept) < self.settings["num_samples"]:
            raise ConfigError(f"the train split holds {len(kept)} images of the kept classes, fewer than "
                              f"--num-samples {self.settings['num_samples']}; lower --num-samples")
        pick = np.random.default_rng(self.settings["seed"]).choice(kept, self.settings["num_samples"], replace=False)
        return images[np.sort(pick)]


    def score_cell(self, klass: int, method: str, params: dict, sample_set: SampleSet | None) -> None:
        """Score one cell from its stored `sample_set` (real images for 'data', which has none) into DIR/cells."""
        key = cell_key(klass, method, params)
        arrays = {}
        if method == "data":
            images, seconds = self.real_images(klass), 0.0
        else:
            stored = self.sweep.load(sample_set)
            images, seconds = stored["images"], float(stored["seconds"])
            if "p" in stored:
                arrays.update(timesteps=stored["timesteps"], sigma=stored["sigma"],
                              p=stored["p"][:, :TRACE_SAMPLES, 0], scale=stored["scale"][:, :TRACE_SAMPLES, 0])
        pred, feats = classify(self.reference.classifier, images)
        row = {"class": klass, "method": method, "params": params,
               **self.reference.metrics([klass], images, pred, feats, self.settings["seed"]), "seconds": seconds}
        write_atomic(self.sweep.cell_path(key).with_suffix(".npz"),
                     npz_bytes(grid=images[:GRID_IMAGES], **arrays))
        counts = np.bincount(pred, minlength=NUM_CLASSES).tolist()
        write_json(self.sweep.cell_path(key), {"row": row, "counts": counts})

    def run(self, classes: list[int], methods: list[str], np_scales=NP_SCALES, dng_preset: str = "default",
            dng_set: dict | None = None, dng_scales=None) -> int:
        """Draw and score every missing cell, split over the ranks; returns how many cells were missing."""
        cells = [(k, *c) for k in classes
                 for c in configs(methods, [(dng_preset, *cell) for cell in dng_cells(
                     self.calibration, k, dng_preset, dng_set, dng_scales)], np_scales)]
        self.sweep.refuse_stale(
            {cell_key(k, method, params): params for k, method, params, _ in cells},
            calibration_record(self.calibration, self.calibration_file),
            {cell_key(k, method, params) for k, method, params, _ in cells if method in ("dng", "dng-branches")},
            dng_source(self.calibration, dng_preset, self.calibration_file))
        sets = {}
        for k, method, params, rule in cells:
            if method != "data":
                key = sample_set_key(k, method, params)
                sets[key] = SampleSet(key, rule, () if rule is None else (k,),
                                      class_posterior=method == "dng-branches", params=params)
        missing = [c for c in cells if not self.sweep.cell_path(cell_key(*c[:3])).is_file()]
        self.sweep.draw([sets[sample_set_key(*c[:3])] for c in missing if c[1] != "data"])
        by_key = {cell_key(*c[:3]): c for c in cells}
        self.sweep.score(list(by_key), lambda key: self.score_cell(
            *by_key[key][:3], sets.get(sample_set_key(*by_key[key][:3]))))
        return len(missing)


def sample_set_key(klass: int, method: str, params: dict) -> str:
    """The sample set a cell scores: the unguided samples are shared by every removed class."""
    return "none" if method == "none" else cell_key(klass, method, params)


def unguided_kl(counts, unguided_counts, klass: int) -> float:
    """KL(unguided samples' distribution over the kept classes || a cell's), from the two cells' class counts.

    0 for a perfect remover of this generator, whatever the generator's own class balance: it isolates what a
    rule does to the kept classes (the drain of the removed class's neighbours) from what `class_kl` also counts,
    the unguided model's imbalance against the data. Both counts are samples, so it carries their noise too.
    """
    kept = [c for c in range(NUM_CLASSES) if c != klass]
    pred = np.repeat(np.arange(NUM_CLASSES), np.asarray(counts, dtype=np.int64))
    return metrics.class_kl(pred, kept, np.asarray(unguided_counts, dtype=np.float64)[kept])


def load_cells(out) -> list[dict]:
    """Every stored cell of DIR, ordered by class, method and setting."""
    cells = TABLE.load(out)
    # Computed here rather than stored: a cell finished before its class's unguided cell gets it too.
    unguided = {c["row"]["class"]: c["counts"] for c in cells if c["row"]["method"] == "none"}
    for c in cells:
        row = c["row"]
        for metric in ("artifact_rate", "saturated_rate"):  # cells stored before they were measured
            row.setdefault(metric, None)
        row.setdefault("degenerate", metrics.degenerate(row["saturated_rate"], row["artifact_rate"]))
        klass = c["row"]["class"]
        c["row"]["unguided_kl"] = unguided_kl(c["counts"], unguided[klass], klass) if klass in unguided else None
    return cells


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over removed classes of every metric, one row per setting, with the parameters
    all its classes share, those that differ by class (a calibrated DNG's prior) and how many of its classes gave
    degenerate images (`dng.metrics.degenerate`)."""
    out = []
    for members in grouped(rows, TABLE.label).values():
        first = members[0]["params"]
        shared = {k: v for k, v in first.items() if all(m["params"].get(k) == v for m in members)}
        by_group = {k: {CLASS_NAMES[m["class"]]: m["params"].get(k) for m in members}
                    for k in first if k not in shared}
        out.append({"method": members[0]["method"], "params": shared, "by_group": by_group,
                    "classes": len(members), "degenerate": sum(bool(m.get("degenerate")) for m in members),
                    **TABLE.stats(members)})
    return out


def write_results(out) -> dict[str, Path]:
    """results.json, results.csv, summary.md and the figures, rebuilt from the stored cells."""
    from dng import plots  # matplotlib: an optional extra, and slow to import

    out = Path(out)
    cells = load_cells(out)
    rows = [c["row"] for c in cells]
    summary = summarize(TABLE.comparable(rows))
    files = TABLE.write(out, {"rows": rows, "summary": summary, "matched_removal": matched_removal(summary)}, rows,
                        format_summary(summary))
    figures = out / "figures"
    for x in ("class_kl", "unguided_kl", "fid"):
        known = [s for s in summary if s[x] is not None]
        if known:
            files[f"tradeoff_{x}"] = plots.removal_tradeoff(known, figures / f"tradeoff_{x}.png", x,
                                                            [TABLE.label(s) for s in known])
    for klass in sorted({r["class"] for r in rows}):
        mine = [c for c in cells if c["row"]["class"] == klass]
        files[f"histogram_{klass}"] = plots.class_histogram(mine, figures / "histograms" / f"class{klass}.png",
                                                            [TABLE.label(c["row"]) for c in mine])
        for c in mine:
            key = cell_key(klass, c["row"]["method"], c["row"]["params"])
            f = read_npz(out / "cells" / f"{key}.npz")
            save_png(grid(f["grid"]), figures / "grids" / f"{key}.png")
            if "p" in f:
                files[f"trajectories_{klass}"] = plots.trajectories(
                    stored_trace(f), figures / "trajectories" / f"{key}.png",
                    title=f"DNG removing {CLASS_NAMES[klass]}: posterior and scale per sample")
    return files


def matched_removal(summary: list[dict]) -> list[dict]:
    """The frontier's headline: for each NP and SLD setting, the DNG setting that removes at least as much (a mean
    forbidden rate no higher) with the least KL to unguided, or None where no DNG setting of the sweep reaches it;
    `kl_ratio` is how many times more the NP/SLD setting damages the kept classes than that DNG setting.

    `dng_kl_at_equal_removal` reads DNG's frontier at exactly the NP/SLD setting's forbidden rate: linear between
    the two DNG settings whose forbidden rates bracket it, the unguided samples standing for lam0 0 (None beyond
    DNG's strongest setting); `equal_removal_ratio` is the NP/SLD setting's KL over it."""
    dng = [s for s in summary if s["method"] == "dng" and None not in (s["forbidden_rate"], s["unguided_kl"])]
    unguided = [s for s in summary if s["method"] == "none" and s["forbidden_rate"] is not None]
    # DNG's frontier, by falling forbidden rate: the least KL where two settings forbid alike.
    points: dict[float, float] = {}
    for f, kl in [(s["forbidden_rate"], s["unguided_kl"]) for s in dng] + [(s["forbidden_rate"], 0.0)
                                                                            for s in unguided[:1] if dng]:
        points[f] = min(kl, points.get(f, kl))
    line = sorted(points.items(), reverse=True)
    out = []
    for s in summary:
        if s["method"] not in ("np", "sld") or None in (s["forbidden_rate"], s["unguided_kl"]):
            continue
        reach = [d for d in dng if d["forbidden_rate"] <= s["forbidden_rate"]]
        best = min(reach, key=lambda d: d["unguided_kl"], default=None)
        ratio = None if best is None or best["unguided_kl"] <= 0 else s["unguided_kl"] / best["unguided_kl"]
        at = _interpolate(line, s["forbidden_rate"])
        out.append({"setting": TABLE.label(s), "forbidden_rate": s["forbidden_rate"], "unguided_kl": s["unguided_kl"],
                    "fid": s["fid"], "dng": None if best is None else TABLE.label(best),
                    "dng_forbidden_rate": None if best is None else best["forbidden_rate"],
                    "dng_unguided_kl": None if best is None else best["unguided_kl"],
                    "dng_fid": None if best is None else best["fid"], "kl_ratio": ratio,
                    "dng_kl_at_equal_removal": at,
                    "equal_removal_ratio": None if not at else s["unguided_kl"] / at})
    return out


def _interpolate(line: list[tuple[float, float]], forbidden: float) -> float | None:
    """The KL of a frontier of (forbidden rate, KL) points, ordered by falling forbidden rate, at `forbidden`:
    linear between the points that bracket it; None outside the points' range."""
    for (f_a, kl_a), (f_b, kl_b) in zip(line, line[1:], strict=False):
        if f_b <= forbidden <= f_a:
            return kl_a if f_a == f_b else kl_a + (kl_b - kl_a) * (f_a - forbidden) / (f_a - f_b)
    return None


def format_matched(matches: list[dict]) -> str:
    """The headline table of summary.md: each NP/SLD setting beside the DNG setting that matches its removal."""
    def num(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    def times(v):
        return "-" if v is None else f"{v:.1f}x"

    lines = [[m["setting"], num(m["forbidden_rate"]), num(m["unguided_kl"]), num(m["fid"], 2),
              m["dng"] or "no DNG setting removes as much", num(m["dng_forbidden_rate"]), num(m["dng_unguided_kl"]),
              num(m["dng_fid"], 2), times(m["kl_ratio"]), num(m["dng_kl_at_equal_removal"]),
              times(m["equal_removal_ratio"])] for m in matches]
    header = ["setting", "forbidden rate", "KL to unguided", "FID", "DNG at that removal", "its forbidden rate",
              "its KL to unguided", "its FID", "KL ratio", "DNG's KL at equal removal", "ratio at equal removal"]
    return ("At matched removal (means over removed classes): the DNG setting that forbids no more than each NP or SLD "
            "setting, with the least damage to the kept classes; then DNG's KL read off its frontier at exactly that "
            "forbidden rate (linear between the DNG settings around it, the unguided samples as lam0 0).\n\n"
            + markdown(header, lines))


def format_summary(summary: list[dict]) -> str:
    """Markdown: the matched-removal headline (where the sweep has NP or SLD and DNG), then mean ± std over removed
    classes per setting; then the degenerate settings, and the DNG values in force of every DNG setting."""
    header = ["setting", "classes", "forbidden rate", "class KL", "KL to unguided", "FID", "precision", "recall",
              "artifacts", "saturated", "seconds"]
    table = markdown(header, [[TABLE.label(s), s["classes"], *(mean_std(s, m) for m in METRICS)] for s in summary])
    matches = matched_removal(summary)
    headline = format_matched(matches) + "\nEvery setting:\n\n" if any(m["dng"] for m in matches) else ""
    return headline + table + summary_notes(summary, "class", "classes", TABLE.label)
