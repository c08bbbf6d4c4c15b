"""Tracked DNG on several samplers against the same truth: per step count and mixture, the mean over seeds of its
forbidden rate and of its sliced W2 as a ratio to the exact target's (and the target's own forbidden rate: the share
of target samples whose likeliest component is a removed one), from gmm_suite.py results.

The pass rule of gmm_table.py judges each sampler against its own exact-posterior row, which is closer to the target
on a better sampler: this table compares the samplers' DNG samples with the target itself.

Run: for s in dpmpp-2m-sde euler-a; do for n in 25 50 100; do for seed in 0 1 2 3 4; do
         .venv/bin/python benchmarks/gmm_suite.py --scheduler $s --steps $n --seed $seed \\
             --methods dng,dng-oracle,target --out runs/seeds/$s-$n-seed$seed.json; done; done; done
     .venv/bin/python benchmarks/gmm_compare.py runs/seeds/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from gmm_table import sampler_name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="gmm_suite.py JSON files")
    args = parser.parse_args()
    cells = {}  # (steps, mixture) -> sampler -> [(forbidden %, sW2 / target), one per run]
    targets = {}  # (steps, mixture) -> the target's forbidden %, one per run
    for path in args.results:
        data = json.load(open(path))
        for mixture, rows in data["results"].items():
            by = {r["method"]: r for r in rows}
            dng, target = by["dng"], by["target"]
            targets.setdefault((data["steps"], mixture), []).append(100 * target["forbidden_rate"])
            cells.setdefault((data["steps"], mixture), {}).setdefault(sampler_name(data), []).append(
                (100 * dng["forbidden_rate"], dng["sliced_w2"] / target["sliced_w2"]))
    samplers = sorted({s for runs in cells.values() for s in runs})
    names = " | ".join(f"{s}: forbidden %, sW2 / target" for s in samplers)
    print(f"| steps | mixture | target: forbidden % | {names} |")
    print("|---" * (3 + len(samplers)) + "|")
    for (steps, mixture), runs in sorted(cells.items()):
        values = []
        for sampler in samplers:
            got = runs.get(sampler, [])
            values.append(f"{statistics.mean(f for f, _ in got):.2f}, {statistics.mean(w for _, w in got):.2f}"
                          if got else "-")
        target = statistics.mean(targets[steps, mixture])
        print(f"| {steps} | {mixture} | {target:.2f} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
