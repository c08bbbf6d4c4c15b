"""`dng calibrate`: fit DNG's tracker (prior per class, temperature, offset) to the Fashion-MNIST generator."""

from __future__ import annotations

from dng.commands import (
    F32,
    FEATURES,
    U8,
    add_dtype_argument,
    add_mode_argument,
    add_renamed,
    add_scheduler_argument,
    check_generator_sampler,
    check_memory,
    check_out_file,
    check_seed,
    check_threads,
)


def register(groups) -> None:
    p = groups["top"].add_parser(
        "calibrate", help="fit DNG's prior, temperature and offset to the generator's own unguided chains",
        description="Samples unguided chains that track every class at once, labels the finished samples with the "
                    "classifier and fits the tracker by maximum likelihood (dng.calibration). Writes the fit beside "
                    "the generator (or --out); dng sample, demo and bench class-removal use it on every sampler "
                    "and step count, since its offset is a rate per unit of log-SNR.")
    p.add_argument("--classes", default="all", help="'all' or comma-separated indices or names")
    p.add_argument("--num-images", dest="num_samples", type=int, default=300, help="unguided chains (default 300)")
    add_renamed(p, "--num-samples", "--num-images", "num_samples", type=int)
    # The defaults are those the shipped calibration was made with.
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    add_scheduler_argument(p, "euler-a")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--p-max", type=float, default=0.95, help="the tracker's upper clamp the fit assumes")
    add_mode_argument(p, "independent", "the joint fit replays the clamp of this mode: exclusive for removing "
                                        "several classes at once, independent (default) for one class at a time")
    add_renamed(p, "--exclusive", "--mode exclusive", "mode", nargs=0, const="exclusive")
    p.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="calibration file (default: beside the generator)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dng.errors import ConfigError
    from dng.vision.data import CLASS_NAMES, parse_classes

    # The numbers first, before the slow imports.
    if args.num_samples < 10 or args.steps < 2:
        raise ConfigError(f"need --num-images >= 10 and --steps >= 2, got {args.num_samples} and {args.steps}")
    check_seed(args.seed)
    check_threads(args.threads)
    classes = parse_classes(args.classes)
    # Kept per chain: the noise, the samples, the classifier's input; the uint8 image and features; the trace of
    # every class (p, scale, llr) and the fit's float64 copies of it.
    per_image = 3 * F32 + U8 + FEATURES + (3 * 4 + 3 * 8) * args.steps * len(classes)
    check_memory("--num-images", args.num_samples, per_image, branches=1 + len(classes))

    import numpy as np
    import torch

    from dng import calibration
    from dng.config import check_probability
    from dng.vision.branches import check_dtype
    from dng.vision.generate import generate
    from dng.vision.images import classify, to_uint8
    from dng.vision.models import calibration_path, default_weights, load_classifier, load_generator, save_calibration
    from dng.vision.seeding import seeded_noise

    check_probability("--p-max", args.p_max)
    check_dtype(args.dtype)
    check_generator_sampler(args)
    out = check_out_file(args.out or calibration_path(args.generator))
    if args.threads:
        torch.set_num_threads(args.threads)
    unet, classifier = load_generator(args.generator), load_classifier(args.classifier)
    noise = seeded_noise(args.seed, 0, args.num_samples)
    # One unguided chain tracks every class at once: each negative branch has its own llr in the trace.
    x, trace = generate(unet, noise, scheduler=args.scheduler, guidance=calibration.tracking_only(), negatives=classes,
                        steps=args.steps, seed=args.seed, progress=True, dtype=args.dtype)
    labels, _ = classify(classifier, to_uint8(x))
    gains = calibration.log_snr_gains(trace.sigma)
    outcome = torch.from_numpy(labels[:, None] == np.array(classes)[None])
    # A class the generator (almost) never makes has no outcomes to fit: it keeps the preset's prior.
    enough = [j for j in range(len(classes)) if 5 <= int(outcome[:, j].sum()) <= len(labels) - 5]
    for j in sorted(set(range(len(classes))) - set(enough)):
        print(f"{CLASS_NAMES[classes[j]]}: {int(outcome[:, j].sum())} of {len(labels)} samples, too few to fit; left "
              "out")
    if not enough:
        raise ConfigError("no class has 5 samples of each outcome; draw more --num-samples")
    # The joint fit pools the temperature and offset over the classes; it replays the clamp of the mode it is for.
    fits = {"all": calibration.fit(trace.llr[:, :, enough], gains, outcome[:, enough], p_max=args.p_max,
                                   exclusive=args.mode == "exclusive")}
    fits.update({CLASS_NAMES[classes[j]]: calibration.fit(trace.llr[:, :, [j]], gains, outcome[:, [j]],
                                                          p_max=args.p_max) for j in enough})
    print(f"{'class':<12} {'share':>6} {'prior':>7} {'temp':>6} {'offset':>9} {'nll/base':>8}  AUC at "
          + " ".join(f"{q:.0%}" for q in calibration.REPORT_AT))
    for name, fit in fits.items():
        aucs = " ".join(f"{np.mean(a):.2f}" for a in fit.auc.values())
        print(f"{name:<12} {np.mean(fit.positives) / fit.samples:6.3f} {np.mean(fit.priors):7.3f} "
              f"{fit.temperature:6.3f} {fit.offset:9.2e} {fit.nll / fit.baseline_nll:8.3f}  {aucs}")
    made_from = {k: getattr(args, k) for k in ("classes", "num_samples", "steps", "scheduler", "seed", "p_max",
                                               "mode", "generator", "dtype")}
    save_calibration(out, fits, [classes[j] for j in enough], made_from,
                     generator=args.generator or default_weights("generator"))
    print(f"wrote {out}")
    return 0
