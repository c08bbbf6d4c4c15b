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
# How the tracker reads a step whose mean also weighs earlier outputs (docs/GMM.md derives and measures each):
# "data"   the hypotheses differ by this step's data prediction with the weight of the exact reverse kernel, the
#          first-order one; the rest of the solver's mean (its history, its extrapolation) is shared.
# "first"  a first-order step from x with each branch's current output: the earlier outputs are not read.
# "guided" the solver's mean on its stored (guided) history; m_u - m_n on each branch's own history.
# "own"    each branch's solver mean on that branch's own history.
READINGS = ("data", "first", "guided", "own")


def _scalar(value) -> torch.Tensor:
    """A float64 scalar probe, so that the update's coefficients are read in double precision."""
    return torch.tensor(float(value), dtype=torch.float64)


class DPMSolverKernel(_PastKernel):
    """DPM-Solver(++) in SDE form, multistep, singlestep or EDM's: the scheduler's own update.

    `kernel(t, x, out)` is the step the scheduler takes from out: its update with the earlier outputs as stored and
    (singlestep, order > 1) the sample its stage started from. `branch_moments` reads the step for the tracker as
    `reading` says (`READINGS`). The default, "data": the exact reverse kernel's mean is a x + b1 D(x), first order in
    the current data prediction D for any step size (D is a martingale along the reverse process), so a hypothesis
    moves the mean by b1 (D_u - D_n) at this step. What the solver adds from its history and extrapolation is a known
    function of the predictions it stored, shared by the hypotheses: m_u is the step the sampler took with b1 D_g
    swapped for b1 D_u, and the residual x_prev - m_u is this step's push and noise, as for a one-step kernel. This
    step's guided D_g is only stored during the step: m_u and the statistics read it after the step.

    The tracker reads these steps at both ends by default (`endpoint_reading`; docs/GMM.md, "The Karras spacing").
    """

    endpoint_reading = True

    def __init__(self, scheduler, reading: str = "data"):
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
        if reading not in READINGS:
            raise ConfigError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
        self.reading = reading
        self.affine = not cfg.thresholding
        # "guided" and "own": step index -> this chain's converted outputs at that step, (unconditional or None,
        # unconditional minus each negative).
        self._history = {}
        # "data", singlestep: the converted outputs at the current stage's first sample (unconditional, gaps).
        self._stage = None

    def branch_moments(self, t, x, outs) -> BranchMoments:
        x, outs = _upcast(x), _upcast(outs)
        _step_index(self.scheduler, t)
        if self.reading in ("guided", "own"):
            return self._history_moments(t, x, outs)
        if self.reading == "first":
            return self._first_order_moments(t, x, outs)
        return self._data_moments(t, x, outs)

    def _data_moments(self, t, x, outs):
        """The "data" reading: the step from the sample it starts from (x; for a singlestep stage, the stage's first
        sample), the hypotheses moving its mean by b1 D_k there; the rest of the solver's mean is the sampler's."""
        s = self.scheduler
        order, from_stage = self._plan(t)
        weights = self._weights(order)
        # The solver's weights on its outputs sum to the first-order weight b1 of a step from its start: its
        # higher-order terms weigh differences of outputs.
        b1, w = sum(weights), weights[-1]
        std, forward_std = self._stds(t)
        stored = s.model_outputs  # this step's guided D_g is its last entry once the step is taken
        # The solver's mean with this step's output zeroed: what its history (and a stage's start) adds.
        zero = x.new_zeros(() if self.affine else x.shape)  # thresholding reads a batch
        past = self._mean(t, zero, zero, self._stored(t)) if order > 1 or from_stage else None
        if from_stage:
            # Every step of a stage starts from the stage's first sample: the hypotheses differ by b1 times their
            # outputs there, and the tracker reads p there (`restart`).
            if self._stage is None or self._stage[1].shape[:2] != (len(outs) - 1, len(x)):
                raise ConfigError(f"step {s.step_index} of {type(s).__name__} starts from its stage's first sample: "
                                  "read branch_moments there too, with the same branches and batch, on a kernel made "
                                  "for this chain")
            d_u, gap = self._stage
            stage_d = _upcast(stored[1 - order])  # the stage's first guided D, before this step shifts it
            known = past + b1 * (d_u - stage_d)
            moments = BranchMoments(lambda: known + w * _upcast(stored[-1]), b1 * gap, std, forward_std,
                                    (self._sigma_at(s.step_index - order + 1), self.noise_levels(t)[1]))
            moments.restart = True
            return moments
        if self.singlestep:
            self._stage = (self._converted(x, outs[:1])[0], self._gap(x, outs))

        def offset():
            # This step's guided D_g keeps the part (w - b1) of the solver's weight that the swap leaves on it.
            return past + (w - b1) * _upcast(stored[-1])

        x_weight = float(self._update(order, [_scalar(0)] * order, _scalar(1), 0.0))
        return self._affine_moments(x, outs, x_weight, b1, std, forward_std, self.noise_levels(t),
                                    offset if order > 1 else None)

    def _first_order_moments(self, t, x, outs):
        """The "first" reading: a first-order step from x with each branch's output, its own noise; no past read."""
        zero, one = _scalar(0), _scalar(1)
        std = float(self._update(1, [zero], zero, 1.0))
        return self._affine_moments(x, outs, float(self._update(1, [zero], one, 0.0)),
                                    float(self._update(1, [one], zero, 0.0)), std, self._stds(t)[1],
                                    self.noise_levels(t), None)

    def _affine_moments(self, x, outs, x_weight, b1, std, forward_std, levels, offset):
        """Moments of the mean x_weight x + b1 D_u + offset, with d = b1 (D_u - D_n)."""
        if not self.affine:
            return AffineBranchMoments(x, self._converted(x, outs), x_weight, b1, std, forward_std, levels, offset)
        # D = k_x x + k_o out: affine in the raw outputs, whose difference needs no cancellation.
        convert = self.scheduler.convert_model_output
        k_o, k_x = (float(convert(_scalar(o), sample=_scalar(1 - o))) for o in (1, 0))
        return AffineBranchMoments(x, outs, x_weight + b1 * k_x, b1 * k_o, std, forward_std, levels, offset)

    def _history_moments(self, t, x, outs):
        """m_u - m_n_i from each branch's own outputs at every step; m_u from the stored ("guided") or the
        unconditional branch's own ("own") history."""
        s = self.scheduler
        order, from_stage = self._plan(t)
        i = s.step_index
        own = self.reading == "own"
        entry = (self._converted(x, outs[:1])[0] if own else None, self._gap(x, outs))
        past = [self._history.get(j) for j in range(i - order + 1, i)]
        if any(e is None or e[1].shape != entry[1].shape for e in past):
            raise ConfigError(f"step {i} of {type(s).__name__} is of order {order}: its branch means need the same "
                              f"branches' outputs at the {order - 1} step(s) before it. Read branch_moments at every "
                              "step of the chain, with the same branches and batch, on a kernel made for this chain")
        self._history = {j: e for j, e in self._history.items() if i - s.config.solver_order < j < i} | {i: entry}
        # The update is linear in its outputs: weighted as there, the gaps sum to m_u - m_n_i.
        *weights, weight = self._weights(order)
        diff = entry[1] * weight
        for w, (_, g) in zip(weights, past, strict=True):
            diff.add_(g, alpha=w)
        stored = self._stored(t)
        history = tuple(u for u, _ in past) + stored[order - 1:] if own else stored
        if self.affine:
            a, b, c, std, forward_std = self._coefficients(t, x)
            if own and c is not None:
                c = self._mean(t, x.new_zeros(()), x.new_zeros(()), history)
            return AffineBranchMoments(x, outs, a, b, std, forward_std, self.noise_levels(t), c, diff)
        return BranchMoments(self._mean(t, x, outs[0], history), diff, *self._stds(t), self.noise_levels(t))

    def _converted(self, x, outs):
        """Each branch's converted output (D, for DPM-Solver++), [branches, batch, ...]."""
        return _each_branch(lambda o: self.scheduler.convert_model_output(o, sample=x), x, outs)

    def _gap(self, x, outs):
        """This step's converted outputs, unconditional minus each negative ([negatives, batch, ...])."""
        convert = self.scheduler.convert_model_output
        if self.affine:
            # Without thresholding the conversion is affine in the output: the gap is its slope times the outputs'
            # difference, exact where the branches nearly agree.
            return float(convert(_scalar(1), sample=_scalar(0))) * (outs[:1] - outs[1:])
        converted = self._converted(x, outs)
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

    def _sigma_at(self, i) -> float:
        """The noise level of the scheduler's i-th sample."""
        return _level(*self.scheduler._sigma_to_alpha_sigma_t(self.scheduler.sigmas[i]))
