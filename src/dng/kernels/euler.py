"""Kernels of the sigma-parametrised Euler family: Euler ancestral and DPM2 ancestral on k-diffusion's sigma,
Euler steps of rectified flow (stochastic flow matching, LTX's RF ancestral) and multistep consistency sampling."""

from __future__ import annotations

import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LTXEulerAncestralRFScheduler,
)

from dng.errors import UnsupportedSchedulerError
from dng.kernels.base import (
    _check_prediction,
    _forward_std,
    _Kernel,
    _level,
    _PastKernel,
    _sigma_pair,
    _step_index,
)

SIGMA_PREDICTIONS = ("epsilon", "v_prediction")


def _denoised(prediction: str, x, out, sigma):
    """The x0 estimate from an output at x = x0 + sigma n, as the Karras-sigma schedulers convert it."""
    if prediction == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


class EulerAncestralKernel(_Kernel):
    def __init__(self, scheduler: EulerAncestralDiscreteScheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler, SIGMA_PREDICTIONS)

    def noise_levels(self, t):
        return tuple(float(v) for v in _sigma_pair(self.scheduler, t))

    def moments(self, t, x, out):
        sigma, sigma_to = _sigma_pair(self.scheduler, t)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x = x.to(torch.float32)
        x0 = _denoised(self.prediction, x, out, sigma)
        mean = x + (x - x0) / sigma * (sigma_down - sigma)
        return mean, float(sigma_up), float((sigma**2 - sigma_to**2) ** 0.5)


class KDPM2AncestralKernel(_PastKernel):
    """DPM2 ancestral: a noiseless Euler half step to the midpoint sigma, then the full step from the half step's
    start (the stored sample) with the midpoint's derivative, plus ancestral noise.

    The midpoint sits at the next sigma itself (sqrt(sigma sigma_down) = sigma_next), so the noisy second stage
    reports the pair's noise levels (sigma, sigma_next): the first stage carries no evidence, and the pair is one
    step of the schedule.
    """

    def __init__(self, scheduler: KDPM2AncestralDiscreteScheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler, SIGMA_PREDICTIONS)

    def _sigmas(self, t):
        """(sigma, sigma at which out was evaluated, sigma_down, sigma_up, sigma of the result) of the stage."""
        s = self.scheduler
        i = _step_index(s, t)
        if s.state_in_first_order:
            return s.sigmas[i], s.sigmas[i], s.sigmas_interpol[i], 0.0, s.sigmas_interpol[i]
        j = i - 1
        return s.sigmas[j], s.sigmas_interpol[j], s.sigmas_down[j], s.sigmas_up[j], s.sigmas[i]

    def _past(self, t):
        s = self.scheduler
        return () if s.state_in_first_order else (s.sample,)

    def _mean(self, t, x, out, past):
        sigma, sigma_in, sigma_to, _, _ = self._sigmas(t)
        x0 = _denoised(self.prediction, x, out, sigma_in)
        start = past[0] if past else x
        return start + (x - x0) / sigma_in * (sigma_to - sigma)

    def _stds(self, t):
        sigma, _, _, sigma_up, sigma_next = self._sigmas(t)
        return float(sigma_up), _forward_std(1, sigma, 1, sigma_next)

    def noise_levels(self, t):
        sigma, _, _, _, sigma_next = self._sigmas(t)
        return float(sigma), float(sigma_next)


class _FlowKernel(_Kernel):
    """Rectified-flow schedulers: x_s = (1 - s) x0 + s n, with the step's flow sigmas s read from the scheduler."""

    def noise_levels(self, t):
        return tuple(_level(1 - sigma, sigma) for sigma in _sigma_pair(self.scheduler, t))


class FlowMatchEulerKernel(_FlowKernel):
    """Stochastic flow matching: the x0 estimate moved to the next sigma with fresh noise, (1 - s') x0 + s' z."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler):
        self.scheduler = scheduler
        if not scheduler.config.stochastic_sampling:
            raise UnsupportedSchedulerError("stochastic_sampling=False is a deterministic Euler ODE step")

    def moments(self, t, x, out):
        sigma, sigma_next = _sigma_pair(self.scheduler, t)
        mean = (1.0 - sigma_next) * (x - sigma * out)
        return mean, float(sigma_next), _forward_std(1 - sigma, sigma, 1 - sigma_next, sigma_next)


class LTXEulerAncestralKernel(_FlowKernel):
    """Euler ancestral for rectified flow (ComfyUI's RF variant), noise scaled by the config's eta and s_noise."""

    def __init__(self, scheduler: LTXEulerAncestralRFScheduler):
        self.scheduler = scheduler
        cfg = scheduler.config
        if not (cfg.eta > 0 and cfg.s_noise > 0):
            raise UnsupportedSchedulerError(f"eta = {cfg.eta}, s_noise = {cfg.s_noise} add no noise")

    def moments(self, t, x, out):
        cfg = self.scheduler.config
        sigma, sigma_next = _sigma_pair(self.scheduler, t)
        forward_std = _forward_std(1 - sigma, sigma, 1 - sigma_next, sigma_next)
        x0 = x - sigma * out
        if sigma_next.abs().item() < 1e-8:
            return x0, 0.0, forward_std
        sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * float(cfg.eta))
        alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
        ratio = sigma_down / sigma
        # With the scheduler's own 1e-12 guards.
        mean = (alpha_next / (alpha_down + 1e-12)) * (ratio * x + (1.0 - ratio) * x0)
        renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / (alpha_down**2 + 1e-12)).clamp(min=0.0).sqrt()
        return mean, float(renoise * float(cfg.s_noise)), forward_std


class ConsistencyKernel(_Kernel):
    """Multistep consistency sampling: the boundary-scaled estimate plus noise up to the next sigma (from sigma_min)."""

    def __init__(self, scheduler: CMStochasticIterativeScheduler):
        self.scheduler = scheduler
        self.affine = not scheduler.config.clip_denoised

    def _sigmas(self, t):
        s, cfg = self.scheduler, self.scheduler.config
        i = _step_index(s, t)
        sigma_next = s.sigmas[i + 1] if i + 1 < cfg.num_train_timesteps else s.sigmas[-1]
        return s.sigmas[i], sigma_next.clamp(min=cfg.sigma_min, max=cfg.sigma_max)

    def noise_levels(self, t):
        return tuple(float(v) for v in self._sigmas(t))

    def moments(self, t, x, out):
        s, cfg = self.scheduler, self.scheduler.config
        sigma, sigma_hat = self._sigmas(t)
        c_skip, c_out = s.get_scalings_for_boundary_condition(sigma)
        denoised = c_out * out + c_skip * x
        if cfg.clip_denoised:
            denoised = denoised.clamp(-1, 1)
        std = cfg.s_noise * float(sigma_hat**2 - cfg.sigma_min**2) ** 0.5 if len(s.timesteps) > 1 else 0.0
        return denoised, std, _forward_std(1, sigma, 1, sigma_hat)
