"""Log-odds error of the tracked posterior along unguided trajectories of the default mixture.

DNG at scale 0 samples the unguided model while tracking p_t(c-|x_t) by Bayes (temperature 1, offset 0);
the error is |logit(tracked) - logit(exact)| with both read in [1e-6, 0.999], averaged over steps and samples.
`--floors` sets the tracker's own lower clamp p_min: at the library's 1e-6 the tracked p of chains far from the
class walks just above the floor (each step's evidence is noisy, and the clamp keeps the ups but not the downs),
which adds an error that more steps do not remove; at 1e-30 what remains is the kernel's.
Run: .venv/bin/python benchmarks/tracking_error.py [--steps 50,100,1000] [--updates paper,mixture]
[--variances step,forward] [--floors 1e-6,1e-30] [--mixture default|two-narrow|two-broad]
[--sampler-variance fixed_large|fixed_small]
"""

from __future__ import annotations

import argparse

import torch

from dng.bench.gmm import GMMBench
from dng.gmm import default_mixture_config
from dng.guidance import DynamicNegativeGuidance


def two_classes(std: float) -> dict:
    """Two equal classes at distance 1 in d = 8 with a common std: the two-hypothesis update's home ground when the
    std is small against the noise (each class kernel is then almost exactly N(mean_c, beta_tilde))."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 8, generator=g, dtype=torch.float64)
    means[1] = means[0] + means[1] / means[1].norm()
    return {"means": means.tolist(), "stds": [std, std], "weights": [0.5, 0.5], "remove": [0]}


MIXTURES = {"default": default_mixture_config, "two-narrow": lambda: two_classes(0.02),
            "two-broad": lambda: two_classes(0.3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="50,100,1000")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--updates", default="paper,mixture", help="DynamicNegativeGuidance update rules")
    parser.add_argument("--variances", default="step,forward", help="kernel_variance settings")
    parser.add_argument("--floors", default="1e-6,1e-30", help="the tracker's p_min values")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler-variance", default="fixed_large", choices=("fixed_large", "fixed_small"))
    parser.add_argument("--mixture", choices=sorted(MIXTURES), default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for steps in [int(s) for s in args.steps.split(",")]:
        bench = GMMBench(MIXTURES[args.mixture](), steps, args.num_samples, seed=0, variance=args.sampler_variance)
        for update in args.updates.split(","):
            for variance in args.variances.split(","):
                for floor in [float(f) for f in args.floors.split(",")]:
                    params = {"scale": 0.0, "prior": bench.prior, "temperature": 1.0, "p_min": floor,
                              "p_max": 0.999, "kernel_variance": variance, "update": update}
                    row, _ = bench.run("dng", params, lambda params=params: DynamicNegativeGuidance(**params),
                                       mae_range=(1e-6, 0.999))
                    print(f"{steps:5d} steps, update={update:<8} kernel_variance={variance:<8} p_min={floor:<6g} "
                          f"posterior_logit_mae {row['posterior_logit_mae']:.3f}", flush=True)


if __name__ == "__main__":
    main()
