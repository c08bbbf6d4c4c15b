"""Per-step evidence of the tracker against the exact posterior's increment, by noise level, on an exact mixture.

Samples one mixture of `gmm_suite.py` with the library's DNG (told the true prior, as `dng bench gmm` does) and, at
every tracked step from sigma to sigma', compares the tracker's llr with the exact increment
log p_{sigma'}(c|x') - log p_sigma(c|x) of the removed class's posterior (both read at the samples' own noise levels,
the scheduler's sigmas). Prints per step: the step's log-SNR gain, the mean exact increment and the mean llr over the
samples that finish in the removed class (the leaks) and over all, the mean error llr - exact, and the tracked and
exact logit of p after the step (leaks' median). `--lam0 0` tracks the unguided chain.

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

class EndpointDrift(TrackedPosterior):
    """Experimental: the step's deterministic evidence integrated with the gap at both ends of the step.

    The Gaussian reading holds the hypotheses' gap Delta D = D_u - D_n at its value at the step's start x: its
    deterministic part is -W (|Delta D|^2 + 2 P.Delta D), P = scale Delta D the push, W = (1/sigma'^2 - 1/sigma^2) / 2
    the integral of the SNR over the step in lambda = -log sigma. With Delta D linear in lambda between x and x'
    (read at the next step, before its p is used) the integral of SNR (|Delta D|^2 + 2 P.Delta D) is the left value
    plus (I1 / h) e^{2 lambda0} [(B - A) + 2 scale (C - A)], A = |Delta D(x)|^2, B = |Delta D(x')|^2,
    C = Delta D(x).Delta D(x'). `push`: False corrects only the |Delta D|^2 term.
    """

    def __init__(self, push=True):
        super().__init__()
        self.push = push
        self.scale = None

    def start(self, *args, **kwargs):
        super().start(*args, **kwargs)
        self.pending = None

    @staticmethod
    def _gap(moments):
        # Delta D = d / b1, b1 = s sqrt(2 W): [negatives, batch, D].
        w = (1 / moments.sigma_next**2 - 1 / moments.sigma**2) / 2
        return moments.diff.to(torch.float32).flatten(2) / (moments.std * math.sqrt(2 * w))

    def before_step(self, t, x, eps_u, eps_n):
        super().before_step(t, x, eps_u, eps_n)
        if self.pending is not None:
            llr, left, scale, sigma, sigma_next = self.pending
            if self.moments is not None:
                # The last step's llr is applied here, with its correction, before the clamp.
                right = self._gap(self.moments)
                a, b = left.square().sum(-1).T, right.square().sum(-1).T
                c = (left * right).sum(-1).T
                h = math.log(sigma / sigma_next)
                i1 = h * math.exp(2 * h) / 2 - (math.exp(2 * h) - 1) / 4
                change = (b - a) + (2 * scale * (c - a) if self.push else 0)
                llr = llr - i1 / h / sigma**2 * change
            self.tracker.update(llr)
            if not self.moments or not self.moments.restart:
                self.held = self.tracker.log_p
        self.pending = None

    def after_step(self, x_prev):
        moments = self.moments
        log_p = self.tracker.log_p
        llr = super().after_step(x_prev)
        if llr is not None and 0 < moments.sigma_next < moments.sigma < math.inf:
            # Held until the next step's outputs give the gap at x'.
            self.tracker.log_p = log_p
            self.pending = (llr, self._gap(moments), self.scale, moments.sigma, moments.sigma_next)
        return llr


class ReadAfter(DynamicNegativeGuidance):
    """DNG reading p after the posterior's before_step (which may correct it from this step's outputs)."""

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        from dng.guidance import _push, base_prediction
        self.levels = self.kernel.noise_levels(step.t)
        self.posterior.before_step(step.t, step.x, eps_u, eps_n)
        p = self.posterior.read(step.x, step.t)
        scale = self.applied_scale(p, *self.levels)
        self.posterior.scale = scale
        return _push(base_prediction(eps_u, eps_p, cfg_scale), eps_u, eps_n, scale), scale, p


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
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lam0", type=float, default=1.0, help="DNG's lam0 (0: the unguided chain, tracked)")
    parser.add_argument("--dng", action="append", default=[], metavar="NAME=VALUE", help="e.g. late_boost=1")
    parser.add_argument("--endpoint", choices=("none", "drift", "push"), default="none",
                        help="the experimental EndpointDrift tracker (drift: the |Delta D|^2 term only)")
    parser.add_argument("--num-samples", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = GMMBench(SUITE[args.mixture], args.steps, args.num_samples, seed=0, scheduler=args.scheduler)
    scheduler = bench.scheduler
    if args.scheduler == "dpmpp-2m-sde":
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(scheduler.config, **SPACINGS[args.spacing])
    extra = {k: _value(v) for k, v in (s.split("=", 1) for s in args.dng)}
    if args.endpoint == "none":
        rule = DynamicNegativeGuidance(prior=bench.prior, mode="exclusive", lam0=args.lam0, **extra)
    else:
        rule = ReadAfter(prior=bench.prior, mode="exclusive", lam0=args.lam0, **extra,
                         posterior=EndpointDrift(push=args.endpoint == "push"))
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
