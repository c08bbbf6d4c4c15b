"""`dng bench gmm` over a family of mixtures; prints one summary line per mixture and writes the rows.

Run: .venv/bin/python benchmarks/gmm_suite.py [--steps 100] [--scheduler ddpm|euler-a|dpmpp-2m-sde|ddim|flow-euler|
         flow-euler-a] [--shift 3 | --mu 1.1] [--dng late_boost=1] [--reading data] [--endpoint off]
         [--seed 1 --methods dng,dng-oracle,target] --out runs/gmm-suite.json

`--seed` draws other noise and other target and reference samples: the pass rule's sliced W2 ratio of 1.3 sits close
to the sampling noise of 4000 samples, so a verdict near it is worth repeating over seeds. `--methods` leaves rows
out (without the NP and SLD rows the table cannot check that none of them is as good as DNG).
"""

from __future__ import annotations

import argparse

import torch

from dng.bench.gmm import SCHEDULERS, GMMBench
from dng.commands import dng_changes
from dng.gmm import default_mixture_config
from dng.guidance import DynamicNegativeGuidance
from dng.io import write_json
from dng.kernels.dpmsolver import READINGS
from dng.posterior import TrackedPosterior

METHODS = ("none", "np", "sld", "dng", "dng-oracle", "target")


def mixture(d, k, weights, removed_std, near, stds=(0.15, 0.5), seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(k, d, generator=g, dtype=torch.float64)
    for idx, dist in near:
        direction = torch.randn(d, generator=g, dtype=torch.float64)
        means[idx] = means[0] + dist * direction / direction.norm()
    s = torch.linspace(*stds, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    s[0] = removed_std
    return {"means": means.tolist(), "stds": s.tolist(), "weights": weights, "remove": [0]}


SUITE = {
    "default (d=64, K=10)": default_mixture_config(),
    "d=16, K=6": mixture(16, 6, [1 / 6] * 6, 0.3, [(1, 0.9)]),
    "d=128, K=10": mixture(128, 10, [0.1] * 10, 0.3, [(1, 1.4), (2, 1.8)]),
    "unequal weights": mixture(64, 10, [0.05, 0.2, 0.05, 0.1, 0.1, 0.15, 0.05, 0.1, 0.1, 0.1], 0.3, [(1, 1.2)]),
    "heavy removed (0.3)": mixture(64, 8, [0.3] + [0.1] * 7, 0.3, [(1, 1.2), (2, 1.6)]),
    "light removed (0.02)": mixture(64, 8, [0.02] + [0.14] * 7, 0.3, [(1, 1.2), (2, 1.6)]),
    "broad neighbours": mixture(64, 10, [0.1] * 10, 0.25, [(1, 1.5), (2, 2.0)], stds=(0.5, 0.8)),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--scheduler", default="ddpm", choices=SCHEDULERS)
    parser.add_argument("--shift", type=float, default=None, help="the flow samplers' schedule shift (SD3: 3)")
    parser.add_argument("--mu", type=float, default=None, help="the flow samplers with Flux's dynamic shifting")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variance", default="fixed_large", choices=("fixed_large", "fixed_small"))
    parser.add_argument("--dng", action="append", default=[], metavar="NAME=VALUE",
                        help="set a parameter of the DNG row over the default preset, e.g. --dng late_boost=1")
    parser.add_argument("--reading", choices=READINGS, default=None,
                        help="how the DNG row's tracker reads a multistep solver's step (default: the kernel's)")
    parser.add_argument("--endpoint", choices=("on", "off"), default=None,
                        help="whether the DNG row's tracker reads each step at both ends (default: the kernel's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"rows to run, separated by commas (default: all of {', '.join(METHODS)})")
    parser.add_argument("--out", default="runs/gmm-suite.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(METHODS) or not {"dng", "dng-oracle", "target"} <= set(methods):
        parser.error(f"--methods takes some of {', '.join(METHODS)} and needs dng, dng-oracle and target")
    torch.set_num_threads(args.threads)
    overrides = dng_changes(argparse.Namespace(dng=args.dng, dng_preset="default"))
    results = {}
    for name, config in SUITE.items():
        bench = GMMBench(config, args.steps, args.num_samples, seed=args.seed, variance=args.variance,
                         scheduler=args.scheduler, shift=args.shift, mu=args.mu)
        cells = list(bench.configs(methods))
        if overrides or args.reading or args.endpoint:
            endpoint = None if args.endpoint is None else args.endpoint == "on"
            cells = [(m, {**p, **overrides}, lambda p=p, endpoint=endpoint: DynamicNegativeGuidance(
                **{k: v for k, v in p.items() if k != "preset"}, **overrides,
                posterior=TrackedPosterior(args.reading, endpoint)))
                     if m == "dng" else (m, p, f) for m, p, f in cells]
        rows = [bench.run(m, p, f)[0] for m, p, f in cells]
        results[name] = rows
        by = {r["method"]: r for r in rows if r["method"] in ("none", "dng", "dng-oracle", "target")}
        dng, target, oracle = by["dng"], by["target"], by["dng-oracle"]
        dominated = [r for r in rows if r["method"] in ("np", "sld") and r["forbidden_rate"] <= dng["forbidden_rate"]
                     and r["class_kl"] <= dng["class_kl"]]
        none = f"none forb {by['none']['forbidden_rate']:.3f} | " if "none" in by else ""
        print(f"{name:<22} {none}target forb {target['forbidden_rate']:.4f} "
              f"sW2 {target['sliced_w2']:.4f} | oracle forb {oracle['forbidden_rate']:.4f} kl {oracle['class_kl']:.4f} "
              f"sW2 {oracle['sliced_w2']:.4f} | dng forb {dng['forbidden_rate']:.4f} kl {dng['class_kl']:.4f} "
              f"sW2 {dng['sliced_w2']:.4f} mae {dng['posterior_logit_mae']:.3f} | np/sld better on both: "
              f"{len(dominated)}", flush=True)
    write_json(args.out, {"steps": args.steps, "scheduler": args.scheduler, "seed": args.seed, "shift": args.shift,
                          "mu": args.mu,
                          "variance": args.variance, "num_samples": args.num_samples, "dng": overrides,
                          "reading": args.reading, "endpoint": args.endpoint,
                          "results": results})


if __name__ == "__main__":
    main()
