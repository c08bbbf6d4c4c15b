"""`dng bench gmm`: every guidance rule against the exact target on a Gaussian mixture."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, LTXEulerAncestralRFScheduler

from dng import metrics
from dng.bench.table import setting_label
from dng.errors import ConfigError, NonFiniteError
from dng.gmm import GaussianMixture, RectifiedFlow, VariancePreserving, default_mixture_config
from dng.guidance import SLD_PRESETS, DynamicNegativeGuidance, NegativePrompt, SafeLatentDiffusion
from dng.sampler import check_steps, sample
from dng.schedulers import SAMPLERS, named_sampler

METHODS = ("none", "np", "sld", "dng", "dng-oracle", "target")
# fixed_large (sigma_t^2 = beta_t) is the default: at 100 steps its unguided and exact-posterior samples sit within
# sampling noise of the exact target, where fixed_small's under-disperse (sliced W2 1.37x the noise floor,
# docs/GMM.md), so the bench measures the guidance and not the sampler's discretisation.
VARIANCES = ("fixed_large", "fixed_small")
NP_SCALES = (1.0, 2.0, 5.0)
# On the rectified-flow path: diffusers' flow-matching Euler step with stochastic_sampling (the x0 estimate re-noised
# to the next level, SD3's and Flux's scheduler made stochastic) and Euler ancestral for rectified flow (eta 1), whose
# chain, unlike the re-noising one, converges to the data as steps grow (docs/GMM.md). The others are
# variance-preserving samplers on a 1000-step linear-beta schedule.
FLOW_SAMPLERS = ("flow-euler", "flow-euler-a")
SCHEDULERS = (*SAMPLERS, *FLOW_SAMPLERS)


class Sampler(NamedTuple):
    """A scheduler, the eta its step needs, the mixture's forward process under it, and set_timesteps' extras."""

    scheduler: object
    eta: float
    path: object
    set_timesteps_kwargs: dict


def make_sampler(name: str, steps: int, variance: str = VARIANCES[0], shift: float | None = None,
                 mu: float | None = None) -> Sampler:
    """The named sampler for `steps` steps with its path; `shift` (SD3) or `mu` (Flux's dynamic shifting) on the
    flow samplers only."""
    if variance not in VARIANCES:
        raise ConfigError(f"unknown sampler variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    for option, value in (("--shift", shift), ("--mu", mu)):
        if value is not None and name not in FLOW_SAMPLERS:
            raise ConfigError(f"{option} shifts flow matching's schedule; it needs --scheduler "
                              f"{' or '.join(FLOW_SAMPLERS)}")
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{option} must be a finite number, got {value}")
    if name not in FLOW_SAMPLERS:
        # The DDPM step's variance is the bench's `variance`; other samplers take only its training schedule.
        training = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type=variance)
        scheduler, eta = named_sampler(name, training.config)
        check_steps(steps, scheduler, "--steps")
        return Sampler(scheduler, eta, VariancePreserving(scheduler.alphas_cumprod), {})
    if shift is not None and mu is not None:
        raise ConfigError("give --shift (SD3's fixed shift) or --mu (Flux's dynamic shifting), not both: with "
                          "dynamic shifting the scheduler ignores shift")
    if shift is not None and shift <= 0:
        raise ConfigError(f"--shift must be > 0, got {shift}")
    flow = FlowMatchEulerDiscreteScheduler(shift=1.0 if shift is None else shift, use_dynamic_shifting=mu is not None,
                                           stochastic_sampling=True)
    check_steps(steps, flow, "--steps")
    path = RectifiedFlow(flow.config.num_train_timesteps)
    extra = {} if mu is None else {"mu": mu}
    if name == "flow-euler":
        return Sampler(flow, 0.0, path, extra)
    # Built from the flow-matching config, which it keeps and rebuilds its (shifted) schedule from at set_timesteps.
    logging.getLogger("diffusers.configuration_utils").addFilter(_without_ltx_config_warning)
    return Sampler(LTXEulerAncestralRFScheduler.from_config(flow.config, eta=1.0), 0.0, path, extra)


def _without_ltx_config_warning(record) -> bool:
    # That rebuild passes LTX's own eta to FlowMatchEulerDiscreteScheduler, and diffusers warns at every set_timesteps
    # (every row) that eta is not a flow-matching key: true and harmless.
    message = record.getMessage()
    return not ("were passed to FlowMatchEulerDiscreteScheduler" in message and "'eta'" in message)


def load_config(path: str | None) -> dict:
    """The mixture config from a JSON file, or the built-in default; validated with errors that say what to fix."""
    if path is None:
        return default_mixture_config()
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a JSON object with means, stds, weights and remove")
    missing = [key for key in ("means", "stds", "weights", "remove") if key not in config]
    if missing:
        raise ConfigError(f"config file {path} lacks {', '.join(missing)}; expected "
                          '{"means": [[...], ...], "stds": [...], "weights": [...], "remove": [k, ...]}')
    remove = config["remove"]
    k = len(config["means"]) if isinstance(config["means"], list) else 0
    # `type(c) is int`: JSON's true is a Python bool, which isinstance(c, int) would take for component 1.
    if (not isinstance(remove, list) or not remove or not all(type(c) is int and 0 <= c < k for c in remove)
            or len(set(remove)) != len(remove) or len(remove) >= k):
        raise ConfigError(f"remove must be a non-empty list of distinct component indices in [0, {k}) that "
                          f"keeps at least one component, got {remove!r}")
    return config


class SlicedW2:
    """Sliced 2-Wasserstein distance to a fixed reference: root mean over random directions of the 1-D W2^2
    between projections. The reference's sorted projections are computed once for all rows of a bench."""

    def __init__(self, reference: torch.Tensor, projections: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(reference.shape[1], projections, generator=g, dtype=torch.float64)
        self.dirs = (dirs / dirs.norm(dim=0, keepdim=True)).T
        self.reference = self._project(reference).sort(-1).values

    def _project(self, x):
        # [directions, samples]: sorting along contiguous rows is twice as fast as along columns.
        return self.dirs @ x.double().T

    @staticmethod
    def _quantiles(sorted_rows, count):
        """`count` evenly spaced quantiles of each row; at count = row length they are the sorted values."""
        if sorted_rows.shape[-1] == count:
            return sorted_rows
        return torch.quantile(sorted_rows, torch.linspace(0, 1, count, dtype=torch.float64), dim=-1).T

    def __call__(self, x: torch.Tensor) -> float:
        count = min(len(x), self.reference.shape[-1])
        pa = self._quantiles(self._project(x).sort(-1).values, count)
        return float(((pa - self._quantiles(self.reference, count)) ** 2).mean().sqrt())


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two sample sets."""
    return SlicedW2(b, projections, seed)(a)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return p.log() - (-p).log1p()


class GMMBench:
    """One mixture, one scheduler, exact reference samples; `run(method)` returns a result row."""

    def __init__(self, config: dict, steps: int, num_samples: int, seed: int, variance: str = VARIANCES[0],
                 scheduler: str = "ddpm", shift: float | None = None, mu: float | None = None):
        if steps < 1 or num_samples < 2:
            raise ConfigError(f"need --steps >= 1 and --num-samples >= 2, got {steps} and {num_samples}")
        self.variance = variance
        self.spec = (config, steps, num_samples, seed, variance, scheduler, shift, mu)
        self.scheduler, self.eta, path, self.set_timesteps_kwargs = make_sampler(scheduler, steps, variance, shift,
                                                                                 mu)
        self.gmm = GaussianMixture(config["means"], config["stds"], config["weights"], path, dtype=torch.float32)
        # The model's input: the scheduler's sample, scaled by 1 / sqrt(1 + sigma^2) on Euler-type ones.
        self.model_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)
        self.remove = list(config["remove"])
        self.kept = [k for k in range(self.gmm.num_classes) if k not in self.remove]
        self.steps, self.n, self.seed = steps, num_samples, seed
        reference = self.gmm.sample(num_samples, self.kept, torch.Generator().manual_seed(seed + 1))[0]
        self.sliced_w2 = SlicedW2(reference, seed=seed)
        self.prior = float(self.gmm.weights[self.remove].sum())

    def exact_posterior(self, x, t):
        return self.gmm.posterior(self.model_input(x, t), t)[:, self.remove]

    def configs(self, methods):
        """(method, params, guidance factory) for every row the methods ask for."""
        for method in methods:
            if method == "none":
                yield method, {}, None
            elif method == "np":
                for lam in NP_SCALES:
                    yield method, {"scale": lam}, lambda lam=lam: NegativePrompt(lam)
            elif method == "sld":
                for name, preset in SLD_PRESETS.items():
                    yield method, {"preset": name, **preset}, lambda name=name: SafeLatentDiffusion.preset(name)
            elif method == "dng":
                # The library default, told the true prior of the removed classes.
                rule = {"prior": self.prior / len(self.remove), "mode": "exclusive"}
                yield method, {"preset": "default", **rule}, lambda rule=rule: DynamicNegativeGuidance(**rule)
            elif method == "dng-oracle":
                # The exact rule: lam0 = 1 everywhere on the exact posterior is the score of the target.
                oracle = {"lam0": 1.0, "late_boost": 1.0, "sigma_min": 0.0, "push_cap": 0.0, "p_min": 1e-6,
                          "p_max": 1 - 1e-6, "mode": "exclusive"}
                yield method, {**oracle, "posterior": "exact"}, lambda oracle=oracle: DynamicNegativeGuidance(
                    **oracle, posterior=self.exact_posterior)
            elif method == "target":
                yield method, {}, "target"
            else:
                raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def run(self, method: str, params: dict, factory, progress: bool = False, mae_range=None):
        """Sample with one rule and score it; returns (row, trace or None).

        `mae_range` (lo, hi): the p range both posteriors are read in for posterior_logit_mae; default the run's own
        [p_min, p_max]. A fixed range compares trackers whose clamps differ.
        """
        g = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()
        trace, mae = None, None
        if factory == "target":
            x = self.gmm.sample(self.n, self.kept, g)[0]
        else:
            guidance = factory() if factory else None
            negatives = self.remove if guidance else []
            noise = torch.randn(self.n, self.gmm.dim, generator=g)
            errors = []
            tracked = isinstance(guidance, DynamicNegativeGuidance) and guidance.tracks

            current = [noise]

            def measure(i, t, x_prev, info):
                # The p used at step i belongs to x_t, the sample before this step.
                if tracked:
                    lo, hi = mae_range or (guidance.config.p_min, guidance.config.p_max)
                    exact = self.exact_posterior(current[0], t).clamp(lo, hi)
                    errors.append((_logit(info["p"].clamp(lo, hi)) - _logit(exact)).abs().mean())
                current[0] = x_prev

            try:
                out = sample(self.gmm.branch_model(negatives), self.scheduler, guidance, noise=noise,
                             num_inference_steps=self.steps, num_negatives=len(negatives), eta=self.eta, generator=g,
                             callback=measure, progress=progress, return_trace=guidance is not None,
                             set_timesteps_kwargs=self.set_timesteps_kwargs,
                             # A mixture's scale is its config's, and divergence is scored here ("diverged").
                             max_rms=None)
                x, trace = out.samples, out.trace
            except NonFiniteError:
                # A rule that pushed samples out of float range (NP at scale 5 on the re-noising flow sampler): the
                # loop stops the whole batch, so the row scores every sample as diverged.
                x = torch.full((self.n, self.gmm.dim), math.nan)
            mae = float(torch.stack(errors).mean()) if errors else None
        seconds = time.perf_counter() - start
        return self.score(method, params, x, seconds, mae), trace

    def score(self, method, params, x, seconds, mae) -> dict:
        finite = torch.isfinite(x).all(-1)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))
        labels = self.gmm.log_joint(x).argmax(-1)
        labels[~finite] = self.remove[0]
        log_density = self.gmm.log_density(x, classes=self.kept)
        return {
            "method": method,
            "params": {k: v for k, v in params.items() if not callable(v)},
            "setting": setting_label(method, params),
            "forbidden_rate": float(torch.isin(labels, torch.tensor(self.remove)).double().mean()),
            "class_kl": metrics.class_kl(labels.numpy(), self.kept, self.gmm.weights[self.kept].numpy()),
            "target_log_density": float(log_density[finite].mean()) if finite.any() else -math.inf,
            "sliced_w2": self.sliced_w2(x) if finite.all() else math.inf,
            "posterior_logit_mae": mae,
            "seconds": seconds,
            "diverged": int((~finite).sum()),
        }


def format_table(rows: list[dict]) -> str:
    header = (f"{'method':<11} {'params':<28} {'forbidden':>9} {'class_kl':>9} {'log p':>9} {'sW2':>8} "
              f"{'mae':>6} {'s':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["params"].items() if k in ("scale", "preset", "prior") and v != "default")
        mae = "" if r["posterior_logit_mae"] is None else f"{r['posterior_logit_mae']:.3f}"
        lines.append(f"{r['method']:<11} {params:<28} {r['forbidden_rate']:>9.4f} {r['class_kl']:>9.4f} "
                     f"{r['target_log_density']:>9.2f} {r['sliced_w2']:>8.4f} {mae:>6} {r['seconds']:>6.1f}")
    return "\n".join(lines)


_worker_bench: GMMBench | None = None


def _start_worker(spec, threads):
    global _worker_bench
    if threads:
        torch.set_num_threads(threads)
    _worker_bench = GMMBench(*spec)


def _run_cell(index, methods, keep_traces):
    method, params, factory = list(_worker_bench.configs(methods))[index]
    row, trace = _worker_bench.run(method, params, factory)
    return row, trace if method in keep_traces else None


def run_rows(bench: GMMBench, methods, jobs: int = 1, threads: int | None = None, keep_traces=(), on_row=None):
    """Every row the methods ask for, in order, as (row, trace if the row's method is in `keep_traces`).

    With jobs > 1 the rows are sampled in that many fresh processes (spawned: a forked torch can hang in its
    thread pool). Every row seeds its own generator, so the rows do not depend on `jobs`.
    """
    cells = list(bench.configs(methods))
    if jobs == 1:
        results = []
        for method, params, factory in cells:
            row, trace = bench.run(method, params, factory)
            results.append((row, trace if method in keep_traces else None))
            if on_row:
                on_row()
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(cells)), mp_context=context, initializer=_start_worker,
                             initargs=(bench.spec, threads)) as pool:
        futures = [pool.submit(_run_cell, i, methods, set(keep_traces)) for i in range(len(cells))]
        for _ in as_completed(futures):
            if on_row:
                on_row()
        return [future.result() for future in futures]
