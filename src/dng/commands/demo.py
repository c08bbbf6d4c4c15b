"""`dng demo`: remove one class from the shipped generator with no guidance, NP and DNG from the same noise, NP and
DNG at about the same removal."""

from __future__ import annotations

from dng.commands import (
    CHECK,
    F32,
    FEATURES,
    PER_PAIR_PRECISION_RECALL,
    U8,
    add_dng_arguments,
    add_dtype_argument,
    add_scheduler_argument,
    check_count,
    check_generator_sampler,
    check_memory,
    check_out_dir,
    check_seed,
    check_threads,
    generator_dng,
)
from dng.defaults import GENERATOR_SAMPLER, GENERATOR_STEPS

# A distinctive silhouette the shipped generator makes often (about 11 % of its unguided samples).
DEFAULT_REMOVE = "Bag"
# NP at 1 removes nearly everything and bends the kept classes; DNG's strict preset removes about as much (to the
# classifier's floor) with a fraction of NP's damage: the two at matched removal (docs/RESULTS.md, "The frontier").
NP_SCALE = 1.0
DNG_PRESET = "strict"
STEPS, SCHEDULER = GENERATOR_STEPS, GENERATOR_SAMPLER
# A few dozen samples cannot resolve FID finer than 2000 reference images do; the whole test split costs ~10 s more.
REFERENCE_IMAGES = 2000


def register(groups) -> None:
    p = groups["top"].add_parser("demo", help="remove one class with no guidance, NP and DNG; grids and a report")
    p.add_argument("--remove", default=DEFAULT_REMOVE, help=f"class name or index (default {DEFAULT_REMOVE})")
    p.add_argument("--num-images", type=int, default=40,
                   help="per method (default %(default)s: under 2 minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    add_scheduler_argument(p, SCHEDULER)
    p.add_argument("--np-scale", type=float, default=NP_SCALE, help=f"NP's scale (default {NP_SCALE:g})")
    add_dng_arguments(p, preset=DNG_PRESET)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="folder for the grids, figures and report")
    p.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    started = time.perf_counter()
    # The numbers first, before the slow imports.
    check_threads(args.threads)
    check_count("--num-images", args.num_images, 4)
    check_seed(args.seed)
    check_memory("--num-images", args.num_images, bytes_per_image(args.steps), per_pair=PER_PAIR_PRECISION_RECALL)

    import torch

    from dng import plots
    from dng.bench.class_removal import Reference
    from dng.config import check_scale
    from dng.io import write_atomic, write_json
    from dng.vision import generate
    from dng.vision.branches import check_dtype
    from dng.vision.data import CLASS_NAMES, parse_class
    from dng.vision.images import classify, grid, save_png, to_uint8
    from dng.vision.models import load_classifier, load_generator

    klass = parse_class(args.remove)
    check_generator_sampler(args)
    check_scale("--np-scale", args.np_scale)
    check_dtype(args.dtype)
    out = check_out_dir(args.out)
    # Every rule is built before any sampling, with the generator's calibration, so that a bad setting fails now.
    config, dng_source = generator_dng(args, [klass])
    methods = {"none": {}, "np": {"scale": args.np_scale}, "dng": {"preset": args.dng_preset, **config.to_dict()}}
    rules = {"none": None, "np": generate.make_rule("np", np_scale=args.np_scale),
             "dng": generate.make_rule("dng", dng=config)}
    if args.threads:
        torch.set_num_threads(args.threads)
    unet, classifier = load_generator(args.generator), load_classifier(args.classifier)
    reference = Reference(classifier, REFERENCE_IMAGES)
    noise = torch.randn(args.num_images, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    results, grids, trace = {}, {}, None
    for name, params in methods.items():
        t0 = time.perf_counter()
        x, tr = generate.generate(unet, noise, scheduler=args.scheduler, guidance=rules[name], negatives=[klass],
                                  steps=args.steps, seed=args.seed, progress=args.progress, dtype=args.dtype)
        images = to_uint8(x)
        pred, feats = classify(classifier, images)
        results[name] = {"params": params, **reference.metrics([klass], images, pred, feats, args.seed),
                         "seconds": time.perf_counter() - t0}
        grids[name] = grid(images)
        trace = tr if name == "dng" else trace
    # Written only once every method has sampled: a run that fails (a NaN model, say) leaves no partial result.
    for name, tiles in grids.items():
        save_png(tiles, out / f"grid_{name}.png")
    files = {
        "comparison": side_by_side(grids, results, CLASS_NAMES[klass], out / "comparison.png"),
        "trajectories": plots.trajectories(trace, out / "dng_trajectories.png",
                                           title=f"DNG removing {CLASS_NAMES[klass]}: posterior and scale per sample"),
        **{f"grid_{name}": out / f"grid_{name}.png" for name in methods},
    }
    report = {"removed": klass, "removed_name": CLASS_NAMES[klass], "num_images": args.num_images,
              "steps": args.steps, "seed": args.seed, "scheduler": args.scheduler, "dtype": args.dtype,
              "dng_settings_from": dng_source,
              "methods": results, "degenerate": degenerate(results),
              "seconds": time.perf_counter() - started}
    files["report_json"] = out / "report.json"
    files["report_md"] = out / "report.md"
    report["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["report_json"], report)
    text = format_report(report)
    write_atomic(files["report_md"], text)
    print(text)
    print(f"wrote {out}/: comparison.png (grids side by side), dng_trajectories.png, report.md, report.json")
    return 0


def bytes_per_image(steps: int) -> int:
    """What the demo keeps per image (`check_memory`): the noise; per method the float32 samples, the uint8 images and
    grid, the classifier's features; DNG's trace (p, scale, llr per step); the classifier's input and the degeneracy
    check of one method at a time."""
    return F32 + 3 * (F32 + 2 * U8 + FEATURES) + 3 * 4 * steps + F32 + CHECK


def side_by_side(grids: dict, results: dict, class_name: str, path):
    """The methods' grids next to each other, titled with their forbidden rate."""
    from dng.plots import grids_side_by_side

    h, w = next(iter(grids.values())).shape
    panels = [(f"{name}: {results[name]['forbidden_rate']:.0%} {class_name}", grid) for name, grid in grids.items()]
    return grids_side_by_side(panels, path, f"Removing {class_name}: same noise, same step noise", 4, 4 * h / w + 0.9)


def degenerate(results: dict) -> list[str]:
    """The methods most of whose images are saturated noise or speckled (`dng.metrics.degenerate`)."""
    from dng.metrics import degenerate

    return [name for name, m in results.items() if degenerate(m["saturated_rate"], m["artifact_rate"])]


def format_report(report: dict) -> str:
    from dng.bench.table import degenerate_warning, dng_values
    from dng.metrics import DEGENERATE_SHARE

    rows = "\n".join(
        f"| {name} | {m['forbidden_rate']:.3f} | {m['class_kl']:.4f} | {m['fid']:.2f} | {m['precision']:.2f} | "
        f"{m['recall']:.2f} | {m['artifact_rate']:.3f} | {m['saturated_rate']:.3f} | {m['seconds']:.1f} |"
        for name, m in report["methods"].items()
    )
    shares = {name: max(m["saturated_rate"], m["artifact_rate"]) for name, m in report["methods"].items()}
    warnings = "".join(f"\n**{degenerate_warning(name, f'{shares[name]:.0%} of its images', name)}.**\n"
                       for name in report["methods"] if name in report["degenerate"])
    dng = dng_values(report["methods"]["dng"]["params"])
    return f"""# dng demo: removing {report["removed_name"]} (class {report["removed"]})

{report["num_images"]} images per method, {report["steps"]} {report["scheduler"]} steps, seed {report["seed"]}; every
method starts from the same noise. Metrics from the shipped classifier against the kept classes' images among the first
{REFERENCE_IMAGES} test images.

| method | forbidden rate | class KL | FID | precision | recall | artifacts | saturated | seconds |
|---|---|---|---|---|---|---|---|---|
{rows}
{warnings}
- forbidden rate: share of images classified as {report["removed_name"]} (0 is the goal).
- class KL: KL(test distribution over the kept classes || generated); low means the other classes stay balanced.
- artifacts, saturated: share of images with specks on the background, or with more full-white pixels than any
  test image (the noise of a scale far too large); a method at {DEGENERATE_SHARE:.0%} or more of either is flagged.
- DNG: {dng} ({report["dng_settings_from"]}).
- NP: scale {report["methods"]["np"]["params"]["scale"]:.3g}. On the benchmark DNG's strict preset and NP at 1 both
  remove the class to the classifier's floor (docs/RESULTS.md, "The frontier"): compare what each does to the
  other classes.
- FID, precision, recall: in the classifier's feature space; with {report["num_images"]} images FID is biased
  upwards, so compare the methods with each other only (`dng bench class-removal` uses 500 per cell).

Figures: `comparison.png` (the grids side by side), `dng_trajectories.png` (DNG's posterior p_t and the
scale it applied, per sample, over the steps). Total time {report["seconds"]:.0f} s.
"""
