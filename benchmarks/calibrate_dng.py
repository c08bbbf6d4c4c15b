"""Fit DNG's prior, temperature and offset to the shipped Fashion-MNIST generator, per removed class.

Draws unguided samples with a tracking-only rule for every class at once, labels them with the shipped classifier
and fits the tracker (dng.calibration): jointly ("all": one prior per class, one temperature and offset) and per
class. Prints the fitted values, the likelihood relative to a constant p (1 = the tracker tells nothing) and the
AUC of the fitted p_t at several points of the chain (how early the tracker knows which samples become the class).
The calibration file keeps one fit per scheduler and step count (the offset is per step): calibrating for 150 steps
adds to a 50-step calibration rather than replacing it.

Run: .venv/bin/python benchmarks/calibrate_dng.py [--classes all] [--num-samples 300] [--steps 50] [--out FILE]
     [--dtype bfloat16]  (the UNet under bfloat16 autocast: about twice as fast on CPUs with AMX)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dng import calibration
from dng.guidance import DynamicNegativeGuidance
from dng.io import write_atomic
from dng.vision.data import CLASS_NAMES
from dng.vision.generate import classify, generate, make_scheduler, npz_bytes, parse_classes, to_uint8
from dng.vision.models import calibration_path, load_classifier, load_generator, save_calibration


def tracking_only():
    # Scale 0 leaves the chain unguided; temperature 1 and offset 0 make the trace's llr the raw log-ratio.
    return DynamicNegativeGuidance(0.0, 0.5, temperature=1.0, offset=0.0, p_min=1e-30, p_max=1 - 1e-6)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", default="all")
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddpm")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--p-max", type=float, default=0.95)
    parser.add_argument("--generator")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="the UNet's arithmetic: float32 or bfloat16")
    parser.add_argument("--chains", default="runs/calibration-chains.npz", help="where the sampled chains are kept")
    parser.add_argument("--reuse", action="store_true", help="refit the chains saved by an earlier run")
    parser.add_argument("--out", default=None,
                        help="calibration file (default: beside the generator, where sampling looks for it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unet, classifier = load_generator(args.generator), load_classifier(None)
    noise = torch.randn(args.num_samples, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    scheduler, eta = make_scheduler(args.scheduler)
    variances = calibration.kernel_variances(scheduler, eta, args.steps)
    classes = parse_classes(args.classes)
    out = Path(args.out or calibration_path(args.generator))
    # The chains (not shipped) let a refit skip the sampling; they must come from the same request.
    key = np.array([args.num_samples, args.steps, args.seed, *classes])
    source = f"{args.scheduler} {args.dtype} {args.generator or 'shipped generator'}"
    chains = Path(args.chains)
    if args.reuse and chains.is_file():
        with np.load(chains) as f:
            if f["key"].tolist() != key.tolist() or str(f["source"]) != source:
                raise SystemExit(f"{chains} holds chains of other settings; run without --reuse")
            llr, labels = torch.from_numpy(f["llr"]), f["labels"]
    else:
        # One unguided chain tracks every class at once: each negative branch has its own llr in the trace.
        x, trace = generate(unet, args.scheduler, tracking_only, classes, noise, args.steps, args.seed,
                            progress=True, dtype=args.dtype)
        llr, (labels, _) = trace.llr, classify(classifier, to_uint8(x))
        write_atomic(chains, npz_bytes(llr=llr.numpy(), labels=labels, key=key, source=np.array(source)))
    outcome = torch.from_numpy(labels[:, None] == np.array(classes)[None])
    # A class the generator (almost) never makes has no outcomes to fit: it keeps the library's prior.
    enough = [j for j in range(len(classes)) if 5 <= int(outcome[:, j].sum()) <= len(labels) - 5]
    for j in sorted(set(range(len(classes))) - set(enough)):
        print(f"{CLASS_NAMES[classes[j]]}: {int(outcome[:, j].sum())} of {len(labels)} samples, too few to fit; "
              "left out")
    fits = {"all": calibration.fit(llr[:, :, enough], variances, outcome[:, enough], p_max=args.p_max)}
    fits.update({CLASS_NAMES[classes[j]]: calibration.fit(llr[:, :, [j]], variances, outcome[:, [j]],
                                                          p_max=args.p_max) for j in enough})
    classes = [classes[j] for j in enough]
    print(f"{'class':<12} {'share':>6} {'prior':>7} {'temp':>6} {'offset':>9} {'nll/base':>8}  AUC at "
          + " ".join(f"{q:.0%}" for q in calibration.REPORT_AT))
    for name, fit in fits.items():
        share = np.mean(fit.positives) / fit.samples
        prior = np.mean(fit.priors)
        aucs = " ".join(f"{np.mean(a):.2f}" for a in fit.auc.values())
        print(f"{name:<12} {share:6.3f} {prior:7.3f} {fit.temperature:6.3f} {fit.offset:9.2e} "
              f"{fit.nll / fit.baseline_nll:8.3f}  {aucs}")
    # What the fit was made from; not where its files went (--out, --chains, --reuse, --threads).
    made_from = {k: v for k, v in vars(args).items() if k not in ("out", "chains", "reuse", "threads")}
    save_calibration(out, fits, classes, made_from)
    used = (f" (dng sample, demo and bench class-removal use it for {args.scheduler} with {args.steps} steps)"
            if out.resolve() == calibration_path(args.generator).resolve() else "")
    print(f"wrote {out}{used}")


if __name__ == "__main__":
    main()
