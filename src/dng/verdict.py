"""The model's own verdict on finished samples: is x0 the concept, as the model's two branches see it?

For a clean sample x0, the branches' denoising errors at one noisy copy x = alpha x0 + sigma eps (the same eps for
both branches, log-SNR lam = log(alpha^2 / sigma^2)) give the model's log-likelihood ratio

    log p(x0|c) - log p(x0) = 1/2 int w(lam) E_eps[ |eps - eps_u(x)|^2 - |eps - eps_c(x)|^2 ] dlam

exactly for exact branches, with w = 1 over all lam (the likelihood weighting; the Gaussian mixture checks it).
A weighting w(lam) that falls from 1 to 0 gives instead the expected log-ratio of noisy copies of x0 at the noise
levels -dw/dlam (Kingma & Gao 2023): the verdict's default, w = sigmoid(midpoint - lam), reads x0 as seen through noise
at log-SNR about `midpoint`, which ignores the fine detail where a trained network's branches disagree for no reason of
the concept. docs/CALIBRATION.md measures the choice.

    verdict(model, x0, path_of(scheduler), num_concepts=K, exhaustive=True).p   # [N, K], p(c_k | x0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dng.config import check_probability
from dng.defaults import VERDICT_DRAWS
from dng.errors import ConfigError

# Where the default weighting sigmoid(MIDPOINT - lam) falls from 1 to 0; math.inf is the likelihood weighting.
MIDPOINT = 1.0
# Noisy copies per image (in pairs +eps, -eps at each of DRAWS / 2 stratified noise levels); each costs one model call
# of 1 + K branches. docs/CALIBRATION.md measures the error at this count.
DRAWS = VERDICT_DRAWS
PREDICTIONS = ("epsilon", "v_prediction")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                   "LTXEulerAncestralRFScheduler")


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))


def signal(lam):
    """alpha of the variance-preserving copy at log-SNR lam, sqrt(sigmoid(lam))."""
    return np.sqrt(_sigmoid(lam))


class DiffusionPath:
    """The DDPM (variance-preserving) family: x = alpha x0 + sigma eps, alpha^2 + sigma^2 = 1, on the training schedule
    `alphas_cumprod`; the model is called at the timestep of that noise level and predicts epsilon or v.

    A noise level between two training timesteps is called at the fractional timestep whose sigma / alpha is linear in
    t between them, as diffusers' Euler-type schedulers (and `dng.gmm.GaussianMixture`) read one.
    """

    def __init__(self, alphas_cumprod, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTIONS:
            raise ConfigError(f"prediction_type {prediction_type!r} is not supported: the verdict reads "
                              f"{' or '.join(PREDICTIONS)} (FlowPath reads a flow-matching velocity)")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.dim() != 1 or len(abar) < 2 or not ((abar > 0) & (abar < 1)).all() or not (abar.diff() < 0).all():
            raise ConfigError("alphas_cumprod must be a decreasing sequence of at least 2 numbers strictly between 0 "
                              "and 1 (a zero-terminal-SNR schedule has no finite last noise level)")
        self.ratio = ((1 - abar) / abar).sqrt().numpy()  # sigma / alpha per training timestep, increasing in t
        self.prediction_type = prediction_type
        self.lam_min, self.lam_max = -2 * math.log(self.ratio[-1]), -2 * math.log(self.ratio[0])

    @classmethod
    def from_scheduler(cls, scheduler) -> DiffusionPath:
        """The path of a DDPM-family diffusers scheduler (or its config): its betas and prediction type."""
        from diffusers import DDPMScheduler

        config = getattr(scheduler, "config", scheduler)
        return cls(DDPMScheduler.from_config(config).alphas_cumprod, config.get("prediction_type", "epsilon"))

    @staticmethod
    def scales(lam: float) -> tuple[float, float]:
        """(alpha, sigma) of x = alpha x0 + sigma eps at log-SNR lam."""
        return float(signal(lam)), float(signal(-lam))

    def timestep(self, lam: float) -> float:
        return float(np.interp(math.exp(-lam / 2), self.ratio, np.arange(len(self.ratio))))

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, lam: float) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = self.scales(lam)
        # v = alpha eps - sigma x0 with x = alpha x0 + sigma eps gives eps = sigma x + alpha v.
        return sigma * x + alpha * out


class FlowPath:
    """Rectified flow (SD3, Flux): x = (1 - s) x0 + s eps, the model called at timestep s * num_train_timesteps and
    predicting the velocity eps - x0; s runs over [s_min, s_max] (default: one training step from either end)."""

    def __init__(self, num_train_timesteps: int = 1000, s_min: float | None = None, s_max: float | None = None):
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be a whole number >= 2, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        s_min = check_probability("s_min", 1 / self.num_train_timesteps if s_min is None else s_min)
        s_max = check_probability("s_max", 1 - 1 / self.num_train_timesteps if s_max is None else s_max)
        if s_min >= s_max:
            raise ConfigError(f"need s_min < s_max, got {s_min} and {s_max}")
        self.lam_min, self.lam_max = self.log_snr(s_max), self.log_snr(s_min)

    @staticmethod
    def log_snr(s: float) -> float:
        return 2 * math.log((1 - s) / s)

    @staticmethod
    def scales(lam: float) -> tuple[float, float]:
        """(1 - s, s) of x = (1 - s) x0 + s eps at log-SNR lam."""
        s = float(_sigmoid(-lam / 2))
        return 1 - s, s

    def timestep(self, lam: float) -> float:
        return float(_sigmoid(-lam / 2)) * self.num_train_timesteps

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, lam: float) -> torch.Tensor:
        # v = eps - x0 with x = (1 - s) x0 + s eps gives eps = x + (1 - s) v.
        return x + self.scales(lam)[0] * out


def path_of(scheduler) -> DiffusionPath | FlowPath:
    """The noising path a diffusers scheduler's model was trained on: rectified flow for the flow-matching
    schedulers, else the DDPM family of its config."""
    if type(scheduler).__name__ in FLOW_SCHEDULERS:
        return FlowPath(scheduler.config.num_train_timesteps)
    return DiffusionPath.from_scheduler(scheduler)


def weighting(lam, midpoint: float = MIDPOINT):
    """The verdict's weight of log-SNR lam, sigmoid(midpoint - lam): 1 at high noise, 0 at low noise."""
    return _sigmoid(midpoint - np.asarray(lam, dtype=np.float64))


def stratified(grid: np.ndarray, density: np.ndarray, levels: int, u: float):
    """`levels` stratified draws from the density tabulated on `grid`, one per stratum of its CDF shifted by u in
    [0, 1), and the normalised density at each."""
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    lams = np.interp((np.arange(levels) + u) / levels * cdf[-1], cdf, grid)
    return lams, np.interp(lams, grid, density) / cdf[-1]


def noise_levels(lam_min: float, lam_max: float, midpoint: float, levels: int, u: float):
    """`levels` stratified log-SNRs in [lam_min, lam_max] and the importance weight of each, w(lam) over the draw
    density.

    The draws follow w(lam) alpha(lam): at low SNR the branches' difference, and with it the spread of the integrand,
    shrinks like alpha, so draws are spent where they matter (at 16 draws on the mixture: 1.5x lower spread of the
    likelihood weighting, 9x of the default).
    """
    grid = np.linspace(lam_min, lam_max, 4097)
    lams, density = stratified(grid, weighting(grid, midpoint) * signal(grid), levels, u)
    return lams, weighting(lams, midpoint) / density


def branch_errors(model, x0: torch.Tensor, path, num_concepts: int, lam: float, eps: torch.Tensor) -> torch.Tensor:
    """1/2 (|eps - eps_u(x)|^2 - |eps - eps_c(x)|^2) of every concept c at the noisy copy x of x0 at log-SNR lam,
    [batch, K] in float64; one model call of the branches [unconditional, concept 1..K]."""
    a, b = path.scales(lam)
    x = (a * x0 + b * eps).repeat((num_concepts + 1,) + (1,) * (x0.dim() - 1))
    t = torch.tensor(path.timestep(lam), dtype=torch.float32, device=x0.device)
    out = path.to_eps(model(x, t).float(), x.float(), lam).unflatten(0, (num_concepts + 1, len(x0)))
    e_u, e_c, eps = out[0], out[1:], eps.float()
    # The difference of the two squared norms without subtracting them, which keeps float32 accurate for large images.
    return 0.5 * ((e_c - e_u) * (2 * eps - e_u - e_c)).flatten(2).sum(-1).T.double()


def check_draws(draws, name: str = "draws") -> int:
    """The verdict's number of noisy copies per image: an even whole number >= 2, since they come in +eps, -eps
    pairs."""
    if isinstance(draws, bool) or int(draws) != draws or draws < 2 or draws % 2:
        raise ConfigError(f"{name} must be an even whole number >= 2 (pairs of +eps, -eps), got {draws}")
    return int(draws)


@torch.no_grad()
def log_ratios(model, x0: torch.Tensor, path, num_concepts: int, *, midpoint: float = MIDPOINT, draws: int = DRAWS,
               batch_size: int = 64, generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """The model's log p(x0|c_k) - log p(x0) under the weighting sigmoid(midpoint - lam), [N, K] float64.

    `model(x, t)` evaluates the branches [unconditional, concept 1..K] stacked along the batch axis in one call, as
    `dng.sampler.sample` calls it, at one timestep `t` per call; `path` (`path_of(scheduler)`) says how x0 is noised
    and how the output reads as epsilon. Each image gets `draws` noisy copies, +eps and -eps at each of `draws / 2`
    stratified noise levels shared by the images of a batch; the sign pairs cancel the part of the error that is
    linear in eps, which dominates at low noise.
    """
    check_draws(draws)
    if int(batch_size) != batch_size or batch_size < 1 or int(num_concepts) != num_concepts or num_concepts < 1:
        raise ConfigError(f"need batch_size >= 1 and num_concepts >= 1, got {batch_size} and {num_concepts}")
    if math.isnan(midpoint):
        raise ConfigError("midpoint must be a number (math.inf for the likelihood weighting)")
    if x0.dim() < 2 or not torch.isfinite(x0).all():
        raise ConfigError(f"x0 must be a finite batch [N, ...] of samples, got shape {tuple(x0.shape)}")
    draws, batch_size, num_concepts = int(draws), int(batch_size), int(num_concepts)
    out = []
    bar = tqdm(total=-(-len(x0) // batch_size) * draws, disable=not progress or None, desc="verdict", leave=False)
    for start in range(0, len(x0), batch_size):
        xb = x0[start : start + batch_size]
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        lams, weights = noise_levels(path.lam_min, path.lam_max, midpoint, draws // 2, u)
        total = torch.zeros(len(xb), num_concepts, dtype=torch.float64, device=xb.device)
        for lam, weight in zip(lams, weights, strict=True):
            eps = torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
            for sign in (1, -1):
                total += weight * branch_errors(model, xb, path, num_concepts, float(lam), sign * eps)
            bar.update(2)
        out.append(total / draws)
    bar.close()
    return torch.cat(out).cpu()


@dataclass
class Verdict:
    """Per sample and concept: the model's log-likelihood ratio and its probability of the concept; the priors used."""

    log_ratio: torch.Tensor  # [N, K]
    p: torch.Tensor  # [N, K]
    priors: torch.Tensor  # [K]


def probabilities(log_ratio: torch.Tensor, priors=None, exhaustive: bool = False) -> Verdict:
    """p(c|x0) = p(c) p(x0|c) / p(x0) from the log-likelihood ratios [N, K] and the concepts' priors.

    `exhaustive` concepts partition the model (every sample is exactly one of them: the classes of a class-conditional
    model): p(c|x0) is then the posterior over them, normalised, and without `priors` the priors are the model's own
    class shares, the fixed point prior = mean posterior over these samples (give unguided samples). Otherwise the
    two branches do not determine how common a concept is, so `priors` (one per concept) are needed, and
    p = min(1, prior * ratio).
    """
    log_ratio = torch.as_tensor(log_ratio, dtype=torch.float64)
    if log_ratio.dim() != 2:
        raise ConfigError(f"log_ratio must be [samples, concepts], got shape {tuple(log_ratio.shape)}")
    k = log_ratio.shape[1]
    if priors is not None:
        priors = torch.tensor([check_probability("prior", p) for p in priors], dtype=torch.float64)
        if len(priors) != k:
            raise ConfigError(f"{len(priors)} priors for {k} concepts; give one per concept")
    if not exhaustive:
        if priors is None:
            raise ConfigError("p(c|x0) of concepts that do not partition the model needs each concept's prior (its "
                              "share of the model's samples): pass priors, or exhaustive=True for classes")
        return Verdict(log_ratio, (priors.log() + log_ratio).clamp(max=0).exp(), priors)
    if k < 2:
        raise ConfigError("exhaustive concepts partition the model: give at least 2 (all its classes)")
    if priors is None:
        priors = torch.full((k,), 1 / k, dtype=torch.float64)
        for _ in range(10_000):  # EM for the mixture weights; the fixed point is the likelihood's maximum
            post = (priors.log() + log_ratio).softmax(-1)
            priors, before = post.mean(0), priors
            if (priors - before).abs().max() < 1e-10:
                break
    return Verdict(log_ratio, (priors.log() + log_ratio).softmax(-1), priors)


def verdict(model, x0: torch.Tensor, path, num_concepts: int, *, priors=None, exhaustive: bool = False,
            **kwargs) -> Verdict:
    """The model's verdict on samples x0: `log_ratios` (with its keyword arguments) read as probabilities
    (`probabilities`)."""
    return probabilities(log_ratios(model, x0, path, num_concepts, **kwargs), priors, exhaustive)
