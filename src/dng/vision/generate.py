"""Sampling the class-conditional generator with a guidance rule: the rule of a method, and the sampling run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dng.config import DNGConfig
from dng.defaults import SLD_PRESET
from dng.errors import ConfigError
from dng.guidance import DynamicNegativeGuidance, Guidance, NegativePrompt, SafeLatentDiffusion
from dng.posterior import ReadPosterior
from dng.sampler import MAX_RMS, Trace, sample
from dng.vision.branches import ClassBranches, ClassPosterior
from dng.vision.models import NULL_LABEL, generator_sampler
from dng.vision.seeding import sample_generators

GUIDED = ("np", "sld", "dng")


def make_rule(method: str, *, np_scale: float = 1.0, sld_preset: str = SLD_PRESET,
              dng: DNGConfig | None = None) -> Guidance | None:
    """The rule of `method`: None for 'none', NP at `np_scale`, SLD's `sld_preset` or DNG with `dng` (the default
    preset if None). Rules reset in `start`, so one rule serves every batch of a run."""
    if method == "none":
        return None
    if method == "np":
        return NegativePrompt(np_scale)
    if method == "sld":
        return SafeLatentDiffusion(sld_preset)
    if method == "dng":
        return DynamicNegativeGuidance(dng if dng is not None else "default")
    raise ConfigError(f"unknown method {method!r}; choose from none, {', '.join(GUIDED)}")


def generate(
    unet,
    noise: torch.Tensor,
    *,
    scheduler: str,
    guidance: Guidance | None,
    negatives: Sequence[int],
    steps: int,
    seed: int,
    positive: int | None = None,
    cfg_scale: float | None = None,
    chunk: int = 128,
    progress: bool = False,
    dtype: str = "float32",
    first_index: int = 0,
    class_posterior: bool = False,
    max_rms: float | None = MAX_RMS,
) -> tuple[torch.Tensor, Trace | None]:
    """Samples in [-1, 1] from `noise` [N, 1, 28, 28] with the sampler named `scheduler`, `chunk` images per sampler
    run; the trace if guided.

    Sample j's step noise comes from its own generator (`sample_generators`, index `first_index + j`), so the same
    seed and index give the same step noise for every method, batch size and process. `dtype` 'bfloat16' runs the
    UNet under bfloat16 autocast (`DTYPES`). `class_posterior`: DNG reads p from every class's branch
    (`ClassPosterior`) instead of tracking it. `max_rms` is `dng.sampler.sample`'s range check.
    """
    guided = guidance is not None
    if guided and not negatives:
        raise ConfigError("a guidance rule needs at least one class to remove")
    negatives = list(negatives) if guided else []
    labels = [NULL_LABEL] + ([positive] if positive is not None else []) + negatives
    model = ClassBranches(unet, labels, dtype, every_class=class_posterior)
    if class_posterior:
        if not isinstance(guidance, DynamicNegativeGuidance):
            raise ConfigError("class_posterior gives DNG its posterior: it needs a DNG rule")
        guidance = guidance.with_posterior(ReadPosterior(ClassPosterior(model, negatives)))
    sampler = generator_sampler(scheduler)
    samples, traces = [], []
    for start in range(0, len(noise), chunk):
        x_T = noise[start : start + chunk]
        out = sample(
            model,
            sampler.scheduler,
            guidance,
            noise=x_T,
            num_inference_steps=steps,
            num_negatives=len(negatives),
            cfg_scale=cfg_scale if positive is not None else None,
            eta=sampler.eta,
            generator=sample_generators(seed, first_index + start, len(x_T), 1),
            progress=progress,
            return_trace=guided,
            max_rms=max_rms,
        )
        samples.append(out.samples)
        traces.append(out.trace)
    trace = Trace.concat(traces) if guided else None
    return torch.cat(samples).clamp(-1, 1), trace
