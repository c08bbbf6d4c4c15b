"""The suite's mixtures with tracked DNG read at each step's start (`base`) and at both of its ends (`endpoint`,
`TrackedPosterior(endpoint=True)`; `endpoint-mixture`: with update="mixture"; `moment`, `endpoint-moment`: with
update="moment"), the reference rows computed once; one gmm_suite.py-format JSON per DNG variant, for gmm_table.py.

Samplers: DPM++ 2M SDE on Karras sigmas (`karras`, the suite's `dpmpp-2m-sde`) or on the timestep spacing
(`linear`), Euler ancestral (`euler-a`), DDPM (`ddpm`).

Run: .venv/bin/python benchmarks/endpoint_suite.py --sampler karras --steps 25 --out runs/endpoint/karras-25
     (writes runs/endpoint/karras-25-<variant>.json)
"""

from __future__ import annotations

import argparse

import diffusers
import torch
from gmm_suite import SUITE

from dng.bench.gmm import GMMBench
from dng.guidance import DynamicNegativeGuidance
from dng.io import write_json
from dng.posterior import TrackedPosterior
from dng.sampler import sample

SAMPLERS = {"karras": ("dpmpp-2m-sde", {}), "linear": ("dpmpp-2m-sde", {"use_karras_sigmas": False}),
            "euler-a": ("euler-a", None), "ddpm": ("ddpm", None)}


def variants(prior):
    rule = {"prior": prior, "mode": "exclusive"}
    return {
        "base": lambda: DynamicNegativeGuidance(**rule, posterior=TrackedPosterior(endpoint=False)),
        "mixture": lambda: DynamicNegativeGuidance(**rule, update="mixture",
                                                   posterior=TrackedPosterior(endpoint=False)),
        "endpoint": lambda: DynamicNegativeGuidance(**rule, posterior=TrackedPosterior(endpoint=True)),
        "endpoint-mixture": lambda: DynamicNegativeGuidance(**rule, update="mixture",
                                                            posterior=TrackedPosterior(endpoint=True)),
        "moment": lambda: DynamicNegativeGuidance(**rule, update="moment", posterior=TrackedPosterior(endpoint=False)),
        "endpoint-moment": lambda: DynamicNegativeGuidance(**rule, update="moment",
                                                           posterior=TrackedPosterior(endpoint=True)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sampler", choices=SAMPLERS, default="karras")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--variants", default="base,endpoint,endpoint-mixture")
    parser.add_argument("--mixtures", default=None, help="names separated by | (default: the suite's seven)")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--out", required=True, help="prefix of the JSON files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, changes = SAMPLERS[args.sampler]
    wanted = args.variants.split(",")
    results = {v: {} for v in wanted}
    for mixture, config in SUITE.items():
        if args.mixtures and mixture not in args.mixtures.split("|"):
            continue
        bench = GMMBench(config, args.steps, args.num_samples, seed=0, scheduler=name)
        if changes is not None:
            bench.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(bench.scheduler.config, **changes)
        refs = [bench.run(m, p, f)[0] for m, p, f in bench.configs(["none", "np", "sld", "dng-oracle", "target"])]
        line = [f"{mixture:<22} oracle {refs[-2]['forbidden_rate']:.4f}"]
        for variant, factory in variants(bench.prior).items():
            if variant not in wanted:
                continue
            rule = factory()
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(bench.n, bench.gmm.dim, generator=g)
            out = sample(bench.gmm.branch_model(bench.remove), bench.scheduler, rule, noise=noise,
                         num_inference_steps=args.steps, num_negatives=1, eta=bench.eta, generator=g,
                         progress=False, max_rms=None)
            row = bench.score("dng", {"variant": variant}, out.samples, 0.0, None)
            results[variant][mixture] = [*refs, row]
            line.append(f"{variant} {row['forbidden_rate']:.4f} kl {row['class_kl']:.4f} "
                        f"sW2/oracle {row['sliced_w2'] / refs[-2]['sliced_w2']:.2f}")
        print(" | ".join(line), flush=True)
    label = {"karras": "dpmpp-2m-sde", "linear": "dpmpp-2m-sde timestep", "euler-a": "euler-a", "ddpm": "ddpm"}
    for variant in wanted:
        write_json(f"{args.out}-{variant}.json", {
            "steps": args.steps, "scheduler": label[args.sampler], "variance": "fixed_large",
            "num_samples": args.num_samples, "dng": {}, "reading": variant, "results": results[variant]})


if __name__ == "__main__":
    main()
