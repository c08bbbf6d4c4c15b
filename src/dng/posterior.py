"""Tracking p_t(c-|x_t) along the sampled chain by exact Bayes over the reverse kernels."""

from __future__ import annotations

import math

import torch

from dng.errors import ConfigError


def check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def gaussian_llr(x_prev, mean_u, diff, std: float, temperature: float = 1.0, offset: float = 0.0):
    """Tempered log q(x_prev|x, c-)/q(x_prev|x) for equal-variance Gaussian kernels, one value per sample.

    `diff` = mean_u - mean_n, with a leading axis of negatives: the result has shape [batch, negatives].
    Uses |x-mu_n|^2 - |x-mu_u|^2 = |mu_u-mu_n|^2 + 2<x-mu_u, mu_u-mu_n>, which keeps float32
    accurate for large latents where the two norms nearly cancel.
    """
    residual = x_prev.to(torch.float32) - mean_u.to(torch.float32)
    diff = diff.to(torch.float32)
    gap = (diff * torch.add(diff, residual, alpha=2)).reshape(*diff.shape[:2], -1).sum(-1)
    return ((offset - temperature * gap) / (2 * std**2)).T


class PosteriorTracker:
    """Per-sample log-posterior of each negative concept, updated after every stochastic step."""

    def __init__(self, prior=0.1, p_min: float = 1e-6, p_max: float = 0.99, exclusive: bool = False,
                 dtype=torch.float32):
        priors = [prior] if isinstance(prior, (int, float)) else list(prior)
        self.priors = [check_probability("prior", p) for p in priors]
        self.p_min = check_probability("p_min", p_min)
        self.p_max = check_probability("p_max", p_max)
        if self.p_min >= self.p_max:
            raise ConfigError(f"p_min ({p_min}) must be smaller than p_max ({p_max})")
        if exclusive and sum(self.priors) >= 1.0:
            raise ConfigError(f"exclusive concepts need priors summing below 1, got {sum(self.priors)}")
        self.exclusive = exclusive
        self.dtype = dtype
        self.log_p = None

    def start(self, batch_size: int, num_concepts: int, device=None) -> None:
        priors = self.priors * num_concepts if len(self.priors) == 1 else self.priors
        if len(priors) != num_concepts:
            raise ConfigError(f"{len(self.priors)} priors given for {num_concepts} negative concepts; give one or "
                              f"one per concept")
        log_prior = torch.tensor([math.log(p) for p in priors], dtype=self.dtype, device=device)
        self.log_p = self._clamp(log_prior.expand(batch_size, num_concepts).clone())

    @property
    def p(self) -> torch.Tensor:
        """Posterior probabilities, shape [batch, concepts]."""
        return self.log_p.exp()

    def update(self, llr: torch.Tensor) -> None:
        """Bayes step log p += llr, then the clamp; a NaN ratio (no information) leaves p unchanged."""
        llr = torch.nan_to_num(llr.to(self.dtype), nan=0.0, posinf=1e30, neginf=-1e30)
        self.log_p = self._clamp(self.log_p + llr)

    def _clamp(self, log_p: torch.Tensor) -> torch.Tensor:
        if not self.exclusive:
            return log_p.clamp(math.log(self.p_min), math.log(self.p_max))
        # Mutually exclusive concepts: cap their total at p_max (so 1 - sum(p) > 0), keeping their ratios.
        # Shift so the largest log p is <= 0 first: a huge log p would otherwise cancel to 0 in float32.
        log_p = (log_p - log_p.amax(-1, keepdim=True).clamp(min=0)).clamp(min=math.log(self.p_min))
        total = torch.logsumexp(log_p, dim=-1, keepdim=True)
        return log_p - (total - math.log(self.p_max)).clamp(min=0)
