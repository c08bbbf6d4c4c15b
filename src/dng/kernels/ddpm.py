"""Kernels of the DDPM family on a variance-preserving schedule: DDPM, DDIM, TCD and LCM, which share the x0
prediction (with the scheduler's clipping or thresholding) and differ in how they move it to the next timestep."""

from __future__ import annotations

import copy

import torch
from diffusers import DDIMScheduler, DDPMScheduler, TCDScheduler

from dng.errors import UnsupportedSchedulerError
from dng.kernels.base import _check_prediction, _Kernel, _step_index, _vp_forward_std, _vp_sigma

DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


class _VPKernel(_Kernel):
    """Shared x0 prediction of DDPM, DDIM, LCM and TCD, with the scheduler's own clipping or thresholding.

    `noise_levels` reads the first two of `_abars(t)`: abar at t and at the step's result.
    """

    # TCD's step ignores its config's clip_sample and thresholding.
    clips = True

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler)
        cfg = scheduler.config
        self.affine = not (self.clips and (cfg.thresholding or cfg.clip_sample))

    def noise_levels(self, t):
        return tuple(_vp_sigma(a) for a in self._abars(t)[:2])

    def _x0_and_eps(self, x, out, abar_t):
        cfg = self.scheduler.config
        if self.prediction == "epsilon":
            x0 = (x - (1 - abar_t) ** 0.5 * out) / abar_t**0.5
            eps = out
        elif self.prediction == "v_prediction":
            x0 = abar_t**0.5 * x - (1 - abar_t) ** 0.5 * out
            eps = abar_t**0.5 * out + (1 - abar_t) ** 0.5 * x
        else:
            x0 = out
            eps = (x - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
        if not self.clips:
            return x0, eps
        if cfg.thresholding:
            # The scheduler thresholds [batch, channels, ...]: fold a leading axis of branches into the batch.
            x0 = self.scheduler._threshold_sample(x0.flatten(0, x0.dim() - x.dim())).view_as(x0)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0, eps


class DDPMKernel(_VPKernel):
    def __init__(self, scheduler: DDPMScheduler):
        super().__init__(scheduler)
        if scheduler.config.variance_type not in DDPM_VARIANCES:
            raise UnsupportedSchedulerError(f"variance_type {scheduler.config.variance_type!r} is not supported")

    def _abars(self, t):
        s = self.scheduler
        prev_t = s.previous_timestep(t)
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one

    def moments(self, t, x, out):
        s = self.scheduler
        abar_t, abar_prev = self._abars(t)
        alpha_t = abar_t / abar_prev
        x0, _ = self._x0_and_eps(x, out, abar_t)
        x0_coef = abar_prev**0.5 * (1 - alpha_t) / (1 - abar_t)
        mean = x0_coef * x0 + (alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)) * x
        forward_std = float((1 - alpha_t) ** 0.5)
        if t <= 0:
            return mean, 0.0, forward_std
        variance = s._get_variance(t)
        std = variance if s.config.variance_type == "fixed_small_log" else variance**0.5
        return mean, float(std), forward_std


class DDIMKernel(_VPKernel):
    def __init__(self, scheduler: DDIMScheduler, eta: float):
        super().__init__(scheduler)
        if not eta > 0:
            raise UnsupportedSchedulerError(f"eta = {eta} makes DDIM deterministic")
        self.eta = float(eta)

    def _prev_timestep(self, t):
        s = self.scheduler
        return t - s.config.num_train_timesteps // s.num_inference_steps

    def _abars(self, t):
        s = self.scheduler
        prev_t = self._prev_timestep(t)
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod

    def moments(self, t, x, out):
        abar_t, abar_prev = self._abars(t)
        x0, eps = self._x0_and_eps(x, out, abar_t)
        std = self.eta * self.scheduler._get_variance(t, self._prev_timestep(t)) ** 0.5
        mean = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        return mean, float(std), float((1 - abar_t / abar_prev) ** 0.5)


class TCDKernel(_VPKernel):
    """Strategic stochastic sampling: the step's x0 estimate noised to timestep s = (1 - gamma) t_prev, re-noised to
    t_prev with fresh noise (none on the last step)."""

    clips = False

    def __init__(self, scheduler: TCDScheduler, gamma: float):
        super().__init__(scheduler)
        if not 0 < gamma <= 1:
            raise UnsupportedSchedulerError(f"gamma (the eta given to its step) = {gamma} is not in (0, 1]; "
                                          "gamma = 0 is deterministic")
        self.gamma = float(gamma)

    def _abars(self, t):
        s = self.scheduler
        i = _step_index(s, t)
        prev_t = s.timesteps[i + 1] if i + 1 < len(s.timesteps) else torch.tensor(0)
        t_s = torch.floor((1 - self.gamma) * prev_t).to(dtype=torch.long)
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t], s.alphas_cumprod[t_s]

    def moments(self, t, x, out):
        s = self.scheduler
        abar_t, abar_prev, abar_s = self._abars(t)
        x0, eps = self._x0_and_eps(x, out, abar_t)
        noised = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps
        forward_std = _vp_forward_std(abar_t, abar_prev)
        if s.step_index == s.num_inference_steps - 1:
            return noised, 0.0, forward_std
        return (abar_prev / abar_s).sqrt() * noised, float((1 - abar_prev / abar_s) ** 0.5), forward_std


class LCMKernel(_VPKernel):
    """The consistency estimate (boundary-scaled x0) re-noised to the next timestep with fresh noise (not on the last
    step, which returns the estimate)."""

    def _schedule(self, t):
        """(abar_t, abar of the next timestep, whether this is the last step)."""
        s = self.scheduler
        i = _step_index(s, t)
        prev_t = s.timesteps[i + 1] if i + 1 < len(s.timesteps) else t
        last = i == s.num_inference_steps - 1
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod, last

    def noise_levels(self, t):
        abar_t, abar_prev, last = self._schedule(t)
        return _vp_sigma(abar_t), 0.0 if last else _vp_sigma(abar_prev)

    def moments(self, t, x, out):
        abar_t, abar_prev, last = self._schedule(t)
        # On a shallow copy: diffusers' method sets `sigma_data` on the scheduler it is called on.
        c_skip, c_out = copy.copy(self.scheduler).get_scalings_for_boundary_condition_discrete(t)
        denoised = c_out * self._x0_and_eps(x, out, abar_t)[0] + c_skip * x
        if last:
            return denoised, 0.0, _vp_forward_std(abar_t, 1.0)
        return abar_prev.sqrt() * denoised, float((1 - abar_prev) ** 0.5), _vp_forward_std(abar_t, abar_prev)
