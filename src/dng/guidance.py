"""Guidance rules: how the branch predictions of one step combine into the epsilon the sampler uses.

Shapes: `eps_u` and `eps_p` are [batch, ...]; `eps_n` is [negatives, batch, ...]. `combine` returns
the combined epsilon, the scale it applied, [batch, negatives] (for SLD the mean element-wise scale),
and the posterior p_t(c-|x_t) it used ([batch, negatives], None for rules without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dng.config import PRESETS, DNGConfig, check_finite, check_scale
from dng.defaults import SLD_PRESET
from dng.errors import ConfigError
from dng.kernels import verify_kernel
from dng.posterior import ReadPosterior, TrackedPosterior, log_snr_gain
from dng.schedulers import reverse_kernel


@dataclass
class Step:
    """Where the sampler is: step index, timestep and the current sample x_t (unscaled)."""

    index: int
    t: torch.Tensor
    x: torch.Tensor


def base_prediction(eps_u, eps_p=None, cfg_scale: float = 1.0):
    """Unconditional epsilon, or classifier-free guidance eps_u + w (eps_p - eps_u) with a positive branch."""
    if eps_p is None:
        return eps_u
    # At w = 1 the prompt's branch itself, to the bit: what a pipeline without CFG (or Flux's distilled guidance)
    # steps with, and eps_u + (eps_p - eps_u) rounds differently.
    return eps_p if cfg_scale == 1 else eps_u + cfg_scale * (eps_p - eps_u)


def _push(base, eps_u, eps_n, scale):
    """base - sum_i scale_i * (eps_n_i - eps_u) with per-sample scales [batch, negatives]."""
    per_negative = scale.t().reshape(scale.shape[::-1] + (1,) * (eps_u.dim() - 1)).to(eps_u.dtype)
    # One fused multiply-add per negative: on a cheap model the push is a visible part of the step.
    for s, e in zip(per_negative, eps_n, strict=True):
        base = torch.addcmul(base, s, e - eps_u, value=-1)
    return base


class Guidance:
    """A rule over the branches of one step. `start` gets the scheduler before the first step, `combine` the
    branch predictions before each step and `after_step` the sample the step drew; stateful rules reset in `start`.
    """

    def check(self, num_negatives: int) -> None:
        """Refuse a rule that cannot run with this many negatives, before any sampling."""
        if num_negatives < 1:
            raise ConfigError(f"{type(self).__name__} needs at least one negative branch")

    def start(self, scheduler, *, eta: float = 0.0, sample_shape: tuple, num_negatives: int, device=None) -> None:
        """Before the first step (after `scheduler.set_timesteps`): `sample_shape` is x_t's, [batch, ...]."""
        self.check(num_negatives)

    def combine(self, eps_u, eps_n, step: Step, eps_p=None, cfg_scale: float = 1.0):
        """(epsilon, applied scale [batch, negatives], posterior [batch, negatives] or None)."""
        raise NotImplementedError

    def after_step(self, x_prev) -> dict:
        """What the rule records of the step once it is taken (e.g. DNG's llr and noise levels), for the trace."""
        return {}


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
    """Safe Latent Diffusion as in diffusers' StableDiffusionPipelineSafe, one momentum per negative: the named
    preset of `SLD_PRESETS` with `changes` (warmup_steps, scale, threshold, momentum_scale, momentum_beta).

    Without a positive branch the unconditional prediction stands in for the text branch and w = 1.
    """

    def __init__(self, preset: str = SLD_PRESET, **changes):
        if not isinstance(preset, str) or preset.lower() not in SLD_PRESETS:
            raise ConfigError(f"unknown SLD preset {preset!r}; choose one of {', '.join(SLD_PRESETS)}")
        names = SLD_PRESETS[SLD_PRESET]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ConfigError(f"unknown SLD setting {unknown[0]!r}; the settings are {', '.join(names)}")
        settings = {**SLD_PRESETS[preset.lower()], **changes}
        warmup_steps = settings["warmup_steps"]
        if not isinstance(warmup_steps, (int, float)) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a whole number >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.scale = check_scale("scale", settings["scale"])
        self.threshold = check_finite("threshold", settings["threshold"])
        self.momentum_scale = check_scale("momentum_scale", settings["momentum_scale"])
        self.momentum_beta = check_scale("momentum_beta", settings["momentum_beta"])
        if self.momentum_beta > 1:
            raise ConfigError(f"momentum_beta must lie in [0, 1], got {self.momentum_beta}")
        self.momentum = None

    @classmethod
    def preset(cls, name: str) -> SafeLatentDiffusion:
        """The named setting of `SLD_PRESETS` (diffusers' SafetyConfig)."""
        return cls(name)

    def start(self, scheduler, *, eta=0.0, sample_shape, num_negatives, device=None):
        super().start(scheduler, eta=eta, sample_shape=sample_shape, num_negatives=num_negatives, device=device)
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


class DynamicNegativeGuidance(Guidance):
    """DNG: eps = base - lam0(sigma) * p/(1-p) * (eps_n - eps_u), with p = p_t(c-|x_t) per sample.

    `config` is a `DNGConfig` or the name of one of `dng.config.PRESETS` ("default"), with `changes` over it
    (`DynamicNegativeGuidance(lam0=2)`). `posterior` says where p comes from: `TrackedPosterior()` (the default,
    Bayes over the sampler's own steps), or a callable fn(x_t, t) -> [batch, negatives] read at every step instead
    (`ReadPosterior`: the exact mixture's posterior, the model's own from every class branch). The rule builds the
    scheduler's reverse kernel in `start` (a stochastic scheduler is needed: the kernel gives where the chain is, as
    noise levels, and the tracker's evidence).
    """

    def __init__(self, config: DNGConfig | str = "default", *, posterior=None, **changes):
        if isinstance(config, str):
            config = DNGConfig.preset(config)
        if not isinstance(config, DNGConfig):
            raise ConfigError(f"DynamicNegativeGuidance takes a DNGConfig or a preset name ({', '.join(PRESETS)}), "
                              f"got {type(config).__name__}")
        self.config = config.replace(**changes) if changes else config
        if posterior is None:
            posterior = TrackedPosterior()
        elif not hasattr(posterior, "read"):
            posterior = ReadPosterior(posterior)
        self.posterior = posterior
        self.kernel = None

    @classmethod
    def preset(cls, name: str = "default", **changes) -> DynamicNegativeGuidance:
        """The named setting of `dng.config.PRESETS`, with `changes`."""
        return cls(DNGConfig.preset(name, **changes))

    def with_posterior(self, posterior) -> DynamicNegativeGuidance:
        """The same rule reading p from `posterior` (a source or a callable fn(x_t, t)) instead."""
        return type(self)(self.config, posterior=posterior)

    @property
    def tracks(self) -> bool:
        """Whether p is tracked along the chain (rather than read)."""
        return self.posterior.tracks

    def check(self, num_negatives):
        super().check(num_negatives)
        self.config.priors_for(num_negatives)

    def start(self, scheduler, *, eta=0.0, sample_shape, num_negatives, device=None):
        super().start(scheduler, eta=eta, sample_shape=sample_shape, num_negatives=num_negatives, device=device)
        self.kernel = reverse_kernel(scheduler, eta)
        # A diffusers release whose step no longer matches the kernel would bias p silently: refuse it instead.
        verify_kernel(scheduler, lambda copy: reverse_kernel(copy, eta), eta, tuple(sample_shape), device=device)
        self.posterior.start(self.config, self.kernel, sample_shape[0], num_negatives, device)
        self.levels = (float("nan"),) * 2

    def applied_scale(self, p: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """The scale each negative gets, [batch, negatives], at a step from noise level sigma to sigma_next:
        lam0(sigma) p_i / (1 - p_i) ("independent") or / (1 - sum_j p_j) ("exclusive"), capped by push_cap over the
        step's log-SNR gain."""
        rest = 1 - (p.sum(-1, keepdim=True) if self.config.exclusive else p)
        scale = self.config.lam0_at(sigma) * p / rest
        gain = log_snr_gain(sigma, sigma_next)
        if self.config.push_cap and gain:
            scale = scale.clamp(max=self.config.push_cap / gain)
        return scale

    def combine(self, eps_u, eps_n, step, eps_p=None, cfg_scale=1.0):
        if self.kernel is None:
            raise ConfigError("DynamicNegativeGuidance.start(scheduler, ...) must run before combine")
        # Before the step: Euler-type kernels read the step index that the step advances.
        self.levels = self.kernel.noise_levels(step.t)
        # The posterior reads the step first: a tracker may finish the last step's update from these outputs.
        self.posterior.before_step(step.t, step.x, eps_u, eps_n)
        p = self.posterior.read(step.x, step.t)
        scale = self.applied_scale(p, *self.levels)
        self.posterior.pushed(scale)
        return _push(base_prediction(eps_u, eps_p, cfg_scale), eps_u, eps_n, scale), scale, p

    def after_step(self, x_prev) -> dict:
        return {"llr": self.posterior.after_step(x_prev), "sigma": self.levels}
