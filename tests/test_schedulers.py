"""Stochastic siblings: built from the same config, and trackable."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LTXEulerAncestralRFScheduler,
    PNDMScheduler,
    SASolverScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from dng.errors import ConfigError
from dng.kernels import stepped_timesteps
from dng.schedulers import needs_eta, reverse_kernel, schedule_for, stochastic, switch_hint

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
          num_train_timesteps=1100)
SDE = "sde-dpmsolver++"


@pytest.mark.parametrize("scheduler,sibling,settings", [
    (EulerDiscreteScheduler(**SD), EulerAncestralDiscreteScheduler, {}),
    (EulerDiscreteScheduler(**SD, use_karras_sigmas=True), EulerAncestralDiscreteScheduler, {}),
    (HeunDiscreteScheduler(), EulerAncestralDiscreteScheduler, {}),  # Heun's default betas are not Euler-a's
    (PNDMScheduler(**SD), EulerAncestralDiscreteScheduler, {}),
    (KDPM2DiscreteScheduler(**SD), "KDPM2AncestralDiscreteScheduler", {}),
    # DNG's sibling of the DPM-Solver family: multistep SDE on the timestep spacing (docs/GMM.md).
    (DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True, solver_order=3), DPMSolverMultistepScheduler,
     {"algorithm_type": SDE, "use_karras_sigmas": False, "solver_order": 3}),
    (DPMSolverMultistepScheduler(**SD, use_exponential_sigmas=True), DPMSolverMultistepScheduler,
     {"algorithm_type": SDE, "use_exponential_sigmas": False, "use_karras_sigmas": False}),
    (DPMSolverMultistepScheduler(**SD, use_lu_lambdas=True, use_flow_sigmas=False), DPMSolverMultistepScheduler,
     {"algorithm_type": SDE, "use_lu_lambdas": False}),
    (DPMSolverSinglestepScheduler(**SD, use_karras_sigmas=True), DPMSolverMultistepScheduler,
     {"algorithm_type": SDE, "use_karras_sigmas": False}),
    # Tracked, but one update per stage: DNG is clearly better on the multistep sibling (prefers_sibling).
    (DPMSolverSinglestepScheduler(**SD, algorithm_type=SDE, solver_order=3, use_karras_sigmas=True),
     DPMSolverMultistepScheduler, {"algorithm_type": SDE, "use_karras_sigmas": False, "solver_order": 3}),
    (UniPCMultistepScheduler(**SD, use_karras_sigmas=True), DPMSolverMultistepScheduler,
     {"algorithm_type": SDE, "use_karras_sigmas": False}),
    (DEISMultistepScheduler(**SD), DPMSolverMultistepScheduler, {"algorithm_type": SDE}),
    (SASolverScheduler(**SD), DPMSolverMultistepScheduler, {"algorithm_type": SDE}),
    (EDMDPMSolverMultistepScheduler(solver_order=3, sigma_max=120.0, prediction_type="v_prediction"),
     EDMDPMSolverMultistepScheduler, {"algorithm_type": SDE, "solver_order": 2, "sigma_max": 120.0}),
    (EDMEulerScheduler(sigma_data=0.6), EDMDPMSolverMultistepScheduler, {"algorithm_type": SDE, "sigma_data": 0.6}),
    # Flow matching's: Euler ancestral for rectified flow, keeping the shift keys (docs/GMM.md).
    (FlowMatchEulerDiscreteScheduler(shift=3.0), LTXEulerAncestralRFScheduler, {"eta": 1.0, "shift": 3.0}),
    (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
     LTXEulerAncestralRFScheduler, {"eta": 1.0, "use_dynamic_shifting": True, "max_shift": 1.15}),
    (FlowMatchHeunDiscreteScheduler(shift=3.0), LTXEulerAncestralRFScheduler, {"eta": 1.0, "shift": 3.0}),
    # Mochi's inverted sigmas end at 1, which LTX cannot walk: the re-noising sibling there.
    (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), FlowMatchEulerDiscreteScheduler,
     {"stochastic_sampling": True, "invert_sigmas": True}),
    (LTXEulerAncestralRFScheduler(eta=0.0), LTXEulerAncestralRFScheduler, {"eta": 1.0}),
], ids=lambda v: type(v).__name__ if not isinstance(v, (type, str, dict)) else "")
def test_sibling_is_trackable_and_built_from_the_same_config(scheduler, sibling, settings):
    result = stochastic(scheduler)
    name = sibling if isinstance(sibling, str) else sibling.__name__
    assert type(result).__name__ == name
    reverse_kernel(result, 1.0)
    for key in ("num_train_timesteps", "prediction_type", "sigma_min", "sigma_max"):
        if key in scheduler.config and key in result.config:
            assert result.config[key] == scheduler.config[key], key
    if hasattr(scheduler, "betas"):
        assert torch.equal(result.betas, scheduler.betas)
    for key, value in settings.items():
        assert result.config[key] == value, key
    hint = switch_hint(scheduler)
    assert hint.startswith(f"{name}.from_config(scheduler.config")
    assert ("timestep spacing, where DNG's tracker removes the concept best" in hint) == (False in settings.values())
    flow = type(scheduler).__name__.startswith("FlowMatch") and name == "LTXEulerAncestralRFScheduler"
    assert ("0 / 0 / 0 of 7 mixtures" in hint and "2 / 5 / 5" in hint) == flow


FLOW_CONFIGS = {
    "sd3": dict(shift=3.0),
    "flux-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "flux-schnell": dict(shift=1.0),
    "shift-terminal": dict(shift=3.0, shift_terminal=0.1),
    "karras": dict(shift=3.0, use_karras_sigmas=True),
    "linear-time-shift": dict(use_dynamic_shifting=True, time_shift_type="linear"),
}


@pytest.mark.parametrize("config", list(FLOW_CONFIGS))
@pytest.mark.parametrize("schedule", [{}, {"mu": 0.9}, {"sigmas": [1.0, 0.75, 0.5, 0.25], "mu": 0.9},
                                      {"sigmas": np.linspace(1.0, 1 / 5, 5), "mu": 1.2}],
                         ids=["default", "mu", "sigmas", "flux-linspace"])
def test_ltx_walks_the_sigmas_flow_matching_walks(config, schedule):
    """The sibling, given `schedule_for`'s arguments, walks the very sigmas and timesteps diffusers'
    FlowMatchEulerDiscreteScheduler of the same config walks given the pipeline's schedule, one step each."""
    flow = FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS[config])
    if flow.config.use_dynamic_shifting and "mu" not in schedule:
        pytest.skip("dynamic shifting needs mu")
    steps = len(schedule.get("sigmas", range(6)))
    flow.set_timesteps(**({"num_inference_steps": steps} if "sigmas" not in schedule else {}), **schedule)
    ltx = stochastic(flow)
    given = schedule_for(ltx, schedule, steps)
    assert set(given) == {"sigmas"}
    ltx.set_timesteps(steps, **given)
    assert torch.equal(ltx.sigmas, flow.sigmas)
    assert torch.equal(stepped_timesteps(ltx), flow.timesteps) and len(stepped_timesteps(ltx)) == steps
    if flow.config.shift != 1 or flow.config.use_dynamic_shifting:
        assert not torch.equal(ltx.sigmas[:-1], torch.linspace(1, float(ltx.sigmas[-2]), steps))
    # Other schedulers take the schedule as it is.
    renoising = FlowMatchEulerDiscreteScheduler.from_config(flow.config, stochastic_sampling=True)
    assert schedule_for(renoising, schedule, steps) is schedule
    assert stepped_timesteps(flow) is flow.timesteps


def test_ltx_without_the_flow_keys_walks_an_unshifted_schedule():
    """An LTX scheduler built without a flow-matching config walks what diffusers' default flow matching walks."""
    ltx = LTXEulerAncestralRFScheduler()
    ltx.set_timesteps(4, **schedule_for(ltx, {"sigmas": [1.0, 0.75, 0.5, 0.25], "mu": 2.0}, 4))
    assert torch.equal(ltx.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ConfigError, match="mu"):
        schedule_for(stochastic(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), {}, 4)


@pytest.mark.parametrize("scheduler", [
    DDPMScheduler(), EulerAncestralDiscreteScheduler(), DPMSolverMultistepScheduler(algorithm_type=SDE),
    LCMScheduler(), DDIMScheduler(), TCDScheduler(), DPMSolverSinglestepScheduler(algorithm_type=SDE, solver_order=1),
], ids=lambda s: type(s).__name__)
def test_a_tracked_scheduler_is_its_own_sibling(scheduler):
    assert stochastic(scheduler) is scheduler
    assert needs_eta(scheduler) == isinstance(scheduler, (DDIMScheduler, TCDScheduler))


def test_config_changes_apply_to_the_sibling():
    result = stochastic(DPMSolverMultistepScheduler(), use_karras_sigmas=True)
    assert result.config.algorithm_type == SDE and result.config.use_karras_sigmas
    again = stochastic(result, solver_order=3)
    assert again is not result and again.config.solver_order == 3 and again.config.use_karras_sigmas


def test_untrackable_without_a_sibling_is_refused():
    with pytest.raises(ConfigError, match="variance_type"):
        stochastic(DDPMScheduler(variance_type="learned_range"))
    with pytest.raises(ConfigError, match="variance_type"):
        stochastic(DPMSolverMultistepScheduler(variance_type="learned_range"))


def test_the_command_line_names_every_sampler():
    from dng.commands import SAMPLER_NAMES
    from dng.schedulers import SAMPLERS, named_sampler

    assert SAMPLER_NAMES == tuple(SAMPLERS)
    base = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                         variance_type="fixed_large").config
    for name in SAMPLERS:
        scheduler, eta = named_sampler(name, base)
        reverse_kernel(scheduler, eta)  # each one can be tracked as built
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"
