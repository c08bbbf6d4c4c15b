"""How far would a tracker that knew each kernel's covariance get? DNG on the suite's mixtures with p tracked by
Bayes over Gaussian kernels with their exact first two moments (`kernel_decomposition.both_moments_llr`: the
covariances Tweedie's formula gives from the branches' Jacobians, here in closed form), against the library's
tracker and the exact posterior.

Writes a file `gmm_table.py` reads, whose `dng` row is DNG on this tracker: with the library's schedule and caps
(the default), without the boost (`--late-boost 1`), or as the exact rule (`--exact-rule`: the exact-posterior
row's lam0 = 1 everywhere, no push cap, p up to 1 - 1e-6, on this tracker's p).

Run: .venv/bin/python benchmarks/moment_oracle.py --scheduler dpmpp-2m-sde --steps 50 --late-boost 1 \\
         --out runs/moment-oracle/dpmpp-2m-sde-50-b1.json
"""

from __future__ import annotations

import argparse

import torch
from gmm_suite import SUITE
from kernel_decomposition import both_moments_llr

from dng.bench.gmm import SCHEDULERS, GMMBench
from dng.gmm import GaussianMixture
from dng.guidance import DynamicNegativeGuidance
from dng.io import write_json


class MomentTracker:
    """A DNG posterior: log p of the removed class updated, at the start of each step, with the both-moments llr
    of the step just taken (the sample the step started from, at its timestep, to the one it drew)."""

    tracks = True

    def __init__(self, bench: GMMBench):
        config = bench.spec[0]
        self.bench, self.removed = bench, bench.remove[0]
        self.gmm = GaussianMixture(config["means"], config["stds"], config["weights"], bench.gmm.path)

    def start(self, config, kernel, batch_size, num_negatives, device=None):
        if num_negatives != 1:
            raise ValueError("the moment tracker follows one removed class")
        self.p_min, self.p_max = config.p_min, config.p_max
        self.log_p = torch.full((batch_size, 1), float(self.gmm.weights[self.removed].log()), dtype=torch.float64)
        self.last = None

    def before_step(self, t, x, eps_u, eps_n):
        x = self.bench.model_input(x, t).to(torch.float64)
        t = float(t)
        # Karras sigmas at 100 steps round two levels to one timestep: no step of the true process between them.
        if self.last is not None and t < self.last[1]:
            self.log_p += both_moments_llr(self.gmm, self.removed, self.last[0], x, self.last[1], t)[:, None]
            self.log_p.clamp_(max=0.0)
        self.last = (x, t)

    def read(self, x, t):
        return self.log_p.exp().clamp(self.p_min, self.p_max).to(torch.float32)

    def pushed(self, scale):
        pass

    def after_step(self, x_prev):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", default="dpmpp-2m-sde", choices=SCHEDULERS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--late-boost", type=float, default=None, help="default: the library's")
    parser.add_argument("--exact-rule", action="store_true", help="the exact-posterior row's rule on this tracker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/moment-oracle.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, config in SUITE.items():
        bench = GMMBench(config, args.steps, args.num_samples, seed=args.seed, scheduler=args.scheduler)
        rows = []
        for method, params, factory in bench.configs(["dng", "dng-oracle", "target"]):
            if method == "dng":
                rule = {k: v for k, v in params.items() if k != "preset"}
                if args.late_boost is not None:
                    rule["late_boost"] = args.late_boost
                if args.exact_rule:
                    exact = next(p for m, p, _ in bench.configs(["dng-oracle"]))
                    rule.update({k: v for k, v in exact.items() if k != "posterior"})
                params = {**params, **rule, "posterior": "both moments"}

                def factory(rule=rule, bench=bench):
                    return DynamicNegativeGuidance(**rule, posterior=MomentTracker(bench))
            rows.append(bench.run(method, params, factory)[0])
        results[name] = rows
        by = {r["method"]: r for r in rows}
        print(f"{name:<22} oracle forb {by['dng-oracle']['forbidden_rate']:.4f} sW2 {by['dng-oracle']['sliced_w2']:.4f}"
              f" | moments forb {by['dng']['forbidden_rate']:.4f} kl {by['dng']['class_kl']:.4f} "
              f"sW2 {by['dng']['sliced_w2']:.4f}", flush=True)
    write_json(args.out, {"steps": args.steps, "scheduler": args.scheduler, "seed": args.seed,
                          "num_samples": args.num_samples, "dng": {"posterior": "both moments",
                                                                   "late_boost": args.late_boost,
                                                                   "exact_rule": args.exact_rule},
                          "results": results})


if __name__ == "__main__":
    main()
