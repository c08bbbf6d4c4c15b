"""What every kernel shares: the refusal message, dtype and step-index handling, noise-level arithmetic, and the
base classes that turn a kernel's mean formula into the tracker's `BranchMoments`."""

from __future__ import annotations

import math

import torch
from diffusers import LTXEulerAncestralRFScheduler

from dng.errors import UnsupportedSchedulerError
from dng.kernels.moments import AffineBranchMoments, BranchMoments

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction(scheduler, allowed=PREDICTION_TYPES) -> str:
    kind = scheduler.config.prediction_type
    if kind not in allowed:
        raise UnsupportedSchedulerError(f"prediction_type {kind!r} is not one of {allowed}")
    return kind


def _upcast(v: torch.Tensor) -> torch.Tensor:
    # Kernel means feed a difference of nearly equal vectors: half precision would drown the signal.
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


def _step_index(scheduler, t) -> int:
    """The index of the step at t, initialised exactly as the scheduler's own step() would on its first call."""
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    return scheduler.step_index


def stepped_timesteps(scheduler):
    """The timesteps whose step moves the sample: `scheduler.timesteps`, but for an LTXEulerAncestralRFScheduler given
    its sigmas, which lists the final sigma's timestep too (its step there returns the sample as it is), all but it."""
    timesteps, sigmas = scheduler.timesteps, getattr(scheduler, "sigmas", None)
    if type(scheduler) is LTXEulerAncestralRFScheduler and sigmas is not None and len(timesteps) == len(sigmas):
        return timesteps[:-1]
    return timesteps


def _sigma_pair(scheduler, t):
    """(sigma of the step at t, sigma of its result) from the scheduler's own `sigmas`."""
    i = _step_index(scheduler, t)
    return scheduler.sigmas[i], scheduler.sigmas[i + 1]


def _each_branch(mean, x, out):
    """mean(out) for one output, stacked for a leading axis of branches (thresholding needs [batch, ...])."""
    return torch.stack([mean(o) for o in out]) if out.dim() > x.dim() else mean(out)


def _level(alpha, sigma) -> float:
    """Noise-to-signal ratio sigma / alpha of a sample alpha x0 + sigma n (inf for pure noise)."""
    alpha, sigma = float(alpha), float(sigma)
    return sigma / alpha if alpha > 0 else math.inf


def _forward_std(alpha, sigma, alpha_to, sigma_to) -> float:
    """Std of the forward transition from alpha_to x0 + sigma_to n to alpha x0 + sigma n, in the latter's space."""
    ratio = float(alpha) / float(alpha_to)
    return max(float(sigma) ** 2 - ratio**2 * float(sigma_to) ** 2, 0.0) ** 0.5


def _vp_sigma(abar) -> float:
    abar = float(abar)
    return ((1 - abar) / abar) ** 0.5


def _vp_forward_std(abar, abar_to) -> float:
    """`_forward_std` between two levels of a variance-preserving schedule: sqrt(1 - abar / abar_to)."""
    return float((1 - abar / abar_to) ** 0.5)


class _Kernel:
    # Without clipping or thresholding the mean is a x + b out (+ c), affine in the model output.
    affine = True
    # Whether the tracker reads a step's evidence at both of its ends by default (`TrackedPosterior(endpoint=...)`).
    endpoint_reading = False

    def __call__(self, t, x, out):
        """(mean, std, forward_std) of the step from x at timestep t; `out` may carry a leading axis of branches."""
        return self.moments(t, _upcast(x), _upcast(out))

    def branch_moments(self, t, x, outs) -> BranchMoments:
        """The tracker's view of the step for outs = [unconditional, negative 1..K] stacked."""
        x, outs = _upcast(x), _upcast(outs)
        levels = self.noise_levels(t)
        if not self.affine:
            means, std, forward_std = self.moments(t, x, outs)
            return BranchMoments(means[0], means[0] - means[1:], std, forward_std, levels)
        a, b, c, std, forward_std = self._coefficients(t, x)
        return AffineBranchMoments(x, outs, a, b, std, forward_std, levels, c)

    def _coefficients(self, t, x):
        """(a, b, c, std, forward_std) of mean = a x + b out + c.

        a and b are read off the kernel's own formula at (x, out) = (1, 0) and (0, 1), so no second derivation can
        drift from it; a step that reads no past has c = None.
        """
        probe = torch.tensor([1.0, 0.0], dtype=torch.float64)
        coefficients, std, forward_std = self.moments(t, probe, probe.flip(0))
        a, b = coefficients.tolist()
        return a, b, None, std, forward_std

    def noise_levels(self, t) -> tuple[float, float]:
        """(sigma of x_t, sigma of the step's result), sigma = sqrt((1 - abar) / abar); 0 for clean data."""
        raise NotImplementedError


class _PastKernel(_Kernel):
    """A kernel whose mean also reads the scheduler's past: `_past(t)` is the tuple of stored tensors it uses."""

    def _stored(self, t):
        # The scheduler stores outputs in the model's dtype; half precision would round the offset c.
        return tuple(_upcast(p) for p in self._past(t))

    def moments(self, t, x, out):
        past = self._stored(t)
        mean = _each_branch(lambda o: self._mean(t, x, o, past), x, out)
        return (mean, *self._stds(t))

    def _coefficients(self, t, x):
        past = self._stored(t)
        probe = torch.tensor([1.0, 0.0], dtype=torch.float64)
        # With the past zeroed the probes read a and b alone; c is the mean of x = 0, out = 0 from the real past.
        a, b = self._mean(t, probe, probe.flip(0), tuple(p.new_zeros(()) for p in past)).tolist()
        zero = x.new_zeros(())
        c = self._mean(t, zero, zero, past) if past else None
        return (a, b, c, *self._stds(t))
