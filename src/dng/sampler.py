"""The one sampling loop: branches -> guidance rule -> scheduler.step -> the rule sees the step's result."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dng.config import check_finite
from dng.errors import ConfigError, NonFiniteError, SampleRangeError
from dng.guidance import Guidance, Step, base_prediction
from dng.kernels import stepped_timesteps

# A sample "activated" DNG when its tracked p_t reached 1/2 at some step: the concept had become more likely than
# not, which is where the applied scale lam0 p/(1-p) reaches lam0 itself. The threshold reads p, not the scale, so
# that it means the same whatever lam0, its late boost and its cap; from the default prior 0.1 it takes evidence
# that multiplies the odds by 9.
ACTIVATION_P = 0.5


# A sample whose RMS is this many times the chain's largest noise level has left any normalised model's range: data
# are trained at about unit variance, and a chain stays within its noise level plus the data's (the shipped generator
# on Euler ancestral, x_T at RMS 157: at most 116 with NP up to scale 20, 5.5e5 at NP 1e6, 1e22 at DNG lam0 1e30).
MAX_RMS = 100.0


class _Stop:
    def __repr__(self):
        return "dng.sampler.STOP"


# What a callback returns to stop the loop after its step. Only this: diffusers' callbacks return a dict of
# tensors, which must not read as a stop request.
STOP = _Stop()


@dataclass
class Trace:
    """Per step and sample: the timestep, p_t(c-|x_t) used, the applied scale and the step's log-likelihood ratio.

    `p`, `scale` and `llr` have shape [steps, batch, negatives]; `scale` is the scale each negative got at the step
    (for DNG lam0(sigma) p/(1-p), not lam0 itself); `p` is NaN for rules without a posterior, `llr` is NaN where a
    step was not tracked (a read posterior, no noise added, or below the rule's sigma_min). `sigma` [steps, 2] holds
    each step's noise levels before and after it (NaN for rules that need none). Without a guidance rule the three
    are [steps, batch, 0] and `sigma` is NaN.
    """

    timesteps: torch.Tensor
    p: torch.Tensor
    scale: torch.Tensor
    llr: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def concat(cls, traces: list[Trace]) -> Trace:
        """The traces of several runs of one schedule as one, their samples along the batch axis."""
        first = traces[0]
        return cls(first.timesteps, *(torch.cat([getattr(t, f) for t in traces], 1) for f in ("p", "scale", "llr")),
                   first.sigma)


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


def check_steps(steps: int, scheduler, name: str = "num_inference_steps") -> int:
    """`steps` as a step count for `scheduler`: a whole number from 1 to its `num_train_timesteps` (more steps than
    the schedule has timesteps repeat timesteps, which DDPM and DDIM refuse and Euler-type samplers silently run)."""
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {steps}")
    most = scheduler.config.get("num_train_timesteps")
    if most is not None and steps > most:
        raise ConfigError(f"{name} {steps} is more than the scheduler's {most} training timesteps; give at most {most}")
    return int(steps)


def _check_finite_output(out, batch, i, t, steps, n_pos, num_negatives) -> None:
    # One float32 sum per step: NaN or inf anywhere makes it non-finite, and float32 keeps fp16 outputs from
    # overflowing it. Only then is the output searched, so that the message can name the branch.
    if torch.isfinite(out.sum(dtype=torch.float32)):
        return
    bad = ~torch.isfinite(out.unflatten(0, (-1, batch))).flatten(2).all(-1)
    if not bad.any():
        return  # finite values whose float32 sum overflowed
    branches = ["unconditional"] + ["positive"] * n_pos + [f"negative {k + 1}" for k in range(num_negatives)]
    names = [name for name, row in zip(branches, bad, strict=True) if row.any()]
    cause = ("NaN or inf weights in the model, or an input it cannot handle" if i == 0 else
             "NaN or inf weights in the model, or a sample that the earlier steps' guidance pushed out of the "
             "model's range (lower the guidance scale)")
    raise NonFiniteError(f"the model returned NaN or inf at step {i + 1} of {steps} (timestep {float(t):g}) in the "
                         f"{', '.join(names)} branch{'es' * (len(names) > 1)} for {int(bad.any(0).sum())} of {batch} "
                         f"samples; likely cause: {cause}")


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _check_noise(noise) -> None:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ConfigError(f"noise must be a floating-point tensor, got {type(noise).__name__}"
                          f"{f' of {noise.dtype}' if isinstance(noise, torch.Tensor) else ''}")
    if noise.dim() < 2 or noise.shape[0] < 1:
        raise ConfigError(f"noise must be [batch, ...] with at least one sample, got shape {tuple(noise.shape)}")


def _check_layout(model, n_branches: int, n_pos: int, num_negatives: int, noise) -> None:
    """Refuse, before any model call, a model that declares another branch count or sample shape."""
    branches = getattr(model, "num_branches", None)
    if branches is not None and branches != n_branches:
        layout = ", ".join(["unconditional"] + ["positive"] * n_pos + [f"{num_negatives} negative(s)"] * bool(
            num_negatives))
        raise ConfigError(f"the model evaluates {branches} branches per call but this sample() call needs "
                          f"{n_branches} ({layout}); give the model one branch per role, or change cfg_scale / "
                          f"num_negatives")
    shape = getattr(model, "sample_shape", None)
    if shape is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise ConfigError(f"noise has samples of shape {tuple(noise.shape[1:])}; the model takes {tuple(shape)}")


def _first_tensor(out) -> torch.Tensor:
    """A model's output as a tensor: a diffusers output object or a tuple is read as its first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        first = out[0] if len(out) else None
        if isinstance(first, torch.Tensor):
            return first
    raise ConfigError(f"the model returned {type(out).__name__}; return a tensor (or a tuple / diffusers output "
                      f"whose first field is one)")


def _call(model, x, t, i: int):
    """The model's call; a dtype mismatch on the first step is the noise's, restated as such."""
    try:
        return model(x, t)
    except RuntimeError as err:
        if i or "type" not in str(err):
            raise
        raise ConfigError(f"the model failed on noise of dtype {x.dtype} ({str(err).splitlines()[0]}); draw the "
                          f"noise in the model's dtype") from None


def _check_range(x, bound, i: int, steps: int, t) -> None:
    if bound is None:
        return
    # The largest |x| bounds the RMS: one cheap pass settles the usual case.
    if not x.detach().abs().amax() > bound:
        return
    # float64: a float32 sum of squares overflows long before the samples do.
    flat = x.detach().flatten(1).double()
    rms = flat.pow(2).mean(1).sqrt()
    far = torch.isfinite(rms) & (rms > bound)  # non-finite samples get their own error after the loop
    if far.any():
        raise SampleRangeError(f"{int(far.sum())} of {len(x)} samples left the model's range at step {i + 1} of "
                               f"{steps} (timestep {float(t):g}): RMS up to "
                               f"{float(rms.max()):.3g} against at most {bound:.3g}; likely cause: a guidance scale "
                               f"too large for the model (lower it), or pass max_rms=None to sample() to allow it")


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
    set_timesteps_kwargs: dict | None = None,
    max_rms: float | None = MAX_RMS,
) -> SampleOutput:
    """Sample from `noise` (x_T before the scheduler's init_noise_sigma) with a guidance rule.

    `model(x, t)` evaluates every branch in one call: `x` stacks copies of the scaled sample along the
    batch axis in the order [unconditional, positive (if cfg_scale is given), negative 1..K] and the
    model returns epsilon (or whatever the scheduler's prediction_type is) in the same layout.
    `callback(i, t, x_prev, info)` runs after every step; `info` holds what the rule recorded of the step ("p",
    "scale", and for DNG "llr" and "sigma"); a callback that returns `STOP` stops the loop after that step
    (diffusers' `pipe._interrupt`), any other return value is ignored. The progress bar
    shows on a terminal only (tqdm's own rule), so logs of batch jobs stay readable. `set_timesteps_kwargs` go to
    `scheduler.set_timesteps`, e.g. {"mu": 0.8} for a flow-matching scheduler with `use_dynamic_shifting`.

    `model` may declare `num_branches` (how many branches one call evaluates) and `sample_shape` (one sample's
    shape): a layout that does not match is refused before the first call. A sample whose RMS leaves the model's
    range (above `max_rms` times the largest noise level of the chain, x_T's, or 1) raises `SampleRangeError` with
    the step: a guidance scale too large for the model; `max_rms=None` turns the check off.
    """
    num_negatives = _whole("num_negatives", num_negatives)
    if guidance is not None and not isinstance(guidance, Guidance):
        raise ConfigError(f"guidance must be a dng.guidance.Guidance rule (e.g. DynamicNegativeGuidance()) or None, "
                          f"got {type(guidance).__name__}")
    _check_noise(noise)
    if guidance is None and num_negatives:
        raise ConfigError(f"{num_negatives} negative branches were given but no guidance rule to use them")
    if guidance is not None and num_negatives < 1:
        raise ConfigError(f"{type(guidance).__name__} needs num_negatives >= 1 (one branch per negative concept)")
    steps = check_steps(num_inference_steps, scheduler)
    # cfg_scale None means no positive branch; combine then ignores the scale.
    w = 1.0 if cfg_scale is None else check_finite("cfg_scale", cfg_scale)
    if not torch.isfinite(noise).all():
        raise ConfigError("noise holds NaN or inf; draw it from a normal distribution")
    batch = noise.shape[0]
    n_pos = 0 if cfg_scale is None else 1
    n_branches = 1 + n_pos + num_negatives
    _check_layout(model, n_branches, n_pos, num_negatives, noise)
    extra = dict(set_timesteps_kwargs or {})
    try:
        scheduler.set_timesteps(steps, device=noise.device, **extra)
    except (ValueError, TypeError) as err:
        # e.g. LCM's step count bound, or dynamic shifting without `mu`: restated as what to change rather than as a
        # traceback.
        given = f" with set_timesteps_kwargs={extra}" if extra else ""
        hint = (" (pass set_timesteps_kwargs={'mu': ...}, the shift of its dynamic shifting)"
                if "`mu`" in str(err) else "")
        name = type(scheduler).__name__
        raise ConfigError(f"{name} refused num_inference_steps={steps}{given}: {err}{hint}") from None
    if guidance is not None:
        guidance.start(scheduler, eta=eta, sample_shape=tuple(noise.shape), num_negatives=num_negatives,
                       device=noise.device)
    kwargs = step_kwargs(scheduler, eta, generator)
    # Flow-matching schedulers start from unit noise and take the model input as it is.
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    # Along the chain a sample's RMS stays within a few noise levels of the data's; the largest noise level is x_T's.
    bound = None if max_rms is None else max_rms * max(1.0, float(getattr(scheduler, "init_noise_sigma", 1.0)))
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    records = []
    # LTX's Euler ancestral given its sigmas lists a last timestep whose step returns the sample as it is: not run.
    timesteps = stepped_timesteps(scheduler)
    for i, t in enumerate(tqdm(timesteps, disable=not progress or None, desc="sampling", leave=False)):
        x_in = scale_input(x, t)
        out = _first_tensor(_call(model, x_in.repeat((n_branches,) + (1,) * (x.dim() - 1)), t, i))
        if out.dtype != x.dtype and out.is_floating_point():
            # Noise in another float type than the model's: the chain continues in the model's.
            x = x.to(out.dtype)
        if out.shape[0] != n_branches * batch or out.shape[1:] != x.shape[1:]:
            raise ConfigError(f"the model returned shape {tuple(out.shape)}; expected "
                              f"{(n_branches * batch,) + tuple(x.shape[1:])} ({n_branches} branches of {batch})")
        _check_finite_output(out, batch, i, t, steps, n_pos, num_negatives)
        branches = out.unflatten(0, (n_branches, batch))
        eps_u = branches[0]
        eps_p = branches[1] if n_pos else None
        info = {}
        if guidance is None:
            eps = base_prediction(eps_u, eps_p, w)
        else:
            eps, scale, p = guidance.combine(eps_u, branches[1 + n_pos:], Step(i, t, x), eps_p, w)
            info = {"p": p, "scale": scale}
        x_prev = scheduler.step(eps, t, x, **kwargs).prev_sample
        if guidance is not None:
            info.update(guidance.after_step(x_prev))
            if return_trace:
                records.append(info)
        _check_range(x_prev, bound, i, steps, t)
        x = x_prev
        if callback is not None and callback(i, t, x_prev, info) is STOP:
            break
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{int((~torch.isfinite(x)).flatten(1).any(1).sum())} of {batch} samples are NaN or inf "
                             "after the last step although every model output was finite: the guidance or the "
                             "scheduler step overflowed (lower the guidance scale)")
    trace = _trace(timesteps[: i + 1], records, batch, num_negatives) if return_trace else None
    return SampleOutput(x, trace)


def _trace(timesteps, records, batch, num_negatives) -> Trace:
    """The trace of the steps taken; the rule's per-step records hold "p", "scale" and optionally "llr", "sigma"."""
    nan = torch.full((batch, num_negatives), float("nan"))
    steps = len(timesteps)

    def stack(key):
        return torch.stack([nan if r.get(key) is None else r[key].detach().float().cpu() for r in records])

    if not records:
        empty = torch.empty(steps, batch, 0)
        return Trace(timesteps.cpu(), empty, empty, empty, torch.full((steps, 2), float("nan"), dtype=torch.float64))
    sigma = torch.tensor([r.get("sigma", (float("nan"),) * 2) for r in records], dtype=torch.float64)
    return Trace(timesteps.cpu(), stack("p"), stack("scale"), stack("llr"), sigma)
