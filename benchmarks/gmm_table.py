"""Markdown table of tracked DNG against the exact target and the exact-posterior rule, from gmm_suite.py results.

Run: for s in ddpm euler-a dpmpp-2m-sde; do for n in 25 50 100; do
         .venv/bin/python benchmarks/gmm_suite.py --scheduler $s --steps $n --out runs/gmm-suite-$s-$n.json; done; done
     .venv/bin/python benchmarks/gmm_table.py runs/gmm-suite-*.json

Per mixture: forbidden rate (target / exact-posterior DNG / tracked DNG), class KL and sliced W2 of tracked DNG as a
ratio to the target row's and to the exact-posterior row's; with --extra also the unguided row's forbidden rate and
the tracked posterior's mean log-odds error against the exact one. A mixture passes against a reference row when
tracked DNG has sW2 <= 1.3x its sW2, forbidden <= its forbidden + max(1 point, 3 standard errors), class KL <= 0.03,
and no NP or SLD row is at least as good on both forbidden and class KL. Runs of one sampler and step count with
other seeds (gmm_suite.py --seed) are counted per seed: "4, 5 / 7" is 4 of 7 with seed 0, 5 with seed 1.
"""

from __future__ import annotations

import argparse
import json
import math


def passes(dng: dict, ref: dict, rows: list[dict], n: int) -> bool:
    se = math.sqrt(max(ref["forbidden_rate"], 1 / n) * (1 - ref["forbidden_rate"]) / n)
    dominated = any(r["method"] in ("np", "sld") and r["forbidden_rate"] <= dng["forbidden_rate"]
                    and r["class_kl"] <= dng["class_kl"] for r in rows)
    return (dng["sliced_w2"] <= 1.3 * ref["sliced_w2"] and dng["class_kl"] <= 0.03 and not dominated
            and dng["forbidden_rate"] <= ref["forbidden_rate"] + max(0.01, 3 * se))


def sampler_name(data: dict) -> str:
    """The sampler's name, with the flow samplers' shift or mu when one was given."""
    name = data.get("scheduler", "ddpm")
    shifts = [f"{key} {data[key]:g}" for key in ("shift", "mu") if data.get(key) is not None]
    return f"{name} ({', '.join(shifts)})" if shifts else name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="gmm_suite.py JSON files")
    parser.add_argument("--extra", action="store_true",
                        help="add the unguided forbidden rate and the tracked posterior's log-odds error")
    args = parser.parse_args()
    forbidden = "none / target / exact-posterior / DNG" if args.extra else "target / exact-posterior / DNG"
    extra = " log-odds error |" if args.extra else ""
    print(f"| sampler | steps | mixture | forbidden: {forbidden} | class KL | sW2 / target | "
          f"sW2 / exact-posterior |{extra} passes vs target, vs exact-posterior |")
    print("|---" * (9 if args.extra else 8) + "|")
    totals = {}
    for path in args.results:
        data = json.load(open(path))
        reading = f" ({data['reading']})" if data.get("reading") else ""
        reading += f" (endpoint {data['endpoint']})" if data.get("endpoint") else ""
        n, key, seed = data["num_samples"], (sampler_name(data) + reading, data["steps"]), data.get("seed", 0)
        for name, rows in data["results"].items():
            by = {r["method"]: r for r in rows if r["method"] in ("none", "dng", "dng-oracle", "target")}
            if args.extra and "none" not in by:
                parser.error(f"--extra needs the unguided row, which {path} has not: run gmm_suite.py with the "
                             f"default --methods")
            dng, oracle, target = by["dng"], by["dng-oracle"], by["target"]
            ok = (passes(dng, target, rows, n), passes(dng, oracle, rows, n))
            totals.setdefault(key, {}).setdefault(seed, []).append(ok)
            none = f"{100 * by['none']['forbidden_rate']:.2f} / " if args.extra else ""
            mae = f" {dng['posterior_logit_mae']:.2f} |" if args.extra else ""
            steps = f"{key[1]}, seed {seed}" if seed else key[1]
            print(f"| {key[0]} | {steps} | {name} | {none}{100 * target['forbidden_rate']:.2f} / "
                  f"{100 * oracle['forbidden_rate']:.2f} / {100 * dng['forbidden_rate']:.2f} % | "
                  f"{dng['class_kl']:.4f} | {dng['sliced_w2'] / target['sliced_w2']:.2f} | "
                  f"{dng['sliced_w2'] / oracle['sliced_w2']:.2f} |{mae} {'yes' if ok[0] else 'no'}, "
                  f"{'yes' if ok[1] else 'no'} |")
    print("\n| sampler | steps | mixtures passing vs target | vs exact-posterior |\n|---|---|---|---|")
    for (sampler, steps), seeds in sorted(totals.items()):
        runs = [seeds[seed] for seed in sorted(seeds)]
        counts = [", ".join(str(sum(ok[i] for ok in oks)) for oks in runs) for i in (0, 1)]
        mixtures = "/".join(sorted({str(len(oks)) for oks in runs}))
        print(f"| {sampler} | {steps} | {counts[0]} / {mixtures} | {counts[1]} / {mixtures} |")


if __name__ == "__main__":
    main()
