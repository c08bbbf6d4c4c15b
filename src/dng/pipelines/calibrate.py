"""DNG's tracker fitted to a Stable Diffusion (1.x / 2.x / XL / 3) or Flux pipeline from its own branches, no
classifier.

    made = calibrate_pipeline(pipe, ["a photo of a street"], ["cars"], priors=[0.05], num_images=200)
    made.save("sd15.calibration.json")      # what `dng calibrate --model DIR` writes
    pipe(prompt, negative_concepts=["cars"], dng=made.calibration)

The chains are the pipeline's own calls (the prompts with CFG, as users sample) with a tracking-only DNG rule
(`dng.calibration.tracking_only`: scale 0, so they are unguided), each recording the raw log-ratio of every concept
per step in its trace. Their final latents are then labelled by the model's verdict (`dng.verdict`) on the very
branches the tracker compares, the empty prompt (unconditional) against each concept's text, and the tracker is
fitted to those soft labels (`dng.calibration.fit_to_verdict`). docs/CALIBRATION.md says what it costs and why the
concepts' priors must be given.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from dng.calibration import SelfCalibration, fit_to_verdict, model_record, tracking_only
from dng.config import DNGConfig, check_concepts, check_probability
from dng.defaults import PIPELINE_CALIBRATION
from dng.errors import ConfigError
from dng.pipelines.common import DNGPipelineMixin
from dng.sampler import Trace
from dng.verdict import DRAWS, MIDPOINT, check_draws, path_of

# Images per pipeline call (and per verdict call) by default: each call evaluates 2 + K branches per image.
BATCH_SIZE = PIPELINE_CALIBRATION["batch_size"]


def check_priors(priors, num_concepts: int) -> list[float]:
    """One prior per concept in (0, 1); a single number stands for every concept."""
    if priors is None:
        raise ConfigError("the verdict needs each concept's prior: its share of the unconditional (empty-prompt) "
                          "model's images, which the two branches cannot tell (docs/CALIBRATION.md); e.g. "
                          "priors=[0.05]")
    priors = [priors] if not isinstance(priors, (list, tuple)) else list(priors)
    if len(priors) == 1:
        priors = priors * num_concepts
    if len(priors) != num_concepts:
        raise ConfigError(f"{len(priors)} priors for {num_concepts} concepts; give one per concept (or one for all)")
    return [check_probability("prior", p) for p in priors]


class VerdictBranches:
    """The verdict's model callable on a DNG pipeline: its denoiser on the branches [unconditional, concept 1..K], with
    the conditioning rows the pipeline's own call batched for them (captured from its first step)."""

    def __init__(self, pipe, num_concepts: int):
        self.pipe, self.num_concepts, self.cond = pipe, num_concepts, None

    def capture(self, pipe, step: int, t, tensors: dict) -> dict:
        """A callback_on_step_end: keeps one row of the unconditional branch and of each concept's, from the batched
        conditioning [unconditional, prompt, concept 1..K] (each `images` rows)."""
        if self.cond is None:
            images = next(iter(tensors.values())).shape[0] // (self.num_concepts + 2)
            rows = [0] + [(2 + k) * images for k in range(self.num_concepts)]
            self.cond = {name: value[rows].clone() for name, value in tensors.items()}
        return {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cond is None:
            raise ConfigError("the verdict's branches were called before a pipeline call gave their conditioning")
        images = x.shape[0] // (self.num_concepts + 1)
        cond = {name: value.repeat_interleave(images, 0) for name, value in self.cond.items()}
        dtype = self.cond["prompt_embeds"].dtype
        return self.pipe._dng_denoise(x.to(dtype), t.to(x.device), cond, {"cross_attention_kwargs": None})


def calibrate_pipeline(pipe, prompts: str | Sequence[str], concepts: str | Sequence[str], *, priors,
                       num_images: int = PIPELINE_CALIBRATION["num_images"],
                       num_inference_steps: int = PIPELINE_CALIBRATION["steps"], guidance_scale: float | None = None,
                       height: int | None = None, width: int | None = None, eta: float = 0.0,
                       generator: torch.Generator | None = None, batch_size: int = BATCH_SIZE,
                       p_max: float = DNGConfig.p_max,
                       exclusive: bool = False, draws: int = DRAWS, midpoint: float = MIDPOINT,
                       progress: bool = True, model_path=None) -> SelfCalibration:
    """Fit DNG's prior, temperature and offset for `concepts` to a DNG pipeline (`StableDiffusionDNGPipeline`,
    `StableDiffusionXLDNGPipeline`, `StableDiffusion3DNGPipeline`, `FluxDNGPipeline`) from its own branches.

    `num_images` unguided chains, image i from `prompts[i % len(prompts)]` at the pipeline's `guidance_scale` (its
    default if None: CFG for Stable Diffusion, the distilled guidance for Flux-dev), `batch_size` images per pipeline
    call, sampled as the pipeline samples DNG (the stochastic sibling of pipe.scheduler where it adds no noise; `eta`
    for the DDPM-family schedulers that take one), tracking every concept; the final latents (in the denoiser's
    layout: Flux's packed) are
    labelled by the verdict of the empty-prompt branch against each concept's, with `priors` (each concept's share
    of the unconditional model's images: two branches cannot tell it; one number stands for all), `draws` noisy
    copies per image; then `dng.calibration.fit`. `generator` (on the pipeline's device) draws the chains and seeds
    the verdict's noise. Cost per image: `num_inference_steps` calls of 2 + K branches (unconditional, prompt,
    concepts) and `draws` calls of 1 + K.

    Returns a `dng.calibration.SelfCalibration`: `.calibration` is the `ModelCalibration` to apply (`dng=` of the
    pipeline call, keyed by the concepts' texts), `.fit` the fit with its scores, `.verdict` the labels, `.samples`
    the final latents, `.trace` the chains; `.save(path)` writes the calibration file, recording the model as
    `model_path` (default: the folder the pipeline was loaded from).
    """
    if not isinstance(pipe, DNGPipelineMixin):
        raise ConfigError(f"calibrate_pipeline takes a DNG pipeline (StableDiffusionDNGPipeline, "
                          f"StableDiffusionXLDNGPipeline, StableDiffusion3DNGPipeline, FluxDNGPipeline; e.g. "
                          f"StableDiffusionDNGPipeline.from_pipe(pipe)), got {type(pipe).__name__} (for any other "
                          f"model given as a branch callable, dng.calibration.self_calibrate)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompts must be one or more texts (the images the chains draw), got {prompts!r}")
    concepts = check_concepts(concepts)
    priors = check_priors(priors, len(concepts))
    for name, value, minimum in (("num_images", num_images, 10), ("batch_size", batch_size, 1),
                                 ("num_inference_steps", num_inference_steps, 2)):
        if isinstance(value, bool) or int(value) != value or value < minimum:
            raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value}")
    check_probability("p_max", p_max)
    check_draws(draws)
    path = path_of(pipe.scheduler)  # a scheduler the verdict cannot read fails before any chain

    rule, branches = tracking_only(), VerdictBranches(pipe, len(concepts))
    call = dict(num_inference_steps=num_inference_steps, height=height, width=width, generator=generator,
                negative_concepts=concepts, dng=rule, output_type="latent", return_trace=True,
                callback_on_step_end=branches.capture, callback_on_step_end_tensor_inputs=list(pipe._dng_conditioning))
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "eta" in parameters:  # the flow-matching pipelines' steps take none
        call["eta"] = eta
    elif eta:
        raise ConfigError(f"eta applies to the DDPM-family pipelines' schedulers; {type(pipe).__name__} has none: "
                          f"drop it")
    if guidance_scale is None:
        guidance_scale = parameters["guidance_scale"].default
    call["guidance_scale"] = guidance_scale
    latents, traces = [], []
    for start in range(0, num_images, batch_size):
        texts = [prompts[i % len(prompts)] for i in range(start, min(start + batch_size, num_images))]
        out = pipe(texts, **call)
        latents.append(out.images)
        traces.append(out.trace)
    # The verdict's noise from the chains' generator, on the CPU where the verdict draws it.
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator,
                                                            device=generator.device))
    made = fit_to_verdict(branches, torch.cat(latents), Trace.concat(traces), path, concepts, priors=priors,
                          p_max=p_max, exclusive=exclusive, draws=draws, midpoint=midpoint, batch_size=batch_size,
                          generator=None if seed is None else torch.Generator().manual_seed(seed), progress=progress)
    folder = model_path if model_path is not None else getattr(pipe, "name_or_path", None)
    made.model = model_record("diffusers", folder or None)
    made.settings.update(pipeline=type(pipe).__name__, prompts=prompts, num_images=num_images,
                         steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                         scheduler=type(pipe.scheduler).__name__, priors=priors, batch_size=batch_size)
    return made
