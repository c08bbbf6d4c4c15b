"""`dng bench class-removal`."""

from __future__ import annotations

from dng.commands import add_dng_arguments, add_dtype_argument, add_scheduler_argument, dng_overrides


def register(groups) -> None:
    p = groups["bench"].add_parser(
        "class-removal", help="remove one Fashion-MNIST class at a time: NP, SLD, DNG",
        description="Remove one Fashion-MNIST class at a time with each guidance rule and score the samples. "
                    "Under torchrun (torchrun --standalone --nproc-per-node N -m dng bench class-removal ...) the "
                    "ranks share the work and write the same results as one process.")
    p.add_argument("--classes", default="all", help="'all' or comma-separated indices or names, e.g. 3,7")
    p.add_argument("--methods", default="data,none,np,sld,dng",
                   help="comma-separated: data (real kept-class train images: the metrics' floor), none, np, sld, dng")
    p.add_argument("--np-scales", default=None, help="NP's scales, comma-separated (default 0.5,1,2)")
    p.add_argument("--dng-scales", default=None,
                   help="a sweep of DNG's lam0, comma-separated (default: one cell, the preset's own)")
    add_dng_arguments(p)
    p.add_argument("--num-samples", type=int, default=500, help="samples per cell")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    add_scheduler_argument(p, "euler-a")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="sweep folder: cells, results.json, results.csv, figures")
    p.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per sampler run and per shard (bounds memory; part of the sweep's settings, since "
                        "the UNet's arithmetic depends on the batch it runs in)")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's choice; under torchrun the cores shared "
                        "among the local ranks)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from dng.bench.class_removal import (
        NP_SCALES,
        ClassRemovalBench,
        parse_methods,
        parse_scales,
        write_results,
    )
    from dng.bench.sweep import threads_per_rank
    from dng.distributed import World
    from dng.vision.generate import parse_classes

    classes, methods = parse_classes(args.classes), parse_methods(args.methods)
    np_scales = parse_scales(args.np_scales, "--np-scales") if args.np_scales else NP_SCALES
    dng_scales = parse_scales(args.dng_scales, "--dng-scales") if args.dng_scales else None
    dng_set = dng_overrides(args)
    world = World.from_env()
    threads_per_rank(world, args.threads)
    world.check_same([classes, methods, np_scales, dng_scales, args.dng_preset, dng_set], "the cells to run")
    bench = ClassRemovalBench(args.out, args.steps, args.num_samples, args.scheduler, args.seed, args.generator,
                              args.classifier, args.batch_size, args.progress, args.dtype, world)
    ran = bench.run(classes, methods, np_scales, args.dng_preset, dng_set, dng_scales)
    if not world.main:
        return 0
    files = write_results(args.out)
    print((bench.out / "summary.md").read_text())
    print(f"ran {ran} cell(s); wrote {files['results']}, {files['csv']} and figures in {bench.out / 'figures'}")
    return 0
