"""Reverse-kernel mean and standard deviation of one scheduler step.

For a supported stochastic scheduler, `scheduler.step(out, t, x)` draws
`mean(x, past, out) + std * z` with `z ~ N(0, I)`, where `past` is what the scheduler
keeps from earlier steps (a multistep solver's earlier outputs, a two-stage solver's
starting sample; nothing for DDPM-like steps). The posterior tracker needs `mean` for
several model outputs at the same `x` and past, and the `std` of the noise the step adds.
Without clipping or thresholding the mean is affine in the output, a x + b out + c with
c from the past: `branch_moments` reads a, b and c off the kernel's formula (read, never
written: the sampler asks before it steps). A multistep solver's past holds model outputs,
which differ per branch: its kernel (one per chain) reads the step as a first-order step in
this step's outputs with the solver's own history and extrapolation shared by the branches
(`dpmsolver.READINGS` has the alternatives), and the part of its mean that reads the step's
guided output once the scheduler stored it.
Kernels also give `forward_std`, the std of the forward transition between the
step's two noise levels (sqrt(beta_t) in DDPM terms) in the same sample space: the
true reverse kernel's spread lies between the two, nearer the forward one at low noise.
And they give those two noise levels as `sigma` = sqrt((1 - abar) / abar), the
noise-to-signal ratio of x_t whatever the schedule's own parametrisation (k-diffusion's
and EDM's sigma; s / (1 - s) for flow matching; log-SNR = -2 log sigma): rules that depend
on where the chain is read it.

The scheduler -> kernel dispatch and the refusal of other schedulers live in `dng.schedulers`; this package
imports no other part of dng but its errors. Modules: `moments` (the tracker's view of a step), `base` (what every
kernel shares), `ddpm` (DDPM, DDIM, TCD, LCM), `euler` (Euler and DPM2 ancestral, rectified flow, consistency
models), `dpmsolver` (DPM-Solver SDE), `selfcheck` (a check before sampling that a kernel still reproduces the
installed diffusers' step).
"""

from __future__ import annotations

from dng.kernels.base import stepped_timesteps
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
    "stepped_timesteps",
    "verify_kernel",
]

