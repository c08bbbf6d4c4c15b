"""Where does the tracked posterior trail the exact one? Logits along the chain on an exact mixture.

Samples one mixture of `gmm_suite.py` with the library's DNG (told the true prior, as `dng bench gmm` does) and
prints, per step, the median logit of the exact posterior p_t(c|x_t) and of the tracked p, for the samples that
finish in the removed class (the leaks) and for all samples. `--lam0 0` tracks the unguided chain. `--groups-at
SIGMA` instead groups the samples by their exact logit at the first step below SIGMA (how far each has gone into
the removed class there) and prints, per group, the median exact and tracked logit and their median difference.

Run: .venv/bin/python benchmarks/tracker_lag.py --mixture "heavy removed (0.3)" --scheduler euler-a --steps 25
     .venv/bin/python benchmarks/tracker_lag.py --mixture "d=16, K=6" --scheduler dpmpp-2m-sde --steps 50 \
         --groups-at 0.72
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


def print_groups(exact, tracked, sigmas, leaked, at: float, rows: int = 12):
    below = (sigmas < at).nonzero()
    if not len(below):
        raise SystemExit(f"no step of this chain is below sigma {at:g} (its last is {float(sigmas[-1]):.3g})")
    k = int(below[0])
    print(f"grouped by the exact logit at sigma {float(sigmas[k]):.3f}")
    for low, high in ((-float("inf"), -4), (-4, -1), (-1, 1), (1, 4), (4, float("inf"))):
        group = (exact[k] >= low) & (exact[k] < high)
        if not group.any():
            continue
        print(f"logit in [{low:g}, {high:g}): {int(group.sum())} samples, {int(leaked[group].sum())} finish in the "
              f"removed class")
        print(f"{'sigma':>10} {'exact':>8} {'tracked':>8} {'tracked - exact':>16}")
        for s in range(0, len(sigmas), max(1, len(sigmas) // rows)):
            e, t = exact[s, group], tracked[s, group]
            print(f"{float(sigmas[s]):10.3f} {float(e.median()):8.2f} {float(t.median()):8.2f} "
                  f"{float((t - e).median()):16.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default="heavy removed (0.3)", choices=list(SUITE))
    parser.add_argument("--scheduler", default="euler-a")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lam0", type=float, default=1.0, help="DNG's lam0 (0: the unguided chain, tracked)")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--groups-at", type=float, default=None, metavar="SIGMA",
                        help="group the samples by their exact logit at the first step below SIGMA")
    args = parser.parse_args()
    if args.groups_at is not None and args.groups_at <= 0:
        parser.error(f"--groups-at is a noise level sigma > 0, got {args.groups_at:g}")
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
    sigmas = out.trace.sigma[:, 0]
    if args.groups_at is not None:
        print_groups(exact, tracked, sigmas, leaked, args.groups_at)
        return
    print(f"{'sigma':>8} {'leaks: exact':>13} {'tracked':>8} {'all: exact':>11} {'tracked':>8}")
    for s, sigma in enumerate(sigmas.tolist()):
        row = [exact[s, leaked].median(), tracked[s, leaked].median()] if leaked.any() else [float("nan")] * 2
        print(f"{sigma:8.3f} {float(row[0]):13.2f} {float(row[1]):8.2f} {float(exact[s].median()):11.2f} "
              f"{float(tracked[s].median()):8.2f}")


if __name__ == "__main__":
    main()
