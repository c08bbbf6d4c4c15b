"""Where does the tracked posterior trail the exact one? Logits along the chain on an exact mixture.

Samples one mixture of `gmm_suite.py` with the library's DNG (told the true prior, as `dng bench gmm` does) and
prints, per step, the median logit of the exact posterior p_t(c|x_t) and of the tracked p, for the samples that
finish in the removed class (the leaks) and for all samples. `--lam0 0` tracks the unguided chain.

Run: .venv/bin/python benchmarks/tracker_lag.py --mixture "heavy removed (0.3)" --scheduler euler-a --steps 25
"""

from __future__ import annotations

import argparse

import torch
from gmm_suite import SUITE

from dng.bench.gmm import GMMBench
from dng.guidance import DynamicNegativeGuidance
from dng.sampler import sample


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return p.log() - (-p).log1p()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default="heavy removed (0.3)", choices=list(SUITE))
    parser.add_argument("--scheduler", default="euler-a")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lam0", type=float, default=1.0, help="DNG's lam0 (0: the unguided chain, tracked)")
    parser.add_argument("--num-samples", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = GMMBench(SUITE[args.mixture], args.steps, args.num_samples, seed=0, scheduler=args.scheduler)
    rule = DynamicNegativeGuidance(prior=bench.prior, mode="exclusive", lam0=args.lam0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.num_samples, bench.gmm.dim, generator=g)
    current, exact, tracked = [noise], [], []

    def record(i, t, x_prev, info):
        # The p used at step i belongs to x_t, the sample before the step.
        exact.append(logit(bench.exact_posterior(current[0], t)[:, 0]))
        tracked.append(logit(info["p"][:, 0]))
        current[0] = x_prev

    out = sample(bench.gmm.branch_model(bench.remove), bench.scheduler, rule, noise=noise,
                 num_inference_steps=args.steps, num_negatives=1, eta=bench.eta, generator=g, callback=record,
                 progress=False, return_trace=True)
    leaked = bench.gmm.log_joint(out.samples).argmax(-1) == bench.remove[0]
    exact, tracked = torch.stack(exact), torch.stack(tracked)
    print(f"{args.mixture}, {args.scheduler} {args.steps} steps, lam0 {args.lam0:g}: "
          f"{int(leaked.sum())} of {args.num_samples} samples finish in the removed class")
    print(f"{'sigma':>8} {'leaks: exact':>13} {'tracked':>8} {'all: exact':>11} {'tracked':>8}")
    for s, sigma in enumerate(out.trace.sigma[:, 0].tolist()):
        row = [exact[s, leaked].median(), tracked[s, leaked].median()] if leaked.any() else [float("nan")] * 2
        print(f"{sigma:8.3f} {float(row[0]):13.2f} {float(row[1]):8.2f} {float(exact[s].median()):11.2f} "
              f"{float(tracked[s].median()):8.2f}")


if __name__ == "__main__":
    main()
