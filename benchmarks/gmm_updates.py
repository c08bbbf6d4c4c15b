"""DNG's posterior update rules side by side on the mixtures of gmm_suite.py: forbidden rate, class KL, sW2 and
the tracked posterior's log-odds error for each update x temperature, with the exact-posterior oracle and exact
target samples as references.

Run: .venv/bin/python benchmarks/gmm_updates.py --steps 100 --num-samples 4000 --temperatures 1.0,1.2 \
    --out runs/gmm-updates-100.json
"""

from __future__ import annotations

import argparse

import torch
from gmm_suite import SUITE

from dng.bench.gmm import GMMBench
from dng.guidance import DynamicNegativeGuidance
from dng.io import write_json


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variance", default="fixed_large", choices=("fixed_large", "fixed_small"))
    parser.add_argument("--updates", default="paper,mixture")
    parser.add_argument("--temperatures", default="1.0,1.2")
    parser.add_argument("--mixtures", default=None,
                        help="names from gmm_suite.SUITE separated by semicolons (default all)")
    parser.add_argument("--late-boost", type=float, default=1.0,
                        help="DNG's late_boost (default 1: one lam0, as the docs/GMM.md table was measured)")
    parser.add_argument("--out", default="runs/gmm-updates.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(SUITE) if args.mixtures is None else args.mixtures.split(";")
    results = {}
    for name in names:
        bench = GMMBench(SUITE[name], args.steps, args.num_samples, seed=0, variance=args.variance)
        rows = [bench.run(m, p, f)[0] for m, p, f in bench.configs(["dng-oracle", "target"])]
        for update in args.updates.split(","):
            for temperature in [float(t) for t in args.temperatures.split(",")]:
                params = {"prior": bench.prior / len(bench.remove), "mode": "exclusive", "update": update,
                          "temperature": temperature, "late_boost": args.late_boost}
                rows.append(bench.run("dng", params, lambda params=params: DynamicNegativeGuidance(**params))[0])
        results[name] = rows
        for r in rows:
            label = r["method"]
            if label == "dng":
                label = f"dng {r['params']['update']} T={r['params']['temperature']}"
            mae = "" if r["posterior_logit_mae"] is None else f"{r['posterior_logit_mae']:.3f}"
            print(f"{name:<22} {label:<22} forbidden {r['forbidden_rate']:.4f} kl {r['class_kl']:.4f} "
                  f"sW2 {r['sliced_w2']:.4f} mae {mae}", flush=True)
    write_json(args.out, {"steps": args.steps, "num_samples": args.num_samples, "results": results})


if __name__ == "__main__":
    main()
