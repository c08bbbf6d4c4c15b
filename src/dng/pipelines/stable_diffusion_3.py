"""Stable Diffusion 3 / 3.5 with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils import replace_example_docstring

from dng.pipelines.common import DNG_TENSOR_INPUTS, other_encoder_texts
from dng.pipelines.flow import FlowDNGPipelineMixin
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import StableDiffusion3DNGPipeline

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.bfloat16 if device == "cuda" else torch.float32
        >>> pipe = StableDiffusion3DNGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium", dtype=dtype
        ... ).to(device)

        >>> # SD3's Euler adds no noise: DNG samples with its stochastic sibling (LTX's Euler ancestral).
        >>> out = pipe("a mountain lake at dawn, photo", negative_concepts=["boats", "people"],
        ...            num_inference_steps=28, generator=torch.Generator(device).manual_seed(0), return_trace=True)
        >>> out.images[0].save("lake.png")
        >>> final_p = out.trace.p[-1]  # p_t(concept | x) at the last step, [images, concepts]
        ```
"""


@dataclass
class StableDiffusion3DNGPipelineOutput(StableDiffusion3PipelineOutput):
    """The parent's output plus `trace` (per step and image: p and the applied scale of each negative)."""

    trace: Trace | None = None


class StableDiffusion3DNGPipeline(FlowDNGPipelineMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    The base is classifier-free guidance with the empty prompt as the unconditional branch, encoded as the parent
    encodes it; each negative concept is a branch of its own, and all branches run through the transformer in one
    batched call per step.
    """

    _callback_tensor_inputs = [*StableDiffusion3Pipeline._callback_tensor_inputs, *DNG_TENSOR_INPUTS]
    # With negative concepts each is the batched conditioning [unconditional, prompt, concepts...].
    _dng_conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    _dng_output = StableDiffusion3DNGPipelineOutput
    _dng_unsupported = ("ip_adapter_image", "ip_adapter_image_embeds", "skip_guidance_layers")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - the parent's default
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        negative_concepts: list[str | list[str]] | None = None,
        negative_guidance: str | None = None,
        dng=None,
        return_trace: bool = False,
        **kwargs,
    ):
        r"""
        The parent's call, with negative concepts applied by a guidance rule of their own.

        Every argument of [`~diffusers.StableDiffusion3Pipeline.__call__`] is accepted, in the same order; the
        keyword-only ones and `guidance_scale`, `negative_prompt`, `negative_prompt_embeds` and
        `callback_on_step_end` mean what they mean in [`StableDiffusionDNGPipeline.__call__`]. Besides:

        Args:
            negative_prompt_2, negative_prompt_3 (`str` or `list[str]`, *optional*):
                The second and third text encoders' texts of `negative_prompt` (default: `negative_prompt`).
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                The pooled embeddings that go with `negative_prompt_embeds`.
            callback_on_step_end (`Callable`, *optional*):
                Its `"prompt_embeds"` and `"pooled_prompt_embeds"` are the batched conditioning `[unconditional,
                prompt, concepts...]`.

        A DNG call samples with the stochastic sibling of the folder's `FlowMatchEulerDiscreteScheduler`,
        `LTXEulerAncestralRFScheduler(eta=1)` (Euler ancestral for rectified flow, its noise drawn from `generator`) on
        the shifted sigmas the folder's scheduler would walk; `pipe.scheduler` is left as it is. Assign a stochastic
        scheduler to it (e.g. `FlowMatchEulerDiscreteScheduler` with `stochastic_sampling=True`) to sample with that
        instead.

        Examples:

        Returns:
            [`StableDiffusion3DNGPipelineOutput`] or `tuple`: the parent's output plus `trace`; as a tuple `(images,)`,
            with the trace appended when `return_trace`.
        """
        return self._dng_call(locals())

    def _dng_prepare(self, args: dict) -> dict:
        shared = super()._dng_prepare(args)
        self._clip_skip, self._skip_layer_guidance_scale = args["clip_skip"], args["skip_layer_guidance_scale"]
        return dict(shared, clip_skip=args["clip_skip"])

    def _dng_size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def _dng_latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _dng_schedule(self, args: dict, noise) -> dict:
        """The call's sigmas, and mu where the schedule shifts with the resolution, as the parent sets them."""
        schedule = {} if args["sigmas"] is None else {"sigmas": args["sigmas"]}
        mu, config = args["mu"], self.scheduler.config
        if mu is None and config.get("use_dynamic_shifting"):
            patch = self.transformer.config.patch_size
            mu = calculate_shift((noise.shape[2] // patch) * (noise.shape[3] // patch),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return schedule if mu is None else {**schedule, "mu": mu}

    def _dng_encode(self, args: dict, setup) -> dict:
        texts = list(zip(setup.concepts, other_encoder_texts(args, setup, "negative_prompt_2"),
                         other_encoder_texts(args, setup, "negative_prompt_3"), strict=True))
        # do_classifier_free_guidance=True with no negative prompt encodes the parent's unconditional branch.
        positive, uncond, pooled, uncond_pooled = self.encode_prompt(
            args["prompt"], args["prompt_2"], args["prompt_3"], do_classifier_free_guidance=True,
            prompt_embeds=args["prompt_embeds"], pooled_prompt_embeds=args["pooled_prompt_embeds"], **setup.encode)
        # Each concept is encoded as the parent encodes a negative prompt: without clip_skip.
        concept_encode = {**setup.encode, "clip_skip": None}
        encoded = [self.encode_prompt(*three, do_classifier_free_guidance=False, **concept_encode) for three in texts]
        if args["negative_prompt_embeds"] is not None:
            encoded.append(self.encode_prompt(None, None, None, do_classifier_free_guidance=False,
                                              prompt_embeds=args["negative_prompt_embeds"],
                                              pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
                                              **concept_encode))
        return {"prompt_embeds": torch.cat([uncond, positive, *(e[0] for e in encoded)]),
                "pooled_prompt_embeds": torch.cat([uncond_pooled, pooled, *(e[2] for e in encoded)])}

    def _dng_denoise(self, x, t, cond: dict, args: dict):
        return self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                                encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"],
                                joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False)[0]
