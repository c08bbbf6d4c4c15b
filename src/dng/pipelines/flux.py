"""Flux.1 (dev and schnell) with Dynamic Negative Guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux import FluxPipelineOutput
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import replace_example_docstring

from dng.errors import ConfigError
from dng.pipelines.common import DNG_TENSOR_INPUTS, other_encoder_texts
from dng.pipelines.flow import FlowDNGPipelineMixin
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import FluxDNGPipeline

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.bfloat16 if device == "cuda" else torch.float32
        >>> pipe = FluxDNGPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=dtype).to(device)

        >>> # Flux-dev's guidance is distilled: the base is the prompt's branch at guidance_scale, and DNG pushes away
        >>> # from the concept against the empty prompt's branch at the same guidance.
        >>> out = pipe("a busy market street, photo", negative_prompt="cars", guidance_scale=3.5,
        ...            num_inference_steps=28, generator=torch.Generator(device).manual_seed(0), return_trace=True)
        >>> out.images[0].save("market.png")
        >>> activated = out.trace.p.amax(0) >= 0.5  # did the image head for cars? [images, concepts]
        ```
"""


@dataclass
class FluxDNGPipelineOutput(FluxPipelineOutput):
    """The parent's output plus `trace` (per step and image: p and the applied scale of each negative)."""

    trace: Trace | None = None


class FluxDNGPipeline(FlowDNGPipelineMixin, FluxPipeline):
    """FluxPipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    The branches are [empty prompt, prompt, concepts...], all at the same distilled guidance (Flux-dev) and in one
    batched transformer call per step. The base is the prompt's branch, the parent's prediction without true CFG
    (`true_cfg_scale > 1` makes it CFG against the empty prompt's branch); DNG's term is against the empty prompt's
    branch, the unconditional prediction its posterior is defined against. Flux-schnell, without a guidance
    embedding, runs the same branches without it.
    """

    # The parent's, and the pooled embeddings its call keeps to itself: with negative concepts both are the batched
    # conditioning [unconditional, prompt, concepts...] (what dng.pipelines.calibrate_pipeline's verdict reads).
    _callback_tensor_inputs = [*FluxPipeline._callback_tensor_inputs, "pooled_prompt_embeds", *DNG_TENSOR_INPUTS]
    _dng_conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    _dng_output = FluxDNGPipelineOutput
    _dng_unsupported = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                        "negative_ip_adapter_image_embeds")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - the parent's default
        max_sequence_length: int = 512,
        *,
        negative_concepts: list[str | list[str]] | None = None,
        negative_guidance: str | None = None,
        dng=None,
        return_trace: bool = False,
        **kwargs,
    ):
        r"""
        The parent's call, with negative concepts applied by a guidance rule of their own.

        Every argument of [`~diffusers.FluxPipeline.__call__`] is accepted, in the same order; the keyword-only ones
        and `negative_prompt_embeds` and `callback_on_step_end` mean what they mean in
        [`StableDiffusionDNGPipeline.__call__`]. These mean more:

        Args:
            negative_prompt (`str` or `list[str]`, *optional*):
                One negative concept (one string, or one per prompt). In the parent it is true CFG's other branch; here
                it is a branch of its own, and the empty prompt's branch is the reference DNG pushes against.
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                T5's text of `negative_prompt` (default: `negative_prompt`).
            true_cfg_scale (`float`, *optional*, defaults to 1.0):
                The base's classifier-free guidance scale against the empty prompt's branch, which the call evaluates
                anyway: at 1 the base is the prompt's branch, the parent's prediction without true CFG.
                `negative_guidance="np"` at `true_cfg_scale > 1` is the parent's true CFG with the negative prompt.
            guidance_scale (`float`, *optional*, defaults to 3.5):
                Flux-dev's distilled guidance, embedded in every branch; Flux-schnell has no guidance embedding and
                ignores it, as in the parent.

        A DNG call samples with the stochastic sibling of the folder's `FlowMatchEulerDiscreteScheduler`,
        `LTXEulerAncestralRFScheduler(eta=1)` (Euler ancestral for rectified flow, its noise drawn from `generator`) on
        the shifted sigmas the folder's scheduler would walk; `pipe.scheduler` is left as it is. Assign a stochastic
        scheduler to it (e.g. `FlowMatchEulerDiscreteScheduler` with `stochastic_sampling=True`) to sample with that
        instead.
        Each step costs 2 + (number of concepts) transformer passes, batched in one call.

        Examples:

        Returns:
            [`FluxDNGPipelineOutput`] or `tuple`: the parent's output plus `trace`; as a tuple `(images,)`, with the
            trace appended when `return_trace`.
        """
        return self._dng_call(locals())

    def _dng_cfg_scale(self, args: dict) -> float:
        """`true_cfg_scale` where it turns CFG on (> 1), else 1: the prompt's branch at the distilled guidance."""
        for name in ("guidance_scale", "true_cfg_scale"):
            if not math.isfinite(float(args[name])):
                raise ConfigError(f"{name} must be a finite number, got {args[name]}")
        return float(args["true_cfg_scale"]) if args["true_cfg_scale"] > 1 else 1.0

    def _dng_prepare(self, args: dict) -> dict:
        self._current_timestep = None  # the parent's current_timestep property reads it
        return super()._dng_prepare(args)

    def _dng_size_multiple(self) -> int:
        # The VAE's factor, times 2 for the 2x2 patches the latents are packed in.
        return self.vae_scale_factor * 2

    def _dng_latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        # The transformer's channels are the packed ones: four latent channels per 2x2 patch.
        return self.transformer.config.in_channels // 4, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _dng_pack(self, latents):
        return self._pack_latents(latents, *latents.shape)

    def _dng_unpack(self, latents, height: int, width: int):
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)

    def _dng_schedule(self, args: dict, noise) -> dict:
        """Sigmas from 1 to 1/steps unless given, and the resolution's shift mu, as the parent sets them."""
        steps, config = args["num_inference_steps"], self.scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps) if args["sigmas"] is None else args["sigmas"]
        mu = calculate_shift(noise.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return {"mu": mu} if config.get("use_flow_sigmas") else {"sigmas": sigmas, "mu": mu}

    def _dng_encode(self, args: dict, setup) -> dict:
        texts = list(zip(setup.concepts, other_encoder_texts(args, setup, "negative_prompt_2"), strict=True))
        positive, pooled, text_ids = self.encode_prompt(
            args["prompt"], args["prompt_2"], prompt_embeds=args["prompt_embeds"],
            pooled_prompt_embeds=args["pooled_prompt_embeds"], **setup.encode)
        # The unconditional branch: the empty prompt, encoded as the parent encodes true CFG's negative prompt.
        branches = [self.encode_prompt([""] * setup.batch_size, **setup.encode), (positive, pooled)]
        branches += [self.encode_prompt(*two, **setup.encode) for two in texts]
        if args["negative_prompt_embeds"] is not None:
            branches.append(self.encode_prompt(None, prompt_embeds=args["negative_prompt_embeds"],
                                               pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
                                               **setup.encode))
        cond = {"prompt_embeds": torch.cat([b[0] for b in branches]),
                "pooled_prompt_embeds": torch.cat([b[1] for b in branches])}
        # What every branch and step shares: the text tokens' and latent patches' positions, the distilled guidance.
        device, dtype = positive.device, positive.dtype
        size = [v // (self.vae_scale_factor * 2) for v in (args["height"], args["width"])]
        self._dng_guidance = args["guidance_scale"] if self.transformer.config.guidance_embeds else None
        self._dng_shared = dict(txt_ids=text_ids, img_ids=self._prepare_latent_image_ids(None, *size, device, dtype))
        return cond

    def _dng_denoise(self, x, t, cond: dict, args: dict):
        self._current_timestep = t
        # One row of distilled guidance per row of x: every branch's, or the verdict's fewer.
        guidance = None if self._dng_guidance is None else torch.full([x.shape[0]], self._dng_guidance,
                                                                      device=x.device, dtype=torch.float32)
        # A cache hook keys its state by the call's context, as in the parent's calls.
        with self.transformer.cache_context("branches"):
            return self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
                                    encoder_hidden_states=cond["prompt_embeds"],
                                    pooled_projections=cond["pooled_prompt_embeds"],
                                    joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
                                    guidance=guidance, **self._dng_shared)[0]

    def _dng_decode(self, latents, args: dict) -> dict:
        self._current_timestep = None
        return super()._dng_decode(latents, args)
