"""`dng sample`: images from the shipped generator with a guidance rule, as a PNG grid and an .npz."""

from __future__ import annotations

import sys

from dng.commands import (
    CHECK,
    F32,
    FEATURES,
    U8,
    add_dng_arguments,
    add_dtype_argument,
    add_mode_argument,
    add_scheduler_argument,
    check_count,
    check_generator_sampler,
    check_memory,
    check_out_dir,
    check_seed,
    check_threads,
    dng_changes,
    generator_dng,
)
from dng.defaults import CFG_SCALE, GENERATOR_BATCH, GENERATOR_SAMPLER, GENERATOR_STEPS, SLD_PRESET
from dng.errors import ConfigError

# What `dng sample` keeps per image (`check_memory`): the float32 samples of the batches, their concatenation and the
# classifier's input; the uint8 images, the grid and the .npz; the classifier's features; the degeneracy check.
BYTES_PER_IMAGE = 3 * F32 + 3 * U8 + FEATURES + CHECK


def register(groups) -> None:
    p = groups["top"].add_parser("sample", help="generate Fashion-MNIST images with classes removed")
    p.add_argument("--method", default=None, help="none, np, sld or dng (default: dng with --remove, else none)")
    p.add_argument("--remove", default=None, help="classes to remove: names or indices, comma-separated")
    p.add_argument("--class", dest="klass", default=None, help="class-conditional sampling (CFG) of this class")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="CFG scale with --class (default %(default)g)")
    p.add_argument("--scale", type=float, default=1.0, help="NP's scale (default %(default)g)")
    p.add_argument("--preset", default=SLD_PRESET, help="SLD preset: weak, medium, strong, max (default %(default)s)")
    add_dng_arguments(p)
    add_mode_argument(p, None, "default exclusive for several --remove classes")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=GENERATOR_STEPS, help="sampling steps (default %(default)s)")
    add_scheduler_argument(p, GENERATOR_SAMPLER)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for grid.png and samples.npz (images, predicted labels)")
    p.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    add_dtype_argument(p)
    p.add_argument("--batch-size", type=int, default=GENERATOR_BATCH,
                   help="images per sampler run; under torchrun the ranks take the batches in turns (the images "
                        "are those of one process with the same --batch-size)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's choice; under torchrun the cores shared "
                        "among the local ranks)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from dng.vision.data import CLASS_NAMES, parse_class, parse_classes

    # The numbers first, before the slow imports.
    check_threads(args.threads)
    check_count("--num-images", args.num_images)
    check_count("--batch-size", args.batch_size)
    check_seed(args.seed)
    removed = parse_classes(args.remove) if args.remove else []
    method = (args.method or ("dng" if removed else "none")).strip().lower()
    positive = parse_class(args.klass) if args.klass is not None else None
    branches = 1 + (positive is not None) + (len(removed) if method != "none" else 0)
    check_memory("--num-images", args.num_images, BYTES_PER_IMAGE, batch=args.batch_size, branches=branches,
                 batch_option="--batch-size")

    import json

    import numpy as np
    import torch

    from dng.bench.class_removal import Reference
    from dng.bench.table import degenerate_warning, dng_values, setting_label
    from dng.commands.demo import REFERENCE_IMAGES
    from dng.config import check_scale
    from dng.distributed import World, gather, shard, threads_per_rank
    from dng.io import write_atomic
    from dng.vision import generate
    from dng.vision.branches import check_dtype
    from dng.vision.images import classify, grid, npz_bytes, save_png, to_uint8
    from dng.vision.models import load_classifier, load_generator
    from dng.vision.seeding import seeded_noise

    if method in generate.GUIDED and not removed:
        raise ConfigError(f"--method {method} needs --remove (a class name or index, e.g. Trouser)")
    check_scale("--scale", args.scale)
    check_scale("--cfg-scale", args.cfg_scale)
    check_generator_sampler(args)
    config = None
    if method == "dng":
        config, source = generator_dng(args, removed, **({"mode": args.mode} if args.mode else {}))
    rule = generate.make_rule(method, np_scale=args.scale, sld_preset=args.preset, dng=config)
    if rule is not None:
        # One --dng prior for several exclusive classes is checked here as their sum, before any model loads.
        rule.check(len(removed))
    if positive in removed:
        raise ConfigError(f"--class {CLASS_NAMES[positive]} is also removed")
    check_dtype(args.dtype)
    out = check_out_dir(args.out)
    world = World.from_env()
    threads_per_rank(world, args.threads)
    world.check_same([vars(args)[k] for k in sorted(vars(args)) if k != "func"], "the command line")
    # What ran, as the .npz records it: the method and every value of its rule.
    params = {"none": {}, "np": {"scale": args.scale}, "sld": {"preset": args.preset},
              "dng": {"preset": args.dng_preset, "set": dng_changes(args, check=False),
                      **config.to_dict()} if config is not None else {}}.get(method, {})
    if config is not None and world.main:
        print(f"DNG {args.dng_preset} ({source}): {dng_values(config.to_dict())}")
    unet, classifier = load_generator(args.generator).to(world.device), load_classifier(args.classifier)
    # Batches of --batch-size in turns over the ranks; each image's noise depends on the seed and its index only.
    starts = range(0, args.num_images, args.batch_size)
    parts = []
    for start in shard(starts, world):
        count = min(args.batch_size, args.num_images - start)
        noise = seeded_noise(args.seed, start, count).to(world.device)
        x, _ = generate.generate(unet, noise, scheduler=args.scheduler, guidance=rule, negatives=removed,
                                 steps=args.steps, seed=args.seed, positive=positive, cfg_scale=args.cfg_scale,
                                 chunk=args.batch_size, progress=args.progress and world.main, dtype=args.dtype,
                                 first_index=start)
        parts.append(x.cpu())
    parts = gather(parts, world)
    if not world.main:
        return 0
    x = torch.cat(parts)
    images = to_uint8(x)
    labels, _ = classify(classifier, images)
    # Saturated noise or specks (a scale far too large) are flagged as `dng demo` and the benches flag them.
    flags = Reference(classifier, REFERENCE_IMAGES).degeneracy(images)
    png = out / "grid.png"
    save_png(grid(images), png)
    settings = {"method": method, "params": params, "class": positive,
                "cfg_scale": args.cfg_scale if positive is not None else None, "seed": args.seed,
                "steps": args.steps, "scheduler": args.scheduler, "dtype": args.dtype, "batch_size": args.batch_size}
    npz = write_atomic(out / "samples.npz", npz_bytes(
        images=images, labels=labels, removed=np.array(removed, dtype=np.int64),
        settings=np.array(json.dumps(settings)), **{k: np.array(v) for k, v in flags.items()}))
    shares = np.bincount(labels, minlength=len(CLASS_NAMES)) / len(labels)
    print("classified as: " + ", ".join(f"{n} {s:.0%}" for n, s in zip(CLASS_NAMES, shares, strict=True) if s))
    if removed:
        print(f"removed classes: {np.isin(labels, removed).mean():.1%} of the images")
    print(f"saturated noise: {flags['saturated_rate']:.0%} of the images, speckled: {flags['artifact_rate']:.0%}")
    if flags["degenerate"]:
        share = max(flags["saturated_rate"], flags["artifact_rate"])
        warning = degenerate_warning(setting_label(method, params, "g"), f"{share:.0%} of its images", method)
        print(f"dng: warning: {warning}", file=sys.stderr)
    print(f"wrote {png} and {npz}")
    return 0
