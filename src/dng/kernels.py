"""Reverse-kernel mean and standard deviation of one scheduler step.

For a supported stochastic scheduler, `scheduler.step(out, t, x)` draws
`mean(x, out) + std * z` with `z ~ N(0, I)`. The posterior tracker needs `mean`
for several model outputs at the same `x` and the `std` of the noise the step adds.
Kernels also give `forward_std`, the std of the forward transition between the
step's two noise levels (sqrt(beta_t) in DDPM terms) in the same sample space: the
true reverse kernel's spread lies between the two, nearer the forward one at low noise.
And they give those two noise levels as `sigma` = sqrt((1 - abar) / abar), the
noise-to-signal ratio of x_t whatever the schedule's own parametrisation (k-diffusion's
and EDM's sigma; log-SNR = -2 log sigma): rules that depend on where the chain is read it.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

from dng.errors import ConfigError

SUPPORTED = (
    "DDPMScheduler (variance_type fixed_small, fixed_small_log, fixed_large), "
    "DDIMScheduler with eta > 0, EulerAncestralDiscreteScheduler"
)
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unsupported(scheduler, why: str) -> ConfigError:
    name = type(scheduler).__name__
    return ConfigError(
        f"{name} cannot be used with posterior tracking: {why}. DNG needs a stochastic sampler; supported: "
        f"{SUPPORTED}. Switch with e.g. EulerAncestralDiscreteScheduler.from_config(scheduler.config)."
    )


def _check_prediction(scheduler, allowed=PREDICTION_TYPES) -> str:
    kind = scheduler.config.prediction_type
    if kind not in allowed:
        raise _unsupported(scheduler, f"prediction_type {kind!r} is not one of {allowed}")
    return kind


def _upcast(v: torch.Tensor) -> torch.Tensor:
    # Kernel means feed a difference of nearly equal vectors: half precision would drown the signal.
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


class BranchMoments:
    """One step's unconditional kernel mean m_u and d_i = m_u - m_n_i per negative, as the tracker reads them.

    The tracker needs only r.d_i and d_i.d_j per sample, with r = x_prev - m_u (`statistics`): inner products,
    never differences of large squared norms.
    """

    def __init__(self, mean_u, diff, std: float, forward_std: float, levels=(float("nan"), float("nan"))):
        self.mean_u, self.diff, self.std, self.forward_std = mean_u, diff, std, forward_std
        self.sigma, self.sigma_next = levels

    def statistics(self, x_prev, gram: bool = False):
        """(rd [batch, negatives], dd): dd is |d_i|^2 [batch, negatives], or with `gram` d_i.d_j [batch, K, K]."""
        residual = x_prev.to(torch.float32) - self.mean_u.to(torch.float32)
        return self._inner(residual, self.diff.to(torch.float32), gram, 1.0)

    @staticmethod
    def _inner(residual, diff, gram, scale):
        """r.d_i and d_i.d_j with d_i = scale * diff_i (diff: [negatives, batch, ...], residual: [batch, ...])."""
        flat = diff.flatten(2)
        # einsum reduces through a batched matmul, without vecdot's full-size product temporary (on the mixture
        # bench's 10 000 x 64 step: 0.35 against 0.49 ms).
        rd = scale * torch.einsum("kbd,bd->bk", flat, residual.flatten(1))
        if gram:
            return rd, scale**2 * torch.einsum("kbd,jbd->bkj", flat, flat)
        return rd, scale**2 * torch.einsum("kbd,kbd->bk", flat, flat)


class AffineBranchMoments(BranchMoments):
    """The same for a kernel whose mean is a x + b out: from x and the raw outputs, without forming either mean.

    d_i = b (out_u - out_n_i) comes from one subtraction (no cancellation between nearly equal means) and
    r = x_prev - a x - b out_u; two full-size passes fewer than building the means, which is visible on a model as
    cheap as the update (the exact mixture).
    """

    def __init__(self, x, outs, a: float, b: float, std: float, forward_std: float,
                 levels=(float("nan"), float("nan"))):
        self.x, self.outs, self.a, self.b = x, outs, a, b
        self.std, self.forward_std = std, forward_std
        self.sigma, self.sigma_next = levels

    @property
    def mean_u(self):
        return torch.add(self.b * self.outs[0], self.x, alpha=self.a)

    @property
    def diff(self):
        return self.b * (self.outs[:1] - self.outs[1:])

    def statistics(self, x_prev, gram: bool = False):
        residual = torch.add(x_prev.to(torch.float32), self.x, alpha=-self.a).add_(self.outs[0], alpha=-self.b)
        return self._inner(residual, self.outs[:1] - self.outs[1:], gram, self.b)


class _Kernel:
    # Without clipping or thresholding the mean is a x + b out, affine in the model output.
    affine = True

    def __call__(self, t, x, out):
        """(mean, std, forward_std) of the step from x at timestep t; `out` may carry a leading axis of branches."""
        return self.moments(t, _upcast(x), _upcast(out))

    def branch_moments(self, t, x, outs) -> BranchMoments:
        """The tracker's view of the step for outs = [unconditional, negative 1..K] stacked.

        Where the mean is affine, a and b are read off the kernel's own formula at (x, out) = (1, 0) and (0, 1),
        so no second derivation can drift from it.
        """
        x, outs = _upcast(x), _upcast(outs)
        levels = self.noise_levels(t)
        if not self.affine:
            means, std, forward_std = self.moments(t, x, outs)
            return BranchMoments(means[0], means[0] - means[1:], std, forward_std, levels)
        probe = torch.tensor([1.0, 0.0], dtype=torch.float64)
        coefficients, std, forward_std = self.moments(t, probe, probe.flip(0))
        a, b = coefficients.tolist()
        return AffineBranchMoments(x, outs, a, b, std, forward_std, levels)

    def noise_levels(self, t) -> tuple[float, float]:
        """(sigma of x_t, sigma of the step's result), sigma = sqrt((1 - abar) / abar); 0 for clean data."""
        raise NotImplementedError


class _VPKernel(_Kernel):
    """Shared x0 prediction of DDPM and DDIM, with the scheduler's own clipping or thresholding."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler)
        self.affine = not (scheduler.config.thresholding or scheduler.config.clip_sample)

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
        if cfg.thresholding:
            # The scheduler thresholds [batch, channels, ...]: fold a leading axis of branches into the batch.
            x0 = self.scheduler._threshold_sample(x0.flatten(0, x0.dim() - x.dim())).view_as(x0)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0, eps


def _vp_sigma(abar) -> float:
    abar = float(abar)
    return ((1 - abar) / abar) ** 0.5


class DDPMKernel(_VPKernel):
    def __init__(self, scheduler: DDPMScheduler):
        super().__init__(scheduler)
        if scheduler.config.variance_type not in DDPM_VARIANCES:
            raise _unsupported(scheduler, f"variance_type {scheduler.config.variance_type!r} is not supported")

    def _abars(self, t):
        s = self.scheduler
        prev_t = s.previous_timestep(t)
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one

    def noise_levels(self, t):
        return tuple(_vp_sigma(a) for a in self._abars(t))

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
            raise _unsupported(scheduler, f"eta = {eta} makes DDIM deterministic; pass eta > 0 (eta = 1 is DDPM-like)")
        self.eta = float(eta)

    def _abars(self, t):
        s = self.scheduler
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod

    def noise_levels(self, t):
        return tuple(_vp_sigma(a) for a in self._abars(t))

    def moments(self, t, x, out):
        s = self.scheduler
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        abar_t, abar_prev = self._abars(t)
        x0, eps = self._x0_and_eps(x, out, abar_t)
        std = self.eta * s._get_variance(t, prev_t) ** 0.5
        mean = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        return mean, float(std), float((1 - abar_t / abar_prev) ** 0.5)


class EulerAncestralKernel(_Kernel):
    def __init__(self, scheduler: EulerAncestralDiscreteScheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler, ("epsilon", "v_prediction"))

    def _sigmas(self, t):
        s = self.scheduler
        if s.step_index is None:
            s._init_step_index(t)
        return s.sigmas[s.step_index], s.sigmas[s.step_index + 1]

    def noise_levels(self, t):
        return tuple(float(v) for v in self._sigmas(t))

    def moments(self, t, x, out):
        sigma, sigma_to = self._sigmas(t)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x = x.to(torch.float32)
        if self.prediction == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        mean = x + (x - x0) / sigma * (sigma_down - sigma)
        return mean, float(sigma_up), float((sigma**2 - sigma_to**2) ** 0.5)


def reverse_kernel(scheduler, eta: float = 0.0):
    """The kernel of a supported stochastic scheduler; a clear error for any other."""
    # Exact type checks: a subclass may change the step, and a wrong kernel would silently bias the posterior.
    if type(scheduler) is DDPMScheduler:
        return DDPMKernel(scheduler)
    if type(scheduler) is DDIMScheduler:
        return DDIMKernel(scheduler, eta)
    if type(scheduler) is EulerAncestralDiscreteScheduler:
        return EulerAncestralKernel(scheduler)
    raise _unsupported(scheduler, "it is deterministic or its step is not a Gaussian kernel DNG knows")
