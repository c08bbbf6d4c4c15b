"""What the SD and SDXL pipelines share: the checks and set-up of a call, the guidance rule, the sampler call."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from dng import schedulers
from dng.errors import ConfigError
from dng.guidance import DynamicNegativeGuidance, Guidance, NegativePrompt, SafeLatentDiffusion
from dng.sampler import STOP, sample
from dng.schedulers import reverse_kernel

METHODS = ("dng", "np", "sld")


@dataclass
class CallSetup:
    """What a checked call hands to its encoding and sampling steps."""

    guidance: Guidance
    batch_size: int
    concepts: list[list[str]]  # per negative concept given as text: one string per prompt
    encode: dict  # keyword arguments of encode_prompt that every branch shares
    tensor_inputs: list[str]  # what callback_on_step_end asks for


def set_up(pipe, check_inputs: Callable[[list[str]], None], *, prompt, prompt_embeds, height: int, width: int,
           guidance_scale: float, negative_prompt, negative_concepts, negative_prompt_embeds,
           num_images_per_prompt: int, eta: float, cross_attention_kwargs, clip_skip, callback_on_step_end,
           callback_on_step_end_tensor_inputs, negative_guidance, dng_preset: str, dng: dict, dng_stochastic: bool,
           unsupported: dict) -> CallSetup:
    """Check every input before any model runs, build the rule and set the parent's call state.

    `check_inputs(tensor_inputs)` runs the parent's own checks; their ValueError becomes a ConfigError.
    """
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    if not math.isfinite(float(guidance_scale)):
        raise ConfigError(f"guidance_scale must be a finite number, got {guidance_scale} (at most 1 turns "
                          f"classifier-free guidance off, as in diffusers)")
    check_size(pipe, height, width)
    try:
        check_inputs(callback_on_step_end_tensor_inputs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if negative_prompt_embeds is not None and negative_concepts is not None:
        raise ConfigError("give negative_prompt_embeds (one concept) or negative_concepts, not both")
    guidance = make_guidance(negative_guidance, guidance_scale, dng_preset, **dng)
    check_pipeline(pipe, guidance, eta, dng_stochastic, **unsupported)

    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(prompt_embeds)
    if negative_prompt_embeds is not None and len(negative_prompt_embeds) != batch_size:
        raise ConfigError(f"negative_prompt_embeds has {len(negative_prompt_embeds)} rows for {batch_size} "
                          f"prompts; give one per prompt")
    concepts = concept_prompts(negative_prompt, negative_concepts, batch_size)
    # The parent's properties (do_classifier_free_guidance, interrupt, ...) read these.
    pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = guidance_scale, 0.0, clip_skip
    pipe._cross_attention_kwargs, pipe._interrupt = cross_attention_kwargs, False
    encode = dict(device=pipe._execution_device, num_images_per_prompt=num_images_per_prompt,
                  lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip)
    return CallSetup(guidance, batch_size, concepts, encode, callback_on_step_end_tensor_inputs)


def check_size(pipe, height: int, width: int) -> None:
    """Height and width are positive multiples of 8 and of the VAE's downsampling factor."""
    factor = math.lcm(8, pipe.vae_scale_factor)
    if min(height, width) <= 0 or height % factor or width % factor:
        fix = " x ".join(str(max(factor, math.ceil(v / factor) * factor)) for v in (height, width))
        raise ConfigError(f"height and width must be positive multiples of {factor}, got {height} x {width}; "
                          f"e.g. {fix}")


def concept_prompts(negative_prompt, negative_concepts, batch_size: int) -> list[list[str]]:
    """One list of batch_size strings per negative concept; [] when there is none."""
    if negative_concepts is not None:
        if negative_prompt is not None:
            raise ConfigError("give negative_prompt (one concept) or negative_concepts (several), not both")
        concepts = [negative_concepts] if isinstance(negative_concepts, str) else list(negative_concepts)
        if not concepts:
            raise ConfigError("negative_concepts is empty: give at least one concept, or None for plain CFG")
    else:
        concepts = [] if negative_prompt is None else [negative_prompt]
    prompts = []
    for i, concept in enumerate(concepts):
        texts = [concept] * batch_size if isinstance(concept, str) else list(concept)
        if len(texts) != batch_size or not all(isinstance(s, str) for s in texts):
            raise ConfigError(f"negative concept {i} is {concept!r}: give one string for every image, or a list of "
                              f"{batch_size} strings (one per prompt)")
        prompts.append(texts)
    return prompts


def make_guidance(method, guidance_scale: float, dng_preset: str = "default", **dng) -> Guidance:
    """The rule named by `negative_guidance`, or the Guidance object itself; `dng` overrides the DNG preset where
    not None."""
    if isinstance(method, Guidance):
        return method
    if method == "dng":
        changes = {("lam0" if k == "scale" else k): v for k, v in dng.items() if v is not None}
        return DynamicNegativeGuidance.preset(dng_preset, **changes)
    if method == "np":
        # With the empty prompt as the unconditional branch, diffusers' negative prompt is NP at scale w - 1; without
        # CFG (w <= 1) the parent ignores its negative prompt, and so does scale 0.
        return NegativePrompt(max(guidance_scale - 1.0, 0.0))
    if method == "sld":
        return SafeLatentDiffusion.preset("medium")
    raise ConfigError(f"negative_guidance must be one of {METHODS} or a dng.guidance.Guidance, got {method!r}")


def check_pipeline(pipe, guidance: Guidance, eta: float, stochastic: bool = False, **unsupported) -> None:
    """Refuse what the DNG loop cannot honour before any model runs; with `stochastic`, switch a scheduler DNG
    cannot track to its stochastic sibling (`dng.schedulers.stochastic`) and say so."""
    for name, value in unsupported.items():
        if value is not None and not (isinstance(value, (int, float)) and value == 0):
            raise ConfigError(f"{name} is not supported together with negative concepts; leave it unset")
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ConfigError("this UNet embeds the guidance scale (LCM-style) and has no unconditional branch to guide")
    if not isinstance(guidance, DynamicNegativeGuidance):
        return
    try:
        reverse_kernel(pipe.scheduler, eta)
        return
    except ConfigError as err:
        if not stochastic or schedulers.needs_eta(pipe.scheduler):
            raise ConfigError(f"{err} On a pipeline: pipe.scheduler = dng.schedulers.stochastic(pipe.scheduler), "
                              "or pass dng_stochastic=True") from None
    old = type(pipe.scheduler).__name__
    pipe.scheduler = schedulers.stochastic(pipe.scheduler)
    warnings.warn(f"dng_stochastic=True: DNG needs a stochastic sampler; {old} was replaced by its sibling "
                  f"{type(pipe.scheduler).__name__} from the same config", stacklevel=4)


def initial_noise(pipe, batch: int, height: int, width: int, dtype, device, generator, latents):
    """x_T before init_noise_sigma, drawn exactly as the parent's prepare_latents draws it."""
    shape = (batch, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor,
             int(width) // pipe.vae_scale_factor)
    if isinstance(generator, list) and len(generator) != batch:
        raise ConfigError(f"{len(generator)} generators given for {batch} images; give one per image")
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device=device, dtype=dtype)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def run(pipe, unet_fn, cond: dict, guidance: Guidance, noise, *, num_inference_steps: int, num_negatives: int,
        eta: float, generator, callback_on_step_end, tensor_inputs, return_trace: bool):
    """Sample through dng.sampler.sample; `cond` holds the batched UNet conditioning a callback may replace."""
    pipe._num_timesteps = num_inference_steps

    def on_step(i, t, x_prev, info):
        available = {"latents": x_prev, "dng_p": info.get("p"), "dng_scale": info.get("scale"), **cond}
        outputs = callback_on_step_end(pipe, i, t, {k: available[k] for k in tensor_inputs}) or {}
        for key in cond:
            cond[key] = outputs.pop(key, cond[key])
        if "latents" in outputs:
            # The sampler continues from this very tensor, so replacing it in place is replacing the latents.
            x_prev.copy_(outputs.pop("latents"))
        # The parent skips every step after the one whose callback set pipe._interrupt.
        return STOP if pipe.interrupt else None

    return sample(
        # Without CFG (guidance_scale <= 1) the parent uses the prompt's branch alone, which is CFG at w = 1.
        unet_fn, pipe.scheduler, guidance, noise=noise, num_inference_steps=num_inference_steps,
        num_negatives=num_negatives, cfg_scale=pipe.guidance_scale if pipe.do_classifier_free_guidance else 1.0,
        eta=eta, generator=generator, callback=on_step if callback_on_step_end is not None else None,
        progress=not getattr(pipe, "_progress_bar_config", {}).get("disable", False),
        return_trace=return_trace,
    )
