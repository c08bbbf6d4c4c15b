"""Does one calibration hold on every sampler and step count? The shipped fit against a refit on fresh chains.

For each sampler and step count: unguided chains that track the given classes (as `dng calibrate` draws them, with
another seed), labelled by the classifier; then the shipped calibration's likelihood of the outcomes and its AUC
along the chain, held fixed, beside a refit on those very chains (the best any calibration could do there).

Run: .venv/bin/python benchmarks/calibration_transfer.py --schedulers euler-a,ddpm,dpmpp-2m-sde \
         --steps 25,50,150 --out runs/calibration-transfer.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dng import calibration
from dng.calibration import tracking_only
from dng.io import write_json
from dng.vision.data import CLASS_NAMES, parse_classes
from dng.vision.generate import generate
from dng.vision.images import classify, to_uint8
from dng.vision.models import load_calibration, load_classifier, load_generator
from dng.vision.seeding import seeded_noise


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedulers", default="euler-a,ddpm,dpmpp-2m-sde")
    parser.add_argument("--steps", default="25,50,150")
    parser.add_argument("--classes", default="T-shirt,Shirt,Bag", help="classes tracked at once (one branch each)")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2, help="not the shipped fit's seed (1)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/calibration-transfer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes = parse_classes(args.classes)
    shipped = load_calibration()
    if shipped is None:
        parser.error("the shipped generator has no calibration file")
    priors = [shipped.prior_of(CLASS_NAMES[k]) for k in classes]
    unet, classifier = load_generator(), load_classifier()
    noise = seeded_noise(args.seed, 0, args.num_samples)
    rows = []
    print(f"{'sampler':<14} {'steps':>5} {'nll shipped/refit':>17} {'/baseline':>9}  AUC shipped (refit) at "
          + " ".join(f"{q:.0%}" for q in calibration.REPORT_AT))
    for name in args.schedulers.split(","):
        for steps in map(int, args.steps.split(",")):
            x, trace = generate(unet, noise, scheduler=name, guidance=tracking_only(), negatives=classes, steps=steps,
                                seed=args.seed, dtype=args.dtype)
            labels, _ = classify(classifier, to_uint8(x))
            outcome = torch.from_numpy(labels[:, None] == np.array(classes)[None])
            gains = calibration.log_snr_gains(trace.sigma)
            # The classes are tracked together, so both fits replay the clamp DNG uses for exclusive classes.
            held = calibration.evaluate(priors, shipped.temperature, shipped.offset, trace.llr, gains, outcome,
                                        p_max=shipped.p_max, exclusive=True)
            refit = calibration.fit(trace.llr, gains, outcome, p_max=shipped.p_max, exclusive=True)
            row = {"scheduler": name, "steps": steps, "classes": [CLASS_NAMES[k] for k in classes],
                   "positives": outcome.sum(0).tolist(), "shipped": held,
                   "refit": {k: v for k, v in refit.as_dict().items() if k in ("priors", "temperature", "offset",
                                                                                  "nll", "baseline_nll", "auc")}}
            rows.append(row)
            aucs = " ".join(f"{np.mean(a):.2f} ({np.mean(b):.2f})" for a, b in zip(held["auc"].values(),
                                                                                   refit.auc.values(), strict=True))
            print(f"{name:<14} {steps:>5} {held['nll'] / refit.nll:17.3f} {held['nll'] / held['baseline_nll']:9.3f}  "
                  f"{aucs}")
    shipped_fit = {"temperature": shipped.temperature, "offset": shipped.offset}
    write_json(args.out, {"settings": vars(args), "shipped": shipped_fit, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
