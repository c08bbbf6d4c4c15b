"""Per-step evidence of the tracker against the exact posterior's increment, by noise level, on an exact mixture.

Samples one mixture of `gmm_suite.py` with the library's DNG (told the true prior, as `dng bench gmm` does; `--endpoint`
on or off: the tracker's endpoint reading, default the kernel's) and, at
every tracked step from sigma to sigma', compares the tracker's llr with the exact increment
log p_{sigma'}(c|x') - log p_sigma(c|x) of the removed class's posterior (both read at the samples' own noise levels,
the scheduler's sigmas). Prints per step: the step's log-SNR gain, the mean exact increment and the mean llr over the
samples that finish in the removed class (the leaks) and over all, the mean error llr - exact, the leaks' median exact
p after the step and tracked p before it, and the leaks' evidence summed over the chain.
`--lam0 0` tracks the unguided chain. A step's llr is the evidence the tracker added for it (with the endpoint
reading, corrected at the next step: the trace's llr).

Run: .venv/bin/python benchmarks/step_evidence.py --mixture "heavy removed (0.3)" --spacing karras --steps 25
"""

from __future__ import annotations

import argparse
import math

import diffusers
import torch
from gmm_suite import SUITE

from dng.bench.gmm import GMMBench
from dng.guidance import DynamicNegativeGuidance
from dng.posterior import TrackedPosterior
from dng.sampler import sample

SPACINGS = {"karras": {}, "linear": {"use_karras_sigmas": False}}


def log_posterior(gmm, x, sigma, k):
    """log p(k | x) for a sample x at noise level sigma (x = a x0 + a sigma n, a = 1 / sqrt(1 + sigma^2))."""
    if sigma <= 0:
        joint = gmm.log_joint(x)
    else:
        a = (1 / (1 + sigma**2)) ** 0.5
        joint = gmm._log_joint_t(x.to(gmm.dtype), a, a**2 * gmm.stds**2 + 1 - a**2).T
    return joint.log_softmax(-1)[:, k]


def _value(text):
    try:
        return float(text)
    except ValueError:
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default="heavy removed (0.3)", choices=list(SUITE))
    parser.add_argument("--scheduler", default="dpmpp-2m-sde")
    parser.add_argument("--spacing", choices=SPACINGS, default="karras", help="dpmpp-2m-sde only")
    parser.add_argument("--order", type=int, default=None, help="dpmpp-2m-sde's solver_order (default 2)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lam0", type=float, default=1.0, help="DNG's lam0 (0: the unguided chain, tracked)")
    parser.add_argument("--dng", action="append", default=[], metavar="NAME=VALUE", help="e.g. late_boost=1")
    parser.add_argument("--endpoint", choices=("on", "off"), default=None,
                        help="read each step at both of its ends (default: the kernel's; on for DPM-Solver)")
    parser.add_argument("--num-samples", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = GMMBench(SUITE[args.mixture], args.steps, args.num_samples, seed=0, scheduler=args.scheduler)
    scheduler = bench.scheduler
    if args.scheduler == "dpmpp-2m-sde":
        order = {} if args.order is None else {"solver_order": args.order}
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(scheduler.config, **SPACINGS[args.spacing],
                                                                      **order)
    extra = {k: _value(v) for k, v in (s.split("=", 1) for s in args.dng)}
    endpoint = None if args.endpoint is None else args.endpoint == "on"
    rule = DynamicNegativeGuidance(prior=bench.prior, mode="exclusive", lam0=args.lam0, **extra,
                                   posterior=TrackedPosterior(endpoint=endpoint))
    k = bench.remove[0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.num_samples, bench.gmm.dim, generator=g)
    current, rows = [noise], []

    def record(i, t, x_prev, info):
        sigma, sigma_next = info["sigma"]
        if info["llr"] is not None:
            exact = (log_posterior(bench.gmm, x_prev, sigma_next, k)
                     - log_posterior(bench.gmm, current[0], sigma, k)).float()
            rows.append((sigma, sigma_next, info["llr"][:, 0].float(), exact,
                         log_posterior(bench.gmm, x_prev, sigma_next, k).float(), info["p"][:, 0].float()))
        current[0] = x_prev

    out = sample(bench.gmm.branch_model(bench.remove), scheduler, rule, noise=noise, num_inference_steps=args.steps,
                 num_negatives=1, eta=bench.eta, generator=g, callback=record, progress=False)
    leaked = bench.gmm.log_joint(out.samples).argmax(-1) == k
    print(f"{args.mixture}, {args.scheduler} {args.spacing if args.scheduler == 'dpmpp-2m-sde' else ''} "
          f"{args.steps} steps, lam0 {args.lam0:g} {extra or ''}: {int(leaked.sum())} of {args.num_samples} leak")
    print(f"{'sigma':>7} {'->':>6} {'dlogSNR':>7} | {'leaks: exact':>12} {'llr':>7} {'err':>7} | "
          f"{'all: exact':>10} {'llr':>7} {'|err|':>6} | {'leaks p(after) exact':>20} {'p(before) tracked':>17}")
    for sigma, sigma_next, llr, exact, log_p, p in rows:
        gain = 2 * math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        if leaked.any():
            lk = [float(exact[leaked].mean()), float(llr[leaked].mean()), float((llr - exact)[leaked].mean()),
                  float(log_p[leaked].exp().median()), float(p[leaked].median())]
        else:
            lk = [math.nan] * 5
        print(f"{sigma:7.3f} {sigma_next:6.3f} {gain:7.3f} | {lk[0]:12.3f} {lk[1]:7.3f} {lk[2]:7.3f} | "
              f"{float(exact.mean()):10.3f} {float(llr.mean()):7.3f} {float((llr - exact).abs().mean()):6.3f} | "
              f"{lk[3]:20.3f} {lk[4]:17.3f}")
    if leaked.any():
        exact = sum(float(r[3][leaked].mean()) for r in rows)
        llr = sum(float(r[2][leaked].mean()) for r in rows)
        print(f"leaks, summed over the steps: exact {exact:.3f}, llr {llr:.3f}, error {llr - exact:.3f}; "
              f"log p before the last tracked step: exact {float(rows[-2][4][leaked].mean()):.3f}, tracked "
              f"{float(rows[-1][5][leaked].log().mean()):.3f}")


if __name__ == "__main__":
    main()
