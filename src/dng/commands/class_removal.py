"""`dng bench class-removal`."""

from __future__ import annotations

from dng.commands import (
    PER_PAIR_PRECISION_RECALL,
    add_dng_arguments,
    add_renamed,
    add_sweep_arguments,
    check_generator_dng,
    check_sweep_numbers,
    dng_changes,
    finish_sweep,
    generator_calibration_of,
    start_sweep,
)
from dng.defaults import DNG_LAM0S, NP_SCALES, as_text


def register(groups) -> None:
    p = groups["bench"].add_parser(
        "class-removal", help="remove one Fashion-MNIST class at a time: NP, SLD, DNG",
        description="Remove one Fashion-MNIST class at a time with each guidance rule and score the samples. "
                    "Under torchrun (torchrun --standalone --nproc-per-node N -m dng bench class-removal ...) the "
                    "ranks share the work and write the same results as one process.")
    p.add_argument("--classes", default="all", help="'all' or comma-separated indices or names, e.g. 3,7")
    p.add_argument("--methods", default="data,none,np,sld,dng",
                   help="comma-separated: data (real kept-class train images: the metrics' floor), none, np, sld, dng, "
                        "dng-branches (DNG with the model's own posterior from all eleven branches instead of "
                        "tracking: a reference, 5.5x the cost)")
    p.add_argument("--np-scales", default=None,
                   help=f"NP's scales, comma-separated (default {as_text(NP_SCALES)})")
    p.add_argument("--dng-lam0", dest="dng_scales", default=None,
                   help=f"a sweep of DNG's lam0, comma-separated (default: {as_text(DNG_LAM0S)} with the default "
                        "preset, the frontier; one cell at their own lam0 with the other presets)")
    add_renamed(p, "--dng-scales", "--dng-lam0", "dng_scales")
    add_dng_arguments(p)
    add_sweep_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_sweep_numbers(args)  # before the slow imports
    from dng.bench.class_removal import (
        ClassRemovalBench,
        parse_methods,
        parse_scales,
        write_results,
    )
    from dng.vision.data import parse_classes

    classes, methods = parse_classes(args.classes), parse_methods(args.methods)
    np_scales = parse_scales(args.np_scales, "--np-scales") if args.np_scales else NP_SCALES
    dng_scales = parse_scales(args.dng_scales, "--dng-lam0") if args.dng_scales else None
    if dng_scales is None and args.dng_preset == "default":
        dng_scales = DNG_LAM0S
    dng_set = dng_changes(args, check=False)
    generator_calibration_of(args)  # a --calibration file that cannot apply fails now
    if {"dng", "dng-branches"} & set(methods):
        check_generator_dng(args, [[k] for k in classes])
    # dng-branches evaluates the unconditional branch and every class's (`dng.vision.branches.ClassPosterior`).
    world = start_sweep(args, [classes, methods, np_scales, dng_scales, args.dng_preset, dng_set],
                        per_pair=PER_PAIR_PRECISION_RECALL, branches=11 if "dng-branches" in methods else 2)
    bench = ClassRemovalBench(args.out, args.steps, args.num_samples, args.scheduler, args.seed, args.generator,
                              args.classifier, args.batch_size, args.progress, args.dtype, world,
                              args.calibration)
    ran = bench.run(classes, methods, np_scales, args.dng_preset, dng_set, dng_scales)
    return finish_sweep(world, args.out, ran, write_results)
