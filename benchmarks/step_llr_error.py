"""Per-step accuracy of DNG's posterior updates given the EXACT p_t: along unguided chains of a suite mixture, the
log-odds increment logit p(c|x') - logit p(c|x) of each update rule (fed the exact p at x) against the exact one,
by band of the exact logit p. Separates the kernel model's error from the tracker's accumulated error.

Run: .venv/bin/python benchmarks/step_llr_error.py --mixture "heavy removed (0.3)" --steps 100
"""

from __future__ import annotations

import argparse
import math

import torch
from diffusers import DDPMScheduler
from gmm_suite import SUITE

from dng.gmm import GaussianMixture
from dng.guidance import DynamicNegativeGuidance
from dng.posterior import gaussian_llr, mixture_llr
from dng.sampler import sample

BANDS = ((-math.inf, -5), (-5, -2), (-2, 0), (0, 2), (2, 5), (5, math.inf))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mixture", default="heavy removed (0.3)", choices=sorted(SUITE))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type="fixed_small")
    cfg = SUITE[args.mixture]
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod, dtype=torch.float64)
    removed = cfg["remove"][0]

    def exact_logit(x, t):
        log_post = gmm.log_joint(x, t).log_softmax(-1)
        rest = torch.cat([log_post[:, :removed], log_post[:, removed + 1:]], -1)
        return log_post[:, removed] - rest.logsumexp(-1)

    def to_logit(log_p):
        # A log p above 0 (the Gaussian ratio can overshoot near p = 1) is held just below 0.
        log_p = log_p.clamp(max=-1e-12)
        return log_p - torch.log1p(-log_p.exp())

    state, records = {}, []

    class Probe(DynamicNegativeGuidance):
        def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
            state["x"], state["t"] = step.x, step.t
            return super().combine(eps_u, eps_n, step, eps_p, cfg_scale)

        def observe(self, x_prev, moments):
            before = exact_logit(state["x"], int(state["t"]))
            after = exact_logit(x_prev, int(scheduler.previous_timestep(state["t"])))
            log_p = torch.nn.functional.logsigmoid(before).clamp(max=math.log1p(-1e-7))
            rd, dd = moments.statistics(x_prev)
            paper = to_logit(log_p + gaussian_llr(rd, dd, moments.std)[:, 0].double())
            mixture = to_logit(log_p + mixture_llr(rd, dd, moments.std, log_p[:, None].float(),
                                                   p_max=1 - 1e-7)[:, 0].double())
            records.append((before, after - before, paper - before, mixture - before))
            return super().observe(x_prev, moments)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.num_samples, gmm.dim, generator=g, dtype=torch.float64)
    sample(gmm.branch_model([removed]), scheduler, Probe(scale=0.0, temperature=1.0), noise=noise,
           num_inference_steps=args.steps, num_negatives=1, generator=g, progress=False)
    before, exact, paper, mixture = (torch.stack(column) for column in zip(*records, strict=True))
    print(f"{args.mixture}, {args.steps} steps: per-step log-odds increment error given the exact p")
    for lo, hi in BANDS:
        band = (before > lo) & (before <= hi)
        if band.any():
            print(f"logit p in ({lo:g}, {hi:g}] n={int(band.sum()):6d} exact mean {exact[band].mean():7.3f} | "
                  f"paper bias {(paper - exact)[band].mean():7.3f} mae {(paper - exact)[band].abs().mean():6.3f} | "
                  f"mixture bias {(mixture - exact)[band].mean():7.3f} mae {(mixture - exact)[band].abs().mean():6.3f}")


if __name__ == "__main__":
    main()
