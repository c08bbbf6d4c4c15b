"""The kernel of DPM-Solver(++) in SDE form: multistep, singlestep and EDM's, orders 1-3, read off the scheduler's
own update functions."""

from __future__ import annotations

import torch
from diffusers import DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler

from dng.errors import ConfigError, UnsupportedSchedulerError
from dng.kernels.base import (
    _each_branch,
    _forward_std,
    _level,
    _PastKernel,
    _sigma_pair,
    _step_index,
    _upcast,
)
from dng.kernels.moments import AffineBranchMoments, BranchMoments

SDE_DPM = ("sde-dpmsolver++", "sde-dpmsolver")


def _scalar(value) -> torch.Tensor:
    """A float64 scalar probe, so that the update's coefficients are read in double precision."""
    return torch.tensor(float(value), dtype=torch.float64)


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
            raise UnsupportedSchedulerError(f"algorithm_type {cfg.algorithm_type!r} is deterministic")
        if cfg.solver_order > 2 and (type(scheduler) is EDMDPMSolverMultistepScheduler
                                     or cfg.algorithm_type == "sde-dpmsolver"):
            # diffusers has no third-order update for these: their third step fails.
            raise UnsupportedSchedulerError(f"{cfg.algorithm_type} has no third-order update; use solver_order <= 2")
        if cfg.get("variance_type") is not None:
            raise UnsupportedSchedulerError(
                f"variance_type {cfg.variance_type!r} needs an output wider than the sample")
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
            return float(convert(_scalar(1), sample=_scalar(0))) * (outs[:1] - outs[1:])
        converted = _each_branch(lambda o: convert(o, sample=x), x, outs)
        return converted[:1] - converted[1:]

    def _weights(self, order):
        """The update's coefficient on each of its outputs, oldest first."""
        def unit(j):
            return [_scalar(j == k) for k in range(order)]

        return [float(self._update(order, unit(j), _scalar(0), 0.0)) for j in range(order)]

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
        return tuple(s._sigma_to_alpha_sigma_t(sigma) for sigma in _sigma_pair(s, t))

    def _stds(self, t):
        # The noise coefficient, read from the update with everything else zero.
        order, _ = self._plan(t)
        zero = _scalar(0)
        std = float(self._update(order, [zero] * order, zero, 1.0))
        (alpha, sigma), (alpha_to, sigma_to) = self._alphas_sigmas(t)
        return std, _forward_std(alpha, sigma, alpha_to, sigma_to)

    def noise_levels(self, t):
        return tuple(_level(alpha, sigma) for alpha, sigma in self._alphas_sigmas(t))
