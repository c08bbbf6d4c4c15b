"""The one sampling loop: branches -> guidance -> scheduler.step -> posterior update."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dng.errors import ConfigError
from dng.guidance import Guidance, Step, base_prediction
from dng.kernels import reverse_kernel

# A step with (almost) no noise carries no usable likelihood ratio: the update would divide by ~0.
MIN_TRACKING_STD = 1e-6


@dataclass
class Trace:
    """Per step and sample: the timestep, p_t(c-|x_t) used, the applied scale and the step's log-likelihood ratio.

    `p`, `scale` and `llr` have shape [steps, batch, negatives]; `p` and `llr` are NaN for rules without a
    tracked posterior, `llr` is NaN where a step was not tracked (no noise added, or below the rule's sigma_min).
    `sigma` [steps, 2] holds each step's noise levels before and after it (NaN where the rule needs none).
    """

    timesteps: torch.Tensor
    p: torch.Tensor
    scale: torch.Tensor
    llr: torch.Tensor
    sigma: torch.Tensor | None = None


@dataclass
class SampleOutput:
    samples: torch.Tensor
    trace: Trace | None = None


def step_kwargs(scheduler, eta: float, generator) -> dict:
    """The keyword arguments of `scheduler.step` that this scheduler accepts (eta, generator)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    guidance: Guidance | None = None,
    *,
    noise: torch.Tensor,
    num_inference_steps: int = 50,
    num_negatives: int = 0,
    cfg_scale: float | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, dict], None] | None = None,
    progress: bool = True,
    return_trace: bool = False,
) -> SampleOutput:
    """Sample from `noise` (x_T before the scheduler's init_noise_sigma) with a guidance rule.

    `model(x, t)` evaluates every branch in one call: `x` stacks copies of the scaled sample along the
    batch axis in the order [unconditional, positive (if cfg_scale is given), negative 1..K] and the
    model returns epsilon (or whatever the scheduler's prediction_type is) in the same layout.
    `callback(i, t, x_prev, info)` runs after every step; `info` holds "p" and "scale" when known. The progress bar
    shows on a terminal only (tqdm's own rule), so logs of batch jobs stay readable.
    """
    num_negatives = int(num_negatives)
    if guidance is None and num_negatives:
        raise ConfigError(f"{num_negatives} negative branches were given but no guidance rule to use them")
    if guidance is not None and num_negatives < 1:
        raise ConfigError(f"{type(guidance).__name__} needs num_negatives >= 1 (one branch per negative concept)")
    if int(num_inference_steps) < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    tracking = guidance is not None and guidance.tracks_posterior
    kernel = reverse_kernel(scheduler, eta) if guidance is not None and guidance.needs_noise_levels else None
    batch = noise.shape[0]
    n_pos = 0 if cfg_scale is None else 1
    n_branches = 1 + n_pos + num_negatives
    if guidance is not None:
        guidance.start(batch, num_negatives, noise.device)

    scheduler.set_timesteps(int(num_inference_steps), device=noise.device)
    kwargs = step_kwargs(scheduler, eta, generator)
    # Flow-matching schedulers start from unit noise and take the model input as it is.
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    records = []
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress or None, desc="sampling", leave=False)):
        x_in = scale_input(x, t)
        out = model(x_in.repeat((n_branches,) + (1,) * (x.dim() - 1)), t)
        if out.shape[0] != n_branches * batch or out.shape[1:] != x.shape[1:]:
            raise ConfigError(f"the model returned shape {tuple(out.shape)}; expected "
                              f"{(n_branches * batch,) + tuple(x.shape[1:])} ({n_branches} branches of {batch})")
        branches = out.unflatten(0, (n_branches, batch))
        eps_u = branches[0]
        eps_p = branches[1] if n_pos else None
        info = {}
        # Before the step: Euler-type kernels read the step index that the step advances.
        levels = kernel.noise_levels(t) if kernel is not None else (float("nan"),) * 2
        if guidance is None:
            eps = base_prediction(eps_u, eps_p, cfg_scale or 1.0)
        else:
            eps_n = branches[1 + n_pos:]
            eps, scale, p = guidance.combine(eps_u, eps_n, Step(i, t, x, *levels), eps_p, cfg_scale or 1.0)
            info = {"p": p, "scale": scale}
            if tracking:
                # Without a positive branch, u and the negatives are already contiguous: no copy.
                tracked = branches if not n_pos else torch.cat([eps_u[None], eps_n])
                moments = kernel.branch_moments(t, x, tracked)
        x_prev = scheduler.step(eps, t, x, **kwargs).prev_sample
        llr = None
        if tracking and moments.std > MIN_TRACKING_STD:
            llr = guidance.observe(x_prev, moments)
        if return_trace and guidance is not None:
            records.append((info["p"], info["scale"], llr, levels))
        if callback is not None:
            callback(i, t, x_prev, info)
        x = x_prev
    return SampleOutput(x, _trace(scheduler.timesteps, records, batch, num_negatives) if return_trace else None)


def _trace(timesteps, records, batch, num_negatives) -> Trace:
    nan = torch.full((batch, num_negatives), float("nan"))

    def stack(column):
        return torch.stack([nan if r[column] is None else r[column].detach().float().cpu() for r in records])

    if not records:
        empty = torch.empty(len(timesteps), batch, 0)
        return Trace(timesteps.cpu(), empty, empty, empty)
    sigma = torch.tensor([r[3] for r in records], dtype=torch.float64)
    return Trace(timesteps.cpu(), stack(0), stack(1), stack(2), sigma)
