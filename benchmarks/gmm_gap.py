"""How far tracked DNG gets against the exact-posterior rule, from gmm_suite.py results: a markdown table.

Run: for s in ddpm euler-a flow-euler flow-euler-a; do for n in 4 8; do
         .venv/bin/python benchmarks/gmm_suite.py --scheduler $s --steps $n --out runs/gmm-suite-$s-$n.json; done; done
     .venv/bin/python benchmarks/gmm_gap.py runs/gmm-suite-*-4.json runs/gmm-suite-*-8.json

Per mixture: the forbidden rate without guidance, with the exact rule (exact posterior, lam0 = 1) and with tracked
DNG; the share of the exact rule's removal that DNG achieves, (none - DNG) / (none - exact), where the exact rule
removes at least 2 points; class KL and sliced W2 of DNG against the exact rule's; whether an NP or SLD row is at
least as good as DNG on both forbidden rate and class KL. The summary gives the median share per sampler and steps.
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
    print("| sampler | steps | mixture | forbidden: none / exact / DNG | DNG's share of the exact removal | "
          "class KL: exact / DNG | sW2 DNG / exact | NP or SLD as good on both |")
    print("|---|---|---|---|---|---|---|---|")
    shares = {}
    for path in args.results:
        data = json.load(open(path))
        key = (sampler_name(data), data["steps"])
        for name, rows in data["results"].items():
            by = {r["method"]: r for r in rows if r["method"] in ("none", "dng", "dng-oracle")}
            if len(by) < 3:
                parser.error(f"{path} has no {', '.join({'none', 'dng', 'dng-oracle'} - set(by))} row: run "
                             f"gmm_suite.py with the default --methods")
            none, dng, exact = (by[m]["forbidden_rate"] for m in ("none", "dng", "dng-oracle"))
            removed = none - exact
            share = (none - dng) / removed if removed >= 0.02 else None
            shares.setdefault(key, []).append(share)
            better = [r for r in rows if r["method"] in ("np", "sld") and r["forbidden_rate"] <= dng
                      and r["class_kl"] <= by["dng"]["class_kl"]]
            print(f"| {key[0]} | {key[1]} | {name} | {100 * none:.2f} / {100 * exact:.2f} / {100 * dng:.2f} % | "
                  f"{'-' if share is None else f'{100 * share:.0f} %'} | {by['dng-oracle']['class_kl']:.3f} / "
                  f"{by['dng']['class_kl']:.3f} | {by['dng']['sliced_w2'] / by['dng-oracle']['sliced_w2']:.2f} | "
                  f"{'yes' if better else 'no'} |")
    print("\n| sampler | steps | mixtures where the exact rule removes >= 2 points | median share DNG achieves |")
    print("|---|---|---|---|")
    for (sampler, steps), values in sorted(shares.items()):
        known = [v for v in values if v is not None]
        median = f"{100 * statistics.median(known):.0f} %" if known else "-"
        print(f"| {sampler} | {steps} | {len(known)} / {len(values)} | {median} |")


if __name__ == "__main__":
    main()
