"""The samplers the CLI and the benches name: one stochastic diffusers scheduler each, built on a training schedule."""

from __future__ import annotations

from dng.errors import ConfigError

# name -> (scheduler class name, config overrides, eta the step needs)
SAMPLERS = {
    "ddpm": ("DDPMScheduler", {}, 0.0),
    "euler-a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 0.0),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, 0.0),
    "ddim": ("DDIMScheduler", {}, 1.0),  # eta 1: DDPM-like noise, which the tracker needs
}


def named_scheduler(name: str, config):
    """(scheduler, eta) of the sampler `name` on the training schedule `config` (a diffusers scheduler config)."""
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, overrides, eta = SAMPLERS[name]
    return getattr(diffusers, cls).from_config(config, **overrides), eta
