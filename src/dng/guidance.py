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
    """Where the sampler is: step index, timestep and the current sample x_t (unscaled)."""

    index: int
    t: torch.Tensor
    x: torch.Tensor


def check_scale(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
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

    def start(self, batch_size: int, num_negatives: int, device=None) -> None:
        if num_negatives < 1:
            raise ConfigError(f"{type(self).__name__} needs at least one negative branch")

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
        self.threshold = float(threshold)
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


class DynamicNegativeGuidance(Guidance):
    """DNG: eps = base - lam0 * p/(1-p) * (eps_n - eps_u) with p = p_t(c-|x_t) tracked per sample.

    Several negatives: "independent" concepts use lam_i = lam0 p_i/(1-p_i), mutually "exclusive" ones
    (classes) lam_i = lam0 p_i/(1-sum_j p_j). `posterior=fn(x_t, t) -> p [batch, negatives]` replaces
    tracking by a known posterior (the exact one on the Gaussian mixture).

    Defaults come from the exact Gaussian-mixture bench (docs/GMM.md): temperature 1 is plain Bayes and lam0 = 1
    is the exact score of p(x | not c-), which is what the rule uses while the timestep is at or above
    `late_timestep`. Below it lam0 is `scale * late_boost`: late in the chain the tracked p of a sample heading
    into the class trails the exact p (the equal-variance kernel misses a curvature term whose error piles up
    there), and a constant lam0 large enough to catch those samples would also push every sample early, when p is
    still near the prior for all of them, and drain the classes next to the removed one. At 100 DDPM steps the
    boost (6 below t = 200) cuts the leak of the removed class 2-5x on the bench's mixtures with a lower class KL;
    it costs sliced W2 only where the removed class overlaps its neighbour (the d = 16 mixture). `late_boost=1`
    is the published rule with one lam0; the published CIFAR-10 setting is scale=5, prior=0.01,
    temperature=0.2, offset=2e-4, p_max=0.8, late_boost=1.

    `update` is how the tracker turns a step into evidence. "paper" (the default, as published): the unconditional
    reverse kernel is one Gaussian N(mean_u, s^2). "mixture": it is p N(mean_n, s^2) + (1 - p) N(mean_rest, s^2)
    with mean_rest = mean_u + p/(1-p) (mean_u - mean_n) (exclusive negatives: one categorical update over the
    negatives and "none of them"), see `dng.posterior.mixture_llr`. Temperature scales every hypothesis's squared
    distance and the offset adds offset/(2 s^2) to each negative's log-likelihood against the rest, so both mean
    the same as in "paper" while p is small. "mixture" is near-exact where the classes are narrow against the
    noise (two-class test: 8x smaller log-odds error) but on the bench's mixtures it does not beat "paper"
    (docs/GMM.md), so it is not the default.
    """

    tracks_posterior = True

    def __init__(self, scale: float = 1.0, prior=0.1, temperature: float = 1.0, offset: float = 0.0,
                 p_min: float = 1e-6, p_max: float = 0.95, mode: str = "independent",
                 kernel_variance: str = "step", update: str = "paper", late_boost: float = 6.0,
                 late_timestep: int = 200, posterior: Callable | None = None):
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
        if isinstance(late_timestep, bool) or not isinstance(late_timestep, int) or late_timestep < 0:
            raise ConfigError(f"late_timestep must be a timestep (an int >= 0), got {late_timestep!r}")
        self.late_timestep = late_timestep
        self.temperature = check_scale("temperature", temperature)
        self.offset = float(offset)
        if not math.isfinite(self.offset):
            raise ConfigError(f"offset must be finite, got {offset}")
        self.mode = mode
        self.tracker = PosteriorTracker(prior, p_min, p_max, exclusive=mode == "exclusive")
        self.posterior_fn = posterior
        self.tracks_posterior = posterior is None

    def start(self, batch_size, num_negatives, device=None):
        super().start(batch_size, num_negatives, device)
        self.tracker.start(batch_size, num_negatives, device)

    def posterior(self, step: Step) -> torch.Tensor:
        if self.posterior_fn is None:
            return self.tracker.p
        return self.posterior_fn(step.x, step.t).to(torch.float32).clamp(self.tracker.p_min, self.tracker.p_max)

    def lam0(self, t) -> float:
        """lam0 at timestep t: `scale`, times `late_boost` below `late_timestep`."""
        return self.scale * self.late_boost if float(t) < self.late_timestep else self.scale

    def scales(self, p: torch.Tensor, lam0: float) -> torch.Tensor:
        rest = 1 - (p.sum(-1, keepdim=True) if self.mode == "exclusive" else p)
        return lam0 * p / rest

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        p = self.posterior(step)
        scale = self.scales(p, self.lam0(step.t))
        return _push(base_prediction(eps_u, eps_p, cfg_scale), eps_u, eps_n, scale), scale, p

    def observe(self, x_prev, moments) -> torch.Tensor:
        """Bayes update from the drawn x_{t-1} and the step's kernels (`dng.kernels.BranchMoments`); returns the
        step's llr."""
        kernel_std = moments.std if self.kernel_variance == "step" else moments.forward_std
        exclusive = self.mode == "exclusive"
        if self.update == "paper":
            llr = gaussian_llr(*moments.statistics(x_prev), kernel_std, self.temperature, self.offset)
        else:
            rd, dd = moments.statistics(x_prev, gram=exclusive)
            llr = mixture_llr(rd, dd, kernel_std, self.tracker.log_p, self.temperature, self.offset,
                              exclusive=exclusive, p_max=self.tracker.p_max)
        self.tracker.update(llr)
        return llr
