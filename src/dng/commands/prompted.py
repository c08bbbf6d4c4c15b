"""`dng bench prompted`."""

from __future__ import annotations

from dng.commands import (
    FEATURES,
    U8,
    add_dng_arguments,
    add_renamed,
    add_sweep_arguments,
    check_generator_dng,
    check_sweep_numbers,
    dng_changes,
    finish_sweep,
    generator_calibration_of,
    start_sweep,
    sweep_bytes_per_image,
)
from dng.defaults import CFG_SCALE, NP_FACTORS, as_text

# The pairs `dng bench prompted` runs by default: one related and unrelated negative each for four positives.
DEFAULT_PAIRS = "Trouser:Bag,Shirt:T-shirt/top,Pullover:Coat,Sneaker:Ankle boot"


def register(groups) -> None:
    p = groups["bench"].add_parser(
        "prompted", help="a positive class with CFG against a related or unrelated negative: CFG, NP, DNG",
        description="The text-to-image situation on the shipped generator: CFG on a positive class, a negative "
                    "class, and each rule's effect on the CFG images from the same noise. Under torchrun the ranks "
                    "share the work and write the same results as one process.")
    p.add_argument("--pairs", default=DEFAULT_PAIRS,
                   help=f"comma-separated POSITIVE:NEGATIVE classes (names or indices), or 'all' (every ordered pair "
                        f"of distinct classes); default {DEFAULT_PAIRS!r}")
    p.add_argument("--methods", default="cfg,np,dng", help="comma-separated: cfg, np, dng (cfg always runs)")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE,
                   help=f"CFG scale w on the positive class (default {CFG_SCALE:g})")
    p.add_argument("--np-scales", default=None,
                   help=f"NP's scales lam, comma-separated (default (w-1) x {as_text(NP_FACTORS)}; lam = w-1 is "
                        "diffusers' negative prompt)")
    p.add_argument("--dng-lam0", dest="dng_scales", default=None,
                   help="a sweep of DNG's lam0 (default: one cell, the preset's own)")
    add_renamed(p, "--dng-scales", "--dng-lam0", "dng_scales")
    add_dng_arguments(p)
    add_sweep_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_sweep_numbers(args)  # before the slow imports
    from dng.bench.class_removal import parse_methods, parse_scales
    from dng.bench.prompted import METHODS, PromptedBench, parse_pairs, write_results

    pairs, methods = parse_pairs(args.pairs), parse_methods(args.methods, METHODS)
    np_scales = parse_scales(args.np_scales, "--np-scales") if args.np_scales else None
    dng_scales = parse_scales(args.dng_scales, "--dng-lam0") if args.dng_scales else None
    dng_set = dng_changes(args, check=False)
    generator_calibration_of(args)  # a --calibration file that cannot apply fails now
    if "dng" in methods:
        check_generator_dng(args, [[negative] for _, negative in pairs])
    # Beyond a sweep's sample set: the float64 copies of a cell's and CFG's images that change_vs_cfg compares, FID's
    # float64 features, and the CFG sets of every positive class, which stay in memory with their features.
    positives = len({k for k, _ in pairs})
    per_image = sweep_bytes_per_image(args.steps) + 4 * 8 * U8 + 2 * FEATURES + positives * (U8 + FEATURES)
    world = start_sweep(args, [pairs, methods, np_scales, dng_scales, args.dng_preset, dng_set], per_image=per_image,
                        branches=3)
    bench = PromptedBench(args.out, args.steps, args.num_samples, args.scheduler, args.seed, args.cfg_scale,
                          args.generator, args.classifier, args.batch_size, args.progress, args.dtype, world,
                          args.calibration)
    ran = bench.run(pairs, methods, np_scales, args.dng_preset, dng_set, dng_scales)
    return finish_sweep(world, args.out, ran, write_results)
