"""Which diffusers schedulers DNG can track, and the stochastic sibling of those it cannot.

    kernel = dng.schedulers.reverse_kernel(scheduler, eta)  # the step's Gaussian kernel, or a clear refusal
    scheduler = dng.schedulers.stochastic(pipe.scheduler)   # e.g. DPM++ 2M Karras -> DPM++ 2M SDE
    eta = 1.0 if dng.schedulers.needs_eta(scheduler) else 0.0

The sibling is built from the same config (betas, training steps, prediction type), so it samples the same model on
the same schedule; the step's noise differs, and a DPM-Solver sibling steps on the timestep spacing where the
scheduler had Karras, exponential, beta or Lu sigmas: DNG tracks best there (`_SPACINGS`). A flow-matching
scheduler's sibling is Euler ancestral for rectified flow (`LTXEulerAncestralRFScheduler`), which takes its schedule
as sigmas: `schedule_for` hands it the (shifted) sigmas the flow-matching scheduler would walk.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import diffusers
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

from dng import kernels
from dng.errors import ConfigError, UnsupportedSchedulerError

# What `reverse_kernel` dispatches to, as the refusal message lists it.
SUPPORTED = (
    "DDPMScheduler (variance_type fixed_small, fixed_small_log, fixed_large), DDIMScheduler with eta > 0, "
    "EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler, "
    "DPMSolverMultistepScheduler with algorithm_type sde-dpmsolver++ (orders 1-3) or the deprecated sde-dpmsolver "
    "(orders 1-2), DPMSolverSinglestepScheduler with sde-dpmsolver++ (orders 1-3), EDMDPMSolverMultistepScheduler "
    "with sde-dpmsolver++ (orders 1-2), TCDScheduler with eta (its gamma) > 0, LCMScheduler, "
    "FlowMatchEulerDiscreteScheduler with stochastic_sampling=True, LTXEulerAncestralRFScheduler with eta > 0, "
    "CMStochasticIterativeScheduler"
)

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
    DDPMScheduler: kernels.DDPMKernel,
    EulerAncestralDiscreteScheduler: kernels.EulerAncestralKernel,
    KDPM2AncestralDiscreteScheduler: kernels.KDPM2AncestralKernel,
    DPMSolverMultistepScheduler: kernels.DPMSolverKernel,
    DPMSolverSinglestepScheduler: kernels.DPMSolverKernel,
    EDMDPMSolverMultistepScheduler: kernels.DPMSolverKernel,
    LCMScheduler: kernels.LCMKernel,
    FlowMatchEulerDiscreteScheduler: kernels.FlowMatchEulerKernel,
    LTXEulerAncestralRFScheduler: kernels.LTXEulerAncestralKernel,
    CMStochasticIterativeScheduler: kernels.ConsistencyKernel,
}
# Stochastic through the `eta` their step takes (DDIM's eta, TCD's gamma).
_ETA_KERNELS = {DDIMScheduler: kernels.DDIMKernel, TCDScheduler: kernels.TCDKernel}


def reverse_kernel(scheduler, eta: float = 0.0):
    """The Gaussian kernel of a supported stochastic scheduler's step; for any other scheduler an
    UnsupportedSchedulerError that says how to switch to its stochastic sibling.

    `eta` is what the sampler gives the step: DDIM's eta, TCD's gamma.
    """
    kind = type(scheduler)
    try:
        if kind in _ETA_KERNELS:
            return _ETA_KERNELS[kind](scheduler, eta)
        if kind in _KERNELS:
            return _KERNELS[kind](scheduler)
        why = "it is deterministic or its step is not a Gaussian kernel DNG knows"
    except UnsupportedSchedulerError as err:
        why = str(err)
    raise UnsupportedSchedulerError(
        f"{kind.__name__} cannot be used with posterior tracking: {why}. DNG needs a stochastic sampler: "
        f"{switch_hint(scheduler)}. Supported: {SUPPORTED}.")

_SDE = {"algorithm_type": "sde-dpmsolver++"}
_ANCESTRAL = ("EulerAncestralDiscreteScheduler", {})
_FLOW_ANCESTRAL = ("LTXEulerAncestralRFScheduler", {"eta": 1.0})
# The sibling the FlowMatch schedulers had before LTX's Euler ancestral, kept where the latter cannot walk the schedule.
_RENOISING = ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True})
# Sigma spacings that crowd the steps into low noise, which a DPM++ SDE sibling drops (Euler ancestral has none):
# DNG's tracker makes one Bayes update per step, and falls behind where few steps cross the noise levels at which
# classes separate (Karras sigmas: 5 of 25 steps in sigma 0.5-5 on a 1000-step linear schedule, the timestep spacing
# 11). On the exact mixtures and on Fashion-MNIST DNG removes more on the timestep spacing (docs/GMM.md).
_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")

# Scheduler class -> (class of its stochastic sibling, config changes): the sibling on which DNG tracks best.
SIBLINGS = {
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", _SDE),
    # A singlestep stage's steps all start from its first sample: one tracked update per stage (docs/GMM.md).
    "DPMSolverSinglestepScheduler": ("DPMSolverMultistepScheduler", _SDE),
    "EDMDPMSolverMultistepScheduler": ("EDMDPMSolverMultistepScheduler", _SDE),
    "EDMEulerScheduler": ("EDMDPMSolverMultistepScheduler", _SDE),
    # Euler ancestral for rectified flow, not FlowMatchEuler's stochastic_sampling=True: that step re-noises the x0
    # estimate with fresh noise of the next level's size, which biases the samples and makes DNG's tracker count the
    # branches' disagreement again at every step (docs/GMM.md, flow matching: tracked DNG passes the exact-posterior
    # rule on 0 / 0 / 0 of 7 mixtures at 25 / 50 / 100 steps along it, 2 / 5 / 5 along LTX's Euler ancestral).
    "FlowMatchEulerDiscreteScheduler": _FLOW_ANCESTRAL,
    "FlowMatchHeunDiscreteScheduler": _FLOW_ANCESTRAL,
    "LTXEulerAncestralRFScheduler": ("LTXEulerAncestralRFScheduler", {"eta": 1.0}),
    "KDPM2DiscreteScheduler": ("KDPM2AncestralDiscreteScheduler", {}),
    "EulerDiscreteScheduler": _ANCESTRAL,
    "HeunDiscreteScheduler": _ANCESTRAL,
    "LMSDiscreteScheduler": _ANCESTRAL,
    "PNDMScheduler": _ANCESTRAL,
    # Multistep exponential integrators with DPM-Solver's config keys (solver order, flow sigmas, final sigma),
    # which Euler ancestral would drop; likewise DPM++ SDE (whose Brownian-tree noise DNG cannot track) and
    # SA-Solver.
    "UniPCMultistepScheduler": ("DPMSolverMultistepScheduler", _SDE),
    "DEISMultistepScheduler": ("DPMSolverMultistepScheduler", _SDE),
    "DPMSolverSDEScheduler": ("DPMSolverMultistepScheduler", _SDE),
    "SASolverScheduler": ("DPMSolverMultistepScheduler", _SDE),
}


def _sibling(scheduler) -> tuple[str, dict]:
    target, changes = SIBLINGS.get(type(scheduler).__name__, _ANCESTRAL)
    if (target, changes) == _FLOW_ANCESTRAL and scheduler.config.get("invert_sigmas"):
        # Mochi's inverted sigmas end at 1, which LTX's step cannot walk.
        target, changes = _RENOISING
    if target == "DPMSolverMultistepScheduler":
        changes = {**changes, **{key: False for key in _SPACINGS if scheduler.config.get(key)}}
    if target == "EDMDPMSolverMultistepScheduler" and scheduler.config.get("solver_order", 2) > 2:
        # EDM's third-order update has no SDE form.
        changes = {**changes, "solver_order": 2}
    return target, changes


def restarts_stages(scheduler) -> bool:
    """Whether later steps start from an earlier sample than the last: a singlestep DPM-Solver of order > 1 restarts
    every later step of a stage from the stage's first sample, so the tracker reads one update per stage and its
    trace does not replay it step by step (`dng.calibration.check_replayable`)."""
    return isinstance(scheduler, DPMSolverSinglestepScheduler) and scheduler.config.solver_order > 1


def prefers_sibling(scheduler) -> bool:
    """Whether DNG, though it tracks this scheduler, is clearly better on its sibling: one that `restarts_stages`
    (docs/GMM.md: tracked DNG passes the exact-posterior rule on at most 2 of 7 mixtures at 25 / 50 / 100 steps
    there, 5 / 4 / 5 on the multistep sibling)."""
    return restarts_stages(scheduler)


def tracked(scheduler, eta: float = 0.0) -> bool:
    """Whether DNG can track its posterior through this scheduler's steps at this eta."""
    try:
        check_tracked(scheduler, eta)
    except UnsupportedSchedulerError:
        return False
    return True


def check_tracked(scheduler, eta: float = 0.0) -> None:
    """Refuse, with the switch to its stochastic sibling, a scheduler DNG cannot track at this eta."""
    reverse_kernel(scheduler, eta)


def needs_eta(scheduler) -> bool:
    """Whether the scheduler's noise is the `eta` given to its step (DDIM, TCD): sample with eta > 0."""
    return type(scheduler) in _ETA_KERNELS


def switch_hint(scheduler) -> str:
    """The one-line switch to the stochastic sibling, as code a user can paste."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return "pass eta > 0 to the sampler (DDIM's eta; eta = 1 is DDPM-like)"
    if name == "TCDScheduler":
        return "pass eta > 0 to the sampler (TCD's gamma, which its step takes as eta; 0.3 is TCD's default)"
    target, changes = _sibling(scheduler)
    args = "".join(f", {key}={value!r}" for key, value in changes.items())
    code = f"{target}.from_config(scheduler.config{args})"
    why = (", on the timestep spacing, where DNG's tracker removes the concept best (docs/GMM.md)"
           if set(changes) & set(_SPACINGS) else "")
    if (target, changes) == _FLOW_ANCESTRAL and name != target:
        why = (", Euler ancestral for rectified flow on the same shifted sigmas: along FlowMatchEulerDiscreteScheduler"
               " with stochastic_sampling=True, which re-noises each step's x0 estimate, DNG's tracker over-counts "
               "the evidence and passes the exact-posterior rule on 0 / 0 / 0 of 7 mixtures at 25 / 50 / 100 steps, "
               "against 2 / 5 / 5 along this one (docs/GMM.md); a stochastic_sampling=True scheduler you assign "
               "yourself is still tracked")
    return (code if name in SIBLINGS else f"e.g. {code}") + f" (dng.schedulers.stochastic(scheduler) builds it{why})"


def stochastic(scheduler, **config):
    """The stochastic sibling of `scheduler` from the same config (with `config` changes); itself if already tracked,
    unless DNG is clearly better on the sibling (`prefers_sibling`: singlestep DPM-Solver SDE of order > 1).

    The sibling is the one DNG tracks best on (`SIBLINGS`): DPM-Solver's SDE multistep on the timestep spacing for
    the DPM-Solver family (Karras, exponential, beta and Lu sigmas dropped, singlestep made multistep: docs/GMM.md),
    Euler ancestral for Euler, Heun, LMS and PNDM, and for flow matching (FlowMatch Euler and Heun) Euler ancestral
    for rectified flow, LTXEulerAncestralRFScheduler at eta 1, which keeps the config's shift keys (hand it its sigmas
    with `schedule_for`). DDIM and TCD come back as they are: their noise is the sampler's `eta`, which must be > 0
    (`needs_eta`); so does a tracked scheduler, such as FlowMatchEulerDiscreteScheduler with stochastic_sampling=True.
    Raises ConfigError where no sibling is known or the sibling still cannot be tracked (e.g. a learned variance).
    """
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "config"):
        raise ConfigError(f"stochastic() takes a diffusers scheduler, e.g. pipe.scheduler; got "
                          f"{type(scheduler).__name__} {scheduler!r}")
    name = type(scheduler).__name__
    try:
        reverse_kernel(scheduler, 1.0)
    except UnsupportedSchedulerError:
        if name not in SIBLINGS:
            raise
        target, changes = _sibling(scheduler)
    else:
        if prefers_sibling(scheduler):
            target, changes = _sibling(scheduler)
        elif not config:
            return scheduler
        else:
            target, changes = name, {}
    # Every value the scheduler runs with, also those its constructor defaulted: from_config would otherwise give
    # them the sibling class's defaults (Heun's default betas are not Euler ancestral's).
    same = {key: value for key, value in scheduler.config.items() if key != "_use_default_values"}
    sibling = getattr(diffusers, target).from_config(same, **{**changes, **config})
    reverse_kernel(sibling, 1.0)
    return sibling


def flow_sigmas(config, num_inference_steps: int, sigmas=None, mu: float | None = None) -> torch.Tensor:
    """The sigmas, final 0 included, that diffusers' FlowMatchEulerDiscreteScheduler of `config` walks after
    `set_timesteps(num_inference_steps)`, or `set_timesteps(sigmas=sigmas)` where `sigmas` are given (which it shifts),
    with the resolution's shift `mu` where the config shifts dynamically: the schedule's shift, shift_terminal and
    Karras, exponential or beta spacing applied by diffusers itself.

    `config` may be another scheduler's that keeps the flow-matching keys (an LTXEulerAncestralRFScheduler built by
    `stochastic` or `from_config` from a flow-matching config); its other keys are left out.
    """
    keys = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    flow = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if k in keys})
    try:
        if sigmas is None:
            flow.set_timesteps(num_inference_steps, mu=mu)
        else:
            flow.set_timesteps(sigmas=[float(s) for s in sigmas], mu=mu)
    except ValueError as err:  # e.g. dynamic shifting without mu
        raise ConfigError(f"the flow-matching schedule cannot be set: {err}") from None
    return flow.sigmas


def schedule_for(scheduler, schedule: dict, num_inference_steps: int) -> dict:
    """The `set_timesteps` arguments (besides the step count) that make `scheduler` walk the schedule a flow-matching
    pipeline sets with `schedule` (its `sigmas` and `mu`, as FlowMatchEulerDiscreteScheduler takes them).

    LTXEulerAncestralRFScheduler walks given sigmas as they are, final 0 included, and ignores `mu` when given them:
    it gets the sigmas FlowMatchEulerDiscreteScheduler of its config would walk (`flow_sigmas`), shifted. It gets them
    also where it could shift them itself (no sigmas given): its own path rebuilds a FlowMatchEulerDiscreteScheduler
    from its config at every call, which logs that eta is not a flow-matching key. Other schedulers take `schedule` as
    it is.
    """
    if type(scheduler) is not LTXEulerAncestralRFScheduler or "timesteps" in schedule:
        return schedule
    return {"sigmas": flow_sigmas(scheduler.config, num_inference_steps, schedule.get("sigmas"), schedule.get("mu"))}


# The samplers the command line and the benches name, each built on a model's training schedule:
# name -> (scheduler class, config changes, the eta its step needs).
SAMPLERS = {
    "ddpm": ("DDPMScheduler", {}, 0.0),
    "euler-a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 0.0),
    # variance_type is DDPM's step variance in a DDPM config, but a learned-variance flag to DPM-Solver.
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler",
                     {**_SDE, "solver_order": 2, "use_karras_sigmas": True, "variance_type": None}, 0.0),
    "ddim": ("DDIMScheduler", {}, 1.0),  # eta 1: DDPM-like noise, which the tracker needs
}


class NamedSampler(NamedTuple):
    """A scheduler and the eta its step needs."""

    scheduler: object
    eta: float


def named_sampler(name: str, config) -> NamedSampler:
    """The sampler `name` (`SAMPLERS`) on the training schedule `config`, with the eta its step needs."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, changes, eta = SAMPLERS[name]
    return NamedSampler(getattr(diffusers, cls).from_config(config, **changes), eta)
