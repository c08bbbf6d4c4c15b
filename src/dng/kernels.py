"""Reverse-kernel mean and standard deviation of one scheduler step.

For a supported stochastic scheduler, `scheduler.step(out, t, x)` draws
`mean(x, past, out) + std * z` with `z ~ N(0, I)`, where `past` is what the scheduler
keeps from earlier steps (a multistep solver's earlier outputs, a two-stage solver's
starting sample; nothing for DDPM-like steps). The posterior tracker needs `mean` for
several model outputs at the same `x` and past, and the `std` of the noise the step adds.
Without clipping or thresholding the mean is affine in the output, a x + b out + c with
c from the past: `branch_moments` reads a, b and c off the kernel's formula (read, never
written: the sampler asks before it steps). A multistep solver's past holds model outputs,
which differ per branch: its kernel (one per chain) records every branch's outputs as it
reads them, so that m_u - m_n reads each branch's own.
Kernels also give `forward_std`, the std of the forward transition between the
step's two noise levels (sqrt(beta_t) in DDPM terms) in the same sample space: the
true reverse kernel's spread lies between the two, nearer the forward one at low noise.
And they give those two noise levels as `sigma` = sqrt((1 - abar) / abar), the
noise-to-signal ratio of x_t whatever the schedule's own parametrisation (k-diffusion's
and EDM's sigma; s / (1 - s) for flow matching; log-SNR = -2 log sigma): rules that depend
on where the chain is read it.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
    LTXEulerAncestralRFScheduler,
    TCDScheduler,
)

from dng.errors import ConfigError

SUPPORTED = (
    "DDPMScheduler (variance_type fixed_small, fixed_small_log, fixed_large), DDIMScheduler with eta > 0, "
    "EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler, "
    "DPMSolverMultistepScheduler with algorithm_type sde-dpmsolver++ (orders 1-3) or the deprecated sde-dpmsolver "
    "(orders 1-2), DPMSolverSinglestepScheduler with sde-dpmsolver++ (orders 1-3), EDMDPMSolverMultistepScheduler "
    "with sde-dpmsolver++ (orders 1-2), TCDScheduler with eta (its gamma) > 0, LCMScheduler, "
    "FlowMatchEulerDiscreteScheduler with stochastic_sampling=True, LTXEulerAncestralRFScheduler with eta > 0, "
    "CMStochasticIterativeScheduler"
)
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SDE_DPM = ("sde-dpmsolver++", "sde-dpmsolver")


def _unsupported(scheduler, why: str) -> ConfigError:
    from dng.schedulers import switch  # dng.schedulers builds on this module

    return ConfigError(
        f"{type(scheduler).__name__} cannot be used with posterior tracking: {why}. DNG needs a stochastic "
        f"sampler: {switch(scheduler)}. Supported: {SUPPORTED}."
    )


def _check_prediction(scheduler, allowed=PREDICTION_TYPES) -> str:
    kind = scheduler.config.prediction_type
    if kind not in allowed:
        raise _unsupported(scheduler, f"prediction_type {kind!r} is not one of {allowed}")
    return kind


def _upcast(v: torch.Tensor) -> torch.Tensor:
    # Kernel means feed a difference of nearly equal vectors: half precision would drown the signal.
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


def _step_index(scheduler, t) -> int:
    """The index of the step at t, initialised exactly as the scheduler's own step() would on its first call."""
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    return scheduler.step_index


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
    """The same for a kernel whose mean is a x + b out + c: from x and the raw outputs, without forming either mean.

    d_i = b (out_u - out_n_i) comes from one subtraction (no cancellation between nearly equal means) and
    r = x_prev - a x - b out_u - c; two full-size passes fewer than building the means, which is visible on a model
    as cheap as the update (the exact mixture). `offset` c is what the step's stored past adds (None where the step
    reads no past); `diff` is d given whole, where it also reads each branch's own past (None: b (out_u - out_n_i)).
    """

    def __init__(self, x, outs, a: float, b: float, std: float, forward_std: float,
                 levels=(float("nan"), float("nan")), offset=None, diff=None):
        self.x, self.outs, self.a, self.b, self.offset, self._diff = x, outs, a, b, offset, diff
        self.std, self.forward_std = std, forward_std
        self.sigma, self.sigma_next = levels

    @property
    def mean_u(self):
        mean = torch.add(self.b * self.outs[0], self.x, alpha=self.a)
        return mean if self.offset is None else mean + self.offset

    @property
    def diff(self):
        return self.b * (self.outs[:1] - self.outs[1:]) if self._diff is None else self._diff

    def statistics(self, x_prev, gram: bool = False):
        residual = torch.add(x_prev.to(torch.float32), self.x, alpha=-self.a).add_(self.outs[0], alpha=-self.b)
        if self.offset is not None:
            residual.sub_(self.offset)
        if self._diff is None:
            return self._inner(residual, self.outs[:1] - self.outs[1:], gram, self.b)
        return self._inner(residual, self._diff, gram, 1.0)


class _Kernel:
    # Without clipping or thresholding the mean is a x + b out (+ c), affine in the model output.
    affine = True

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


class _VPKernel(_Kernel):
    """Shared x0 prediction of DDPM, DDIM, LCM and TCD, with the scheduler's own clipping or thresholding."""

    # TCD's step ignores its config's clip_sample and thresholding.
    clips = True

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler)
        cfg = scheduler.config
        self.affine = not (self.clips and (cfg.thresholding or cfg.clip_sample))

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
            raise _unsupported(scheduler, f"eta = {eta} makes DDIM deterministic")
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


class TCDKernel(_VPKernel):
    """Strategic stochastic sampling: the step's x0 estimate noised to timestep s = (1 - gamma) t_prev, re-noised to
    t_prev with fresh noise (none on the last step)."""

    clips = False

    def __init__(self, scheduler: TCDScheduler, gamma: float):
        super().__init__(scheduler)
        if not 0 < gamma <= 1:
            raise _unsupported(scheduler, f"gamma (the eta given to its step) = {gamma} is not in (0, 1]; "
                                          "gamma = 0 is deterministic")
        self.gamma = float(gamma)

    def _abars(self, t):
        s = self.scheduler
        i = _step_index(s, t)
        prev_t = s.timesteps[i + 1] if i + 1 < len(s.timesteps) else torch.tensor(0)
        t_s = torch.floor((1 - self.gamma) * prev_t).to(dtype=torch.long)
        return s.alphas_cumprod[t], s.alphas_cumprod[prev_t], s.alphas_cumprod[t_s]

    def noise_levels(self, t):
        return tuple(_vp_sigma(a) for a in self._abars(t)[:2])

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


class EulerAncestralKernel(_Kernel):
    def __init__(self, scheduler: EulerAncestralDiscreteScheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler, ("epsilon", "v_prediction"))

    def _sigmas(self, t):
        s = self.scheduler
        i = _step_index(s, t)
        return s.sigmas[i], s.sigmas[i + 1]

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


class KDPM2AncestralKernel(_PastKernel):
    """DPM2 ancestral: a noiseless Euler half step to the midpoint sigma, then the full step from the half step's
    start (the stored sample) with the midpoint's derivative, plus ancestral noise.

    The midpoint sits at the next sigma itself (sqrt(sigma sigma_down) = sigma_next), so the noisy second stage
    reports the pair's noise levels (sigma, sigma_next): the first stage carries no evidence, and the pair is one
    step of the schedule.
    """

    def __init__(self, scheduler: KDPM2AncestralDiscreteScheduler):
        self.scheduler = scheduler
        self.prediction = _check_prediction(scheduler, ("epsilon", "v_prediction"))

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
        if self.prediction == "epsilon":
            x0 = x - sigma_in * out
        else:
            x0 = out * (-sigma_in / (sigma_in**2 + 1) ** 0.5) + x / (sigma_in**2 + 1)
        start = past[0] if past else x
        return start + (x - x0) / sigma_in * (sigma_to - sigma)

    def _stds(self, t):
        sigma, _, _, sigma_up, sigma_next = self._sigmas(t)
        return float(sigma_up), _forward_std(1, sigma, 1, sigma_next)

    def noise_levels(self, t):
        sigma, _, _, _, sigma_next = self._sigmas(t)
        return float(sigma), float(sigma_next)


class DPMSolverKernel(_PastKernel):
    """DPM-Solver(++) in SDE form, multistep, singlestep or EDM's: the scheduler's own update.

    The mean for an output is the update the step would take with that output as this step's, the earlier outputs
    as stored (the guided ones) and (singlestep, order > 1) the sample its stage started from, the chain's.
    The hypothesis "the chain samples c" is the chain run with c's outputs at every step, so m_u - m_n reads each
    branch's own earlier outputs, which `branch_moments` records as it reads each step (one kernel per chain). m_u
    itself keeps the stored history: the residual x_prev - m_u is then this step's push and noise, as for a one-step
    kernel. With m_u on u's own history it would also hold the echo of the last push (2M weighs the previous step's
    output by -1/(2r)): evidence against c- at a push, cut short by the tracker's p_min clamp, then for c- at the
    next step. On the exact mixture at 25-100 steps that loop blew up 4-10 of 2000 chains.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.singlestep = type(scheduler) is DPMSolverSinglestepScheduler
        cfg = scheduler.config
        if cfg.algorithm_type not in SDE_DPM:
            raise _unsupported(scheduler, f"algorithm_type {cfg.algorithm_type!r} is deterministic")
        if cfg.solver_order > 2 and (type(scheduler) is EDMDPMSolverMultistepScheduler
                                     or cfg.algorithm_type == "sde-dpmsolver"):
            # diffusers has no third-order update for these: their third step fails.
            raise _unsupported(scheduler, f"{cfg.algorithm_type} has no third-order update; use solver_order <= 2")
        if cfg.get("variance_type") is not None:
            raise _unsupported(scheduler, f"variance_type {cfg.variance_type!r} needs an output wider than the sample")
        self.affine = not cfg.thresholding
        # Step index -> this chain's converted outputs at that step, unconditional minus each negative.
        self._gaps = {}

    def branch_moments(self, t, x, outs) -> BranchMoments:
        """m_u from the stored (guided) history; m_u - m_n_i from each branch's own outputs at every step."""
        x, outs = _upcast(x), _upcast(outs)
        s = self.scheduler
        order, _ = self._plan(t)
        i = s.step_index
        gap = self._gap(x, outs)
        past = [self._gaps.get(j) for j in range(i - order + 1, i)]
        if any(g is None or g.shape != gap.shape for g in past):
            raise ConfigError(f"step {i} of {type(s).__name__} is of order {order}: its branch means need the same "
                              f"branches' outputs at the {order - 1} step(s) before it. Read branch_moments at every "
                              "step of the chain, with the same branches and batch, on a kernel made for this chain")
        self._gaps = {j: g for j, g in self._gaps.items() if i - s.config.solver_order < j < i} | {i: gap}
        # The update is linear in its outputs: weighted as there, the gaps sum to m_u - m_n_i.
        *weights, weight = self._weights(order)
        diff = gap * weight
        for w, g in zip(weights, past, strict=True):
            diff.add_(g, alpha=w)
        if self.affine:
            a, b, c, std, forward_std = self._coefficients(t, x)
            return AffineBranchMoments(x, outs, a, b, std, forward_std, self.noise_levels(t), c, diff)
        return BranchMoments(self._mean(t, x, outs[0], self._stored(t)), diff, *self._stds(t), self.noise_levels(t))

    def _gap(self, x, outs):
        """This step's converted outputs, unconditional minus each negative ([negatives, batch, ...])."""
        convert = self.scheduler.convert_model_output
        if self.affine:
            # Without thresholding the conversion is affine in the output: the gap is its slope times the outputs'
            # difference, exact where the branches nearly agree.
            one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            return float(convert(one, sample=zero)) * (outs[:1] - outs[1:])
        converted = _each_branch(lambda o: convert(o, sample=x), x, outs)
        return converted[:1] - converted[1:]

    def _weights(self, order):
        """The update's coefficient on each of its outputs, oldest first."""
        def unit(j):
            return [torch.tensor(float(j == k), dtype=torch.float64) for k in range(order)]

        return [float(self._update(order, unit(j), torch.zeros((), dtype=torch.float64), 0.0)) for j in range(order)]

    def _plan(self, t):
        """(order, whether the update starts from the stored stage sample) as the scheduler's step() picks them."""
        s, cfg = self.scheduler, self.scheduler.config
        i = _step_index(s, t)
        if self.singlestep:
            order = s.order_list[i]
            # step() lowers the order while its shifted outputs lack one; before the shift that is index 1 - order.
            while order > 1 and s.model_outputs[1 - order] is None:
                order -= 1
            return order, order > 1
        n = len(s.timesteps)
        final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or s.lower_order_nums < 1 or final:
            return 1, False
        if cfg.solver_order == 2 or s.lower_order_nums < 2 or second:
            return 2, False
        return 3, False

    def _past(self, t):
        s = self.scheduler
        order, from_stage = self._plan(t)
        # The outputs this step's update reads besides its own: the last order - 1 stored ones.
        earlier = tuple(s.model_outputs[len(s.model_outputs) - order + 1:])
        return earlier + ((s.sample,) if from_stage else ())

    def _mean(self, t, x, out, past):
        order, from_stage = self._plan(t)
        outputs = [*past[:order - 1], self.scheduler.convert_model_output(out, sample=x)]
        return self._update(order, outputs, past[-1] if from_stage else x, 0.0)

    def _update(self, order, outputs, start, noise):
        s = self.scheduler
        if self.singlestep:
            return s.singlestep_dpm_solver_update(outputs, sample=start, order=order, noise=noise)
        if order == 1:
            return s.dpm_solver_first_order_update(outputs[-1], sample=start, noise=noise)
        if order == 2:
            return s.multistep_dpm_solver_second_order_update(outputs, sample=start, noise=noise)
        return s.multistep_dpm_solver_third_order_update(outputs, sample=start, noise=noise)

    def _alphas_sigmas(self, t):
        s = self.scheduler
        i = _step_index(s, t)
        return s._sigma_to_alpha_sigma_t(s.sigmas[i]), s._sigma_to_alpha_sigma_t(s.sigmas[i + 1])

    def _stds(self, t):
        # The noise coefficient, read from the update with everything else zero.
        order, _ = self._plan(t)
        zero = torch.zeros((), dtype=torch.float64)
        std = float(self._update(order, [zero] * order, zero, 1.0))
        (alpha, sigma), (alpha_to, sigma_to) = self._alphas_sigmas(t)
        return std, _forward_std(alpha, sigma, alpha_to, sigma_to)

    def noise_levels(self, t):
        return tuple(_level(alpha, sigma) for alpha, sigma in self._alphas_sigmas(t))


class _FlowKernel(_Kernel):
    """Rectified-flow schedulers: x_s = (1 - s) x0 + s n, with the step's flow sigmas s read from the scheduler."""

    def _sigmas(self, t):
        s = self.scheduler
        i = _step_index(s, t)
        return s.sigmas[i], s.sigmas[i + 1]

    def noise_levels(self, t):
        return tuple(_level(1 - sigma, sigma) for sigma in self._sigmas(t))


class FlowMatchEulerKernel(_FlowKernel):
    """Stochastic flow matching: the x0 estimate moved to the next sigma with fresh noise, (1 - s') x0 + s' z."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler):
        self.scheduler = scheduler
        if not scheduler.config.stochastic_sampling:
            raise _unsupported(scheduler, "stochastic_sampling=False is a deterministic Euler ODE step")

    def moments(self, t, x, out):
        sigma, sigma_next = self._sigmas(t)
        mean = (1.0 - sigma_next) * (x - sigma * out)
        return mean, float(sigma_next), _forward_std(1 - sigma, sigma, 1 - sigma_next, sigma_next)


class LTXEulerAncestralKernel(_FlowKernel):
    """Euler ancestral for rectified flow (ComfyUI's RF variant), noise scaled by the config's eta and s_noise."""

    def __init__(self, scheduler: LTXEulerAncestralRFScheduler):
        self.scheduler = scheduler
        cfg = scheduler.config
        if not (cfg.eta > 0 and cfg.s_noise > 0):
            raise _unsupported(scheduler, f"eta = {cfg.eta}, s_noise = {cfg.s_noise} add no noise")

    def moments(self, t, x, out):
        cfg = self.scheduler.config
        sigma, sigma_next = self._sigmas(t)
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


# Exact types: a subclass may change the step, and a wrong kernel would silently bias the posterior.
# Refused though stochastic: DPMSolverSDEScheduler draws Brownian-tree noise (torchsde, seeded by its own
# noise_sampler_seed) over each step's two overlapping intervals, sigma -> midpoint and sigma -> sigma_next, so given
# the first stage the second stage's noise is correlated with it: not an N(0, I) draw independent of the past.
# CosineDPMSolverMultistepScheduler's tree increments are over disjoint intervals (Gaussian given the past, the
# multistep structure of DPMSolverKernel), but its noise comes from torchsde, not the sampler's generator.
# SASolverScheduler's corrector rewrites x_t with this step's output and the previous step's noise, and its
# predictor reads the outputs from the scheduler's own list: a kernel would have to write into it.
# DDPMWuerstchenScheduler steps take a per-sample timestep vector, and its schedule ends at a t = 0 its pipeline
# never steps: the sampler cannot drive it.
_KERNELS = {
    DDPMScheduler: DDPMKernel,
    EulerAncestralDiscreteScheduler: EulerAncestralKernel,
    KDPM2AncestralDiscreteScheduler: KDPM2AncestralKernel,
    DPMSolverMultistepScheduler: DPMSolverKernel,
    DPMSolverSinglestepScheduler: DPMSolverKernel,
    EDMDPMSolverMultistepScheduler: DPMSolverKernel,
    LCMScheduler: LCMKernel,
    FlowMatchEulerDiscreteScheduler: FlowMatchEulerKernel,
    LTXEulerAncestralRFScheduler: LTXEulerAncestralKernel,
    CMStochasticIterativeScheduler: ConsistencyKernel,
}


def reverse_kernel(scheduler, eta: float = 0.0):
    """The kernel of a supported stochastic scheduler; a clear error for any other.

    `eta` is what the sampler gives the step: DDIM's eta, TCD's gamma.
    """
    if type(scheduler) is DDIMScheduler:
        return DDIMKernel(scheduler, eta)
    if type(scheduler) is TCDScheduler:
        return TCDKernel(scheduler, eta)
    if type(scheduler) in _KERNELS:
        return _KERNELS[type(scheduler)](scheduler)
    raise _unsupported(scheduler, "it is deterministic or its step is not a Gaussian kernel DNG knows")
