"""Tracked DNG on the DPM-Solver SDE family over the suite's mixtures, one row per tracker reading.

Writes gmm_suite.py's JSON (reference rows none, np, sld, dng-oracle, target, then the DNG row), so gmm_table.py
judges it. Solvers on the suite's 1000-step linear schedule with Karras sigmas (`--spacing` linear: the scheduler's
timestep spacing, linear in t; exponential: exponential sigmas): DPM++ 2M/3M SDE multistep, DPM++ 2S/3S SDE
singlestep, and EDM's DPM++ 2M SDE (on its own Karras schedule), which samples x = x0 + sigma n and preconditions
its network (the mixture's exact denoiser D becomes the network output (D - c_skip x) / c_out; sigma_min 0.0101,
the schedule's first level).

Run: .venv/bin/python benchmarks/dpm_family.py --solver 3m [--spacing linear] --steps 50 --reading data \
         [--endpoint off] --out runs/dpm-3m-data-50.json
"""

from __future__ import annotations

import argparse
import math

import diffusers
import torch
from gmm_suite import SUITE

from dng.bench.gmm import GMMBench
from dng.errors import NonFiniteError
from dng.io import write_json
from dng.kernels.dpmsolver import READINGS
from dng.posterior import TrackedPosterior
from dng.sampler import sample

# name -> (scheduler class, config changes over the suite's DPM++ 2M SDE Karras)
SOLVERS = {
    "2m": ("DPMSolverMultistepScheduler", {}),
    "3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "2s": ("DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "3s": ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
    "edm-2m": ("EDMDPMSolverMultistepScheduler", {}),
}
# --spacing -> config changes: Karras sigmas (the suite's), the timestep spacing (linear in t), exponential sigmas.
SPACINGS = {"karras": {}, "linear": {"use_karras_sigmas": False},
            "exponential": {"use_karras_sigmas": False, "use_exponential_sigmas": True}}


class EDMMixture:
    """The bench's mixture seen through EDM's preconditioning: the network output and the exact posterior at (x, t),
    t = log(sigma) / 4."""

    def __init__(self, bench: GMMBench, scheduler):
        self.bench, self.sigma_data = bench, scheduler.config.sigma_data
        abar = bench.gmm.path.abar
        self.sigmas = ((1 - abar) / abar).sqrt()

    def _at(self, x_in, t):
        """(sigma, x in EDM's space, the mixture's fractional timestep at sigma, x in its VP space)."""
        sigma = math.exp(4 * float(t))
        i = int(torch.searchsorted(self.sigmas, torch.tensor(sigma, dtype=self.sigmas.dtype)).clamp(1, 999))
        t_mix = i - 1 + float((sigma - self.sigmas[i - 1]) / (self.sigmas[i] - self.sigmas[i - 1]))
        return sigma, x_in, t_mix, x_in / math.sqrt(1 + sigma**2)

    def branch_model(self, negatives):
        inner = self.bench.gmm.branch_model(negatives)

        def model(x_in, t):
            sigma, _, t_mix, _ = self._at(x_in, t)
            x = x_in * (sigma**2 + self.sigma_data**2) ** 0.5  # undo c_in
            eps = inner(x / math.sqrt(1 + sigma**2), t_mix).double()
            c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
            c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
            return ((x.double() - sigma * eps - c_skip * x.double()) / c_out).to(x_in.dtype)

        return model

    def posterior(self, x, t):
        sigma, _, t_mix, x_vp = self._at(x, t)
        return self.bench.gmm.posterior(x_vp, t_mix)[:, self.bench.remove]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", choices=SOLVERS, default="2m")
    parser.add_argument("--spacing", choices=SPACINGS, default="karras")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--reading", choices=READINGS, default=None, help="the tracker's reading (default: its own)")
    parser.add_argument("--endpoint", choices=("on", "off"), default=None,
                        help="the tracker's endpoint reading (default: the kernel's, on for multistep)")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cls, changes = SOLVERS[args.solver]
    results = {}
    for name, config in SUITE.items():
        bench = GMMBench(config, args.steps, args.num_samples, seed=0, scheduler="dpmpp-2m-sde")
        if cls.startswith("EDM"):
            scheduler = diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", sigma_min=0.0101)
            mixture = EDMMixture(bench, scheduler)
            model, posterior = mixture.branch_model, mixture.posterior
        else:
            scheduler = getattr(diffusers, cls).from_config(bench.scheduler.config, **changes, **SPACINGS[args.spacing])
            model, posterior = bench.gmm.branch_model, bench.exact_posterior
        rows = []
        for method, params, factory in bench.configs(["none", "np", "sld", "dng", "dng-oracle", "target"]):
            if factory == "target":
                rows.append(bench.run(method, params, factory)[0])
                continue
            rule = factory() if factory else None
            if method == "dng":
                endpoint = None if args.endpoint is None else args.endpoint == "on"
                rule = rule.with_posterior(TrackedPosterior(args.reading, endpoint))
            elif method == "dng-oracle":
                rule = rule.with_posterior(posterior)
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(bench.n, bench.gmm.dim, generator=g)
            try:
                # Divergence is scored ("diverged"), as the suite's own rows do it.
                x = sample(model(bench.remove if rule else []), scheduler, rule, noise=noise,
                           num_inference_steps=args.steps, num_negatives=len(bench.remove) if rule else 0,
                           generator=g, progress=False, max_rms=None).samples
            except NonFiniteError:
                x = torch.full((bench.n, bench.gmm.dim), math.nan)
            rows.append(bench.score(method, params, x, 0.0, None))
        results[name] = rows
        by = {r["method"]: r for r in rows}
        print(f"{name:<22} oracle forb {by['dng-oracle']['forbidden_rate']:.4f} | dng forb "
              f"{by['dng']['forbidden_rate']:.4f} kl {by['dng']['class_kl']:.4f} sW2/oracle "
              f"{by['dng']['sliced_w2'] / by['dng-oracle']['sliced_w2']:.2f}", flush=True)
    spacing = "" if args.spacing == "karras" else f" {args.spacing}"
    write_json(args.out, {"steps": args.steps, "scheduler": f"dpm-{args.solver}-sde{spacing}", "variance": "",
                          "num_samples": args.num_samples, "dng": {}, "reading": args.reading, "results": results})


if __name__ == "__main__":
    main()
