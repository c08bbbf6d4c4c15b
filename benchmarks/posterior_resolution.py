"""How well does the tracked p know the class, against the model's own posterior from every class branch?

Unguided chains of the shipped generator with all eleven branches evaluated at every step. Two posteriors of each
class along the same chains: the tracker's (the shipped calibration replayed over the step's raw log-likelihood
ratios, `dng.calibration.trajectory`, one class at a time as DNG removes one) and the mixture weights of the
branches (`dng.posterior.mixture_weights`, what `dng bench class-removal --methods dng-branches` guides with).
Scored against the class each chain ends in (the classifier's label): the AUC, and the mean odds p/(1-p) (the
factor DNG applies) of samples that end in the class and of those that do not, at fractions of the chain.

Run: .venv/bin/python benchmarks/posterior_resolution.py --scheduler euler-a --steps 25 --num-samples 300
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from dng import calibration
from dng.calibration import tracking_only
from dng.io import write_json
from dng.posterior import mixture_weights
from dng.sampler import sample
from dng.vision.branches import ClassBranches
from dng.vision.data import CLASS_NAMES, NUM_CLASSES
from dng.vision.images import classify, to_uint8
from dng.vision.models import NULL_LABEL, generator_sampler, load_calibration, load_classifier, load_generator
from dng.vision.seeding import sample_generators, seeded_noise


def chains(unet, scheduler_name, steps, noise, seed, dtype, chunk=100):
    """(final samples, raw llr [steps, N, classes], sigma [steps, 2], branch p [steps, N, classes])."""
    xs, llrs, branch = [], [], []
    for start in range(0, len(noise), chunk):
        model = ClassBranches(unet, [NULL_LABEL, *range(NUM_CLASSES)], dtype, every_class=True)
        scheduler, eta = generator_sampler(scheduler_name)
        seen = []

        def record(i, t, x_prev, info, model=model, seen=seen):
            seen.append(mixture_weights(model.last[NULL_LABEL], model.last[:NUM_CLASSES]))

        x_T = noise[start : start + chunk]
        out = sample(model, scheduler, tracking_only(), noise=x_T, num_inference_steps=steps,
                     num_negatives=NUM_CLASSES, eta=eta, generator=sample_generators(seed, start, len(x_T), 1),
                     callback=record, progress=False, return_trace=True)
        xs.append(out.samples.clamp(-1, 1))
        llrs.append(out.trace.llr)
        branch.append(torch.stack(seen))
        sigma = out.trace.sigma
    return torch.cat(xs), torch.cat(llrs, 1), sigma, torch.cat(branch, 1)


def scores(p, outcome):
    """Mean over classes of the AUC, and of the mean capped odds of the class's own samples and of the others'."""
    odds = (p / (1 - p).clamp(min=1e-3)).clamp(max=1e3)
    aucs, own, other = [], [], []
    for k in range(outcome.shape[1]):
        y = outcome[:, k]
        if 0 < y.sum() < len(y):
            aucs.append(calibration.roc_auc(p[:, k], y))
            own.append(float(odds[y, k].mean()))
            other.append(float(odds[~y, k].mean()))
    return float(np.mean(aucs)), float(np.mean(own)), float(np.mean(other))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", default="euler-a")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2, help="not the shipped calibration's seed (1)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/posterior-resolution.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = load_calibration()
    if shipped is None:
        parser.error("the shipped generator has no calibration file")
    unet, classifier = load_generator(), load_classifier()
    x, llr, sigma, branch = chains(unet, args.scheduler, args.steps, seeded_noise(args.seed, 0, args.num_samples),
                                   args.seed, args.dtype)
    labels, _ = classify(classifier, to_uint8(x))
    outcome = torch.from_numpy(labels[:, None] == np.arange(NUM_CLASSES)[None])
    priors = torch.tensor([math.log(shipped.prior_of(name)) for name in CLASS_NAMES], dtype=torch.float64)
    # Independent clamp: DNG removing one class tracks it alone.
    tracked = calibration.trajectory(priors, shipped.temperature, shipped.offset, llr.double(),
                                     calibration.log_snr_gains(sigma), 1e-6, shipped.p_max).exp()
    rows = []
    print(f"{args.scheduler} {args.steps} steps, {args.num_samples} chains; per row: AUC, mean odds of the class's "
          "own samples / of the others'")
    print(f"{'chain':>6} {'tracked':>24} {'branches':>24}")
    for q in calibration.REPORT_AT:
        s = min(args.steps - 2, int(q * args.steps))
        # tracked[s] is p after step s, at x_{s+1}; the branches read x_{s+1} at step s + 1.
        t_auc, t_own, t_other = scores(tracked[s].float(), outcome)
        b_auc, b_own, b_other = scores(branch[s + 1], outcome)
        rows.append({"at": q, "tracked": {"auc": t_auc, "odds_own": t_own, "odds_other": t_other},
                     "branches": {"auc": b_auc, "odds_own": b_own, "odds_other": b_other}})
        print(f"{q:6.0%} {t_auc:8.3f} {t_own:7.2f} {t_other:7.3f} {b_auc:8.3f} {b_own:7.2f} {b_other:7.3f}")
    write_json(args.out, {"settings": vars(args), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
