"""Guidance rules: how the branch predictions of one step combine into the epsilon the sampler uses.

Shapes: `eps_u` and `eps_p` are [batch, ...]; `eps_n` is [negatives, batch, ...]. `combine` returns
the combined epsilon, the scale it applied, [batch, negatives] (for SLD the mean element-wise scale),
and the posterior p_t(c-|x_t) it used ([batch, negatives], None for rules without one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dng.errors import ConfigError
from dng.posterior import PosteriorTracker, gaussian_llr, mixture_llr


@dataclass
class Step:
    """Where the sampler is: step index, timestep, the current sample x_t (unscaled), and the noise levels sigma
    of x_t and of the step's result."""

    index: int
    t: torch.Tensor
    x: torch.Tensor
    sigma: float = math.nan
    sigma_next: float = math.nan


def check_scale(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def base_prediction(eps_u, eps_p=None, cfg_scale: float = 1.0):
    """Unconditional epsilon, or classifier-free guidance eps_u + w (eps_p - eps_u) with a positive branch."""
    return eps_u if eps_p is None else eps_u + cfg_scale * (eps_p - eps_u)


def _push(base, eps_u, eps_n, scale):
    """base - sum_i scale_i * (eps_n_i - eps_u) with per-sample scales [batch, negatives]."""
    per_negative = scale.t().reshape(scale.shape[::-1] + (1,) * (eps_u.dim() - 1)).to(eps_u.dtype)
    # One fused multiply-add per negative: on a cheap model the push is a visible part of the step.
    for s, e in zip(per_negative, eps_n, strict=True):
        base = torch.addcmul(base, s, e - eps_u, value=-1)
    return base


class Guidance:
    """A rule over the branches; stateful rules reset in `start`."""

    tracks_posterior = False
    # Rules that read where the chain is (Step.sigma) need the scheduler's kernel, so a stochastic scheduler.
    needs_noise_levels = False

    def check(self, num_negatives: int) -> None:
        """Refuse a rule that cannot run with this many negatives, before any sampling."""
        if num_negatives < 1:
            raise ConfigError(f"{type(self).__name__} needs at least one negative branch")

    def start(self, batch_size: int, num_negatives: int, device=None) -> None:
        self.check(num_negatives)

    def combine(self, eps_u, eps_n, step: Step, eps_p=None, cfg_scale: float = 1.0):
        """(epsilon, scale [batch, negatives], posterior [batch, negatives] or None)."""
        raise NotImplementedError


class NegativePrompt(Guidance):
    """Negative prompting: eps = base - lam * (eps_n - eps_u) with one constant scale."""

    def __init__(self, scale: float = 1.0):
        self.scale = check_scale("scale", scale)

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        scale = torch.full((eps_u.shape[0], eps_n.shape[0]), self.scale, device=eps_u.device)
        return _push(base_prediction(eps_u, eps_p, cfg_scale), eps_u, eps_n, scale), scale, None


SLD_PRESETS = {
    "weak": dict(warmup_steps=15, scale=20.0, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": dict(warmup_steps=10, scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": dict(warmup_steps=7, scale=2000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": dict(warmup_steps=0, scale=5000.0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


class SafeLatentDiffusion(Guidance):
    """Safe Latent Diffusion as in diffusers' StableDiffusionPipelineSafe, one momentum per negative.

    Without a positive branch the unconditional prediction stands in for the text branch and w = 1.
    """

    def __init__(self, warmup_steps: int = 10, scale: float = 1000.0, threshold: float = 0.01,
                 momentum_scale: float = 0.3, momentum_beta: float = 0.4):
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a whole number >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.scale = check_scale("scale", scale)
        self.threshold = check_finite("threshold", threshold)
        self.momentum_scale = check_scale("momentum_scale", momentum_scale)
        self.momentum_beta = check_scale("momentum_beta", momentum_beta)
        if self.momentum_beta > 1:
            raise ConfigError(f"momentum_beta must lie in [0, 1], got {momentum_beta}")
        self.momentum = None

    @classmethod
    def preset(cls, name: str) -> SafeLatentDiffusion:
        key = name.lower()
        if key not in SLD_PRESETS:
            raise ConfigError(f"unknown SLD preset {name!r}; choose one of {', '.join(SLD_PRESETS)}")
        return cls(**SLD_PRESETS[key])

    def start(self, batch_size, num_negatives, device=None):
        super().start(batch_size, num_negatives, device)
        self.momentum = None

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        eps_text = eps_u if eps_p is None else eps_p
        w = 1.0 if eps_p is None else cfg_scale
        # Same arithmetic as diffusers, in place where a temporary allows it: at 10^4 samples x 10^3
        # steps every full-size pass counts.
        gap = eps_text - eps_n
        elem_scale = torch.clamp_(gap.abs().mul_(self.scale), max=1.0).masked_fill_(gap >= self.threshold, 0.0)
        safety = (eps_n - eps_u).mul_(elem_scale)
        if self.momentum is None:
            self.momentum = safety * (1 - self.momentum_beta)
        else:
            safety.add_(self.momentum, alpha=self.momentum_scale)
            self.momentum = torch.lerp(safety, self.momentum, self.momentum_beta)
        base = base_prediction(eps_u, eps_p, cfg_scale)
        scale = elem_scale.flatten(2).mean(-1).transpose(0, 1).float()
        if step.index < self.warmup_steps:
            return base, torch.zeros_like(scale), None
        for negative in safety:
            base = base.sub(negative, alpha=w)
        return base, w * scale, None


MODES = ("independent", "exclusive")
KERNEL_VARIANCES = ("step", "forward")
UPDATES = ("paper", "mixture")

# Every DNG setting has one source: `DNG_PRESETS`. "default" is what DynamicNegativeGuidance() and every entry point
# (pipelines, CLI, benches) use; the others are published settings. Noise levels are sigma = sqrt((1 - abar) / abar)
# (`dng.kernels`), so a setting means the same on every schedule, scheduler and step count. `offset` is a drift of
# log p per unit of log-SNR; `offset_per_step` is the published form, offset / (2 sigma_t^2) added once per step,
# which holds only for the sampler and step count it was tuned on.
DNG_PRESETS = {
    "default": dict(scale=1.0, prior=0.1, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.95,
                    late_boost=6.0, boost_sigma=0.72, sigma_min=0.0, push_cap=4.0),
    # Koulischer et al. 2025, class removal on CIFAR-10 with a 1000-step DDPM.
    "paper-cifar10": dict(scale=5.0, prior=0.01, temperature=0.2, offset=0.0, offset_per_step=2e-4, p_min=1e-6,
                          p_max=0.8, late_boost=1.0, boost_sigma=0.0, sigma_min=0.0, push_cap=0.0),
    # Koulischer et al. 2025, Stable Diffusion at CFG 7.5: lam0 12-27, temperature 0.2-0.3, offset 0.002-0.004.
    "paper-sd": dict(scale=15.0, prior=0.01, temperature=0.25, offset=0.0, offset_per_step=0.003, p_min=1e-6,
                     p_max=0.8, late_boost=1.0, boost_sigma=0.0, sigma_min=0.0, push_cap=0.0),
}
_D = DNG_PRESETS["default"]


class DynamicNegativeGuidance(Guidance):
    """DNG: eps = base - lam0 * p/(1-p) * (eps_n - eps_u) with p = p_t(c-|x_t) tracked per sample.

    Several negatives: "independent" concepts use lam_i = lam0 p_i/(1-p_i), mutually "exclusive" ones
    (classes) lam_i = lam0 p_i/(1-sum_j p_j). lam0 is `scale`, times `late_boost` where the noise level sigma is
    below `boost_sigma`; below `sigma_min` the rule neither guides nor tracks. `push_cap` (0: none) bounds each
    applied scale by push_cap / (the step's log-SNR gain): a large scale applied over one large step overshoots
    where the posterior would have fallen within it, which many small steps do not (on the exact mixtures at 25
    steps the boost alone distorted the kept classes up to 4.6x the exact rule's sliced W2; capped, 1.25x).
    `DynamicNegativeGuidance.preset(name)` gives a named setting of `DNG_PRESETS`; the defaults are its "default".

    Research options (keywords only): `offset_per_step` (the published per-step offset), `kernel_variance`
    ("step": the noise the step adds; "forward": the forward transition's), `update` ("paper": the unconditional
    reverse kernel is one Gaussian, as published; "mixture": `dng.posterior.mixture_llr`) and `posterior`
    (fn(x_t, t) -> p [batch, negatives] replacing tracking, e.g. the exact posterior of the Gaussian mixture).
    """

    tracks_posterior = True
    needs_noise_levels = True

    def __init__(self, scale: float = _D["scale"], prior=_D["prior"], temperature: float = _D["temperature"],
                 offset: float = _D["offset"], p_min: float = _D["p_min"], p_max: float = _D["p_max"],
                 mode: str = "independent", late_boost: float = _D["late_boost"],
                 boost_sigma: float = _D["boost_sigma"], sigma_min: float = _D["sigma_min"],
                 push_cap: float = _D["push_cap"], *,
                 offset_per_step: float = 0.0, kernel_variance: str = "step", update: str = "paper",
                 posterior: Callable | None = None):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if kernel_variance not in KERNEL_VARIANCES:
            raise ConfigError(f"kernel_variance must be one of {KERNEL_VARIANCES}, got {kernel_variance!r}")
        if update not in UPDATES:
            raise ConfigError(f"update must be one of {UPDATES}, got {update!r}")
        self.kernel_variance = kernel_variance
        self.update = update
        self.scale = check_scale("scale", scale)
        self.late_boost = check_scale("late_boost", late_boost)
        self.boost_sigma = check_scale("boost_sigma", boost_sigma)
        self.sigma_min = check_scale("sigma_min", sigma_min)
        self.push_cap = check_scale("push_cap", push_cap)
        self.temperature = check_scale("temperature", temperature)
        self.offset = check_finite("offset", offset)
        self.offset_per_step = check_finite("offset_per_step", offset_per_step)
        self.mode = mode
        self.tracker = PosteriorTracker(prior, p_min, p_max, exclusive=mode == "exclusive")
        self.read_posterior(posterior)

    def read_posterior(self, posterior: Callable | None) -> None:
        """Read p from `posterior(x_t, t)` -> [batch, negatives] at every step instead of tracking it (None: track)."""
        self.posterior_fn = posterior
        self.tracks_posterior = posterior is None

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> DynamicNegativeGuidance:
        """The named setting of `DNG_PRESETS`, with any argument overridden."""
        if name not in DNG_PRESETS:
            raise ConfigError(f"unknown DNG preset {name!r}; choose one of {', '.join(DNG_PRESETS)}")
        return cls(**{**DNG_PRESETS[name], **overrides})

    def check(self, num_negatives):
        super().check(num_negatives)
        self.tracker.priors_for(num_negatives)

    def start(self, batch_size, num_negatives, device=None):
        super().start(batch_size, num_negatives, device)
        self.tracker.start(batch_size, num_negatives, device)

    def posterior(self, step: Step) -> torch.Tensor:
        if self.posterior_fn is None:
            return self.tracker.p
        return self.posterior_fn(step.x, step.t).to(torch.float32).clamp(self.tracker.p_min, self.tracker.p_max)

    def lam0(self, sigma: float) -> float:
        """lam0 at noise level sigma: `scale`, times `late_boost` below `boost_sigma`, 0 below `sigma_min`."""
        if sigma < self.sigma_min:
            return 0.0
        return self.scale * self.late_boost if sigma < self.boost_sigma else self.scale

    def scales(self, p: torch.Tensor, lam0: float) -> torch.Tensor:
        rest = 1 - (p.sum(-1, keepdim=True) if self.mode == "exclusive" else p)
        return lam0 * p / rest

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        p = self.posterior(step)
        scale = self.scales(p, self.lam0(step.sigma))
        gain = log_snr_gain(step.sigma, step.sigma_next)
        if self.push_cap and gain:
            scale = scale.clamp(max=self.push_cap / gain)
        return _push(base_prediction(eps_u, eps_p, cfg_scale), eps_u, eps_n, scale), scale, p

    def observe(self, x_prev, moments) -> torch.Tensor | None:
        """Bayes update from the drawn x_{t-1} and the step's kernels (`dng.kernels.BranchMoments`); returns the
        step's llr, or None where the rule does not track (below `sigma_min`)."""
        if moments.sigma < self.sigma_min:
            return None
        kernel_std = moments.std if self.kernel_variance == "step" else moments.forward_std
        # Both offsets as one per-step offset o, which the updates add as o / (2 s^2).
        gain = log_snr_gain(moments.sigma, moments.sigma_next)
        offset = self.offset_per_step + self.offset * gain * 2 * kernel_std**2
        exclusive = self.mode == "exclusive"
        if self.update == "paper":
            llr = gaussian_llr(*moments.statistics(x_prev), kernel_std, self.temperature, offset)
        else:
            rd, dd = moments.statistics(x_prev, gram=exclusive)
            llr = mixture_llr(rd, dd, kernel_std, self.tracker.log_p, self.temperature, offset,
                              exclusive=exclusive, p_max=self.tracker.p_max)
        self.tracker.update(llr)
        return llr


def log_snr_gain(sigma: float, sigma_next: float) -> float:
    """log-SNR gained by a step from noise level sigma to sigma_next, 2 log(sigma / sigma_next); 0 where it is not
    finite (a step from infinite noise, flow matching's first, or onto clean data) or not known."""
    if 0 < sigma_next < sigma < math.inf:
        return 2 * math.log(sigma / sigma_next)
    return 0.0
