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

Modules: `moments` (the tracker's view of a step), `base` (what every kernel shares), `ddpm` (DDPM, DDIM, TCD,
LCM), `euler` (Euler and DPM2 ancestral, rectified flow, consistency models), `dpmsolver` (DPM-Solver SDE),
`selfcheck` (a check before sampling that a kernel still reproduces the installed diffusers' step).
"""

from __future__ import annotations

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

from dng.kernels.base import SUPPORTED, _unsupported
from dng.kernels.ddpm import DDIMKernel, DDPMKernel, LCMKernel, TCDKernel
from dng.kernels.dpmsolver import DPMSolverKernel
from dng.kernels.euler import (
    ConsistencyKernel,
    EulerAncestralKernel,
    FlowMatchEulerKernel,
    KDPM2AncestralKernel,
    LTXEulerAncestralKernel,
)
from dng.kernels.moments import AffineBranchMoments, BranchMoments
from dng.kernels.selfcheck import verify_kernel

__all__ = [
    "SUPPORTED",
    "AffineBranchMoments",
    "BranchMoments",
    "ConsistencyKernel",
    "DDIMKernel",
    "DDPMKernel",
    "DPMSolverKernel",
    "EulerAncestralKernel",
    "FlowMatchEulerKernel",
    "KDPM2AncestralKernel",
    "LCMKernel",
    "LTXEulerAncestralKernel",
    "TCDKernel",
    "reverse_kernel",
    "verify_kernel",
]

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
