"""Stable Diffusion XL with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device

from dng.pipelines.common import DNG_TENSOR_INPUTS, UNetDNGPipelineMixin, other_encoder_texts
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import StableDiffusionXLDNGPipeline

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.float16 if device == "cuda" else torch.float32
        >>> pipe = StableDiffusionXLDNGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", dtype=dtype
        ... ).to(device)

        >>> # SDXL ships Euler, which adds no noise: DNG tracks its posterior through Euler ancestral.
        >>> out = pipe("a quiet beach at sunset, photo", negative_prompt="people", num_inference_steps=30,
        ...            generator=torch.Generator(device).manual_seed(0), return_trace=True)
        >>> out.images[0].save("beach.png")
        >>> activated = out.trace.p.amax(0) >= 0.5  # did the image head for people? [images, concepts]
        ```
"""


@dataclass
class StableDiffusionXLDNGPipelineOutput(StableDiffusionXLPipelineOutput):
    """The parent's output plus `trace` (per step and image: p and the applied scale of each negative)."""

    trace: Trace | None = None


class StableDiffusionXLDNGPipeline(UNetDNGPipelineMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    As in the parent, the unconditional branch is the empty prompt (zeros with force_zeros_for_empty_prompt);
    each negative concept is a branch of its own, with the unconditional branch's micro-conditioning.
    """

    _callback_tensor_inputs = [*StableDiffusionXLPipeline._callback_tensor_inputs, *DNG_TENSOR_INPUTS]
    # With negative concepts each is the batched conditioning [unconditional, prompt, concepts...].
    _dng_conditioning = ("prompt_embeds", "add_text_embeds", "add_time_ids")
    _dng_output = StableDiffusionXLDNGPipelineOutput
    _dng_unsupported = ("timesteps", "sigmas", "denoising_end", "ip_adapter_image", "ip_adapter_image_embeds",
                        "guidance_rescale")

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - the parent's default
        *,
        negative_concepts: list[str | list[str]] | None = None,
        negative_guidance: str | None = None,
        dng=None,
        return_trace: bool = False,
        **kwargs,
    ):
        r"""
        The parent's call, with negative concepts applied by a guidance rule of their own.

        Every argument of [`~diffusers.StableDiffusionXLPipeline.__call__`] is accepted, in the same order; the
        keyword-only ones and `guidance_scale`, `negative_prompt`, `eta`, `negative_prompt_embeds` and
        `callback_on_step_end` mean what they mean in [`StableDiffusionDNGPipeline.__call__`]. Besides:

        Args:
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                The second text encoder's text of `negative_prompt` (defaults to `negative_prompt`).
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                The pooled embeddings that go with `negative_prompt_embeds`.
            negative_original_size, negative_crops_coords_top_left, negative_target_size (*optional*):
                Micro-conditioning of the unconditional branch, which every negative concept's branch shares.

        Examples:

        Returns:
            [`StableDiffusionXLDNGPipelineOutput`] or `tuple`: the parent's output plus `trace`; as a tuple
            `(images,)`, with the trace appended when `return_trace`.
        """
        return self._dng_call(locals())

    def _dng_encode(self, args: dict, setup) -> dict:
        self._denoising_end = None  # the parent's denoising_end property reads it
        second = other_encoder_texts(args, setup, "negative_prompt_2")

        # do_classifier_free_guidance=True with no negative prompt gives the parent's unconditional branch.
        positive, uncond, pooled, uncond_pooled = self.encode_prompt(
            args["prompt"], args["prompt_2"], do_classifier_free_guidance=True, prompt_embeds=args["prompt_embeds"],
            pooled_prompt_embeds=args["pooled_prompt_embeds"], **setup.encode)
        encoded = [self.encode_prompt(texts, texts_2, do_classifier_free_guidance=False, **setup.encode)
                   for texts, texts_2 in zip(setup.concepts, second, strict=True)]
        if args["negative_prompt_embeds"] is not None:
            encoded.append(self.encode_prompt(None, do_classifier_free_guidance=False,
                                              prompt_embeds=args["negative_prompt_embeds"],
                                              pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
                                              **setup.encode))

        # Micro-conditioning: the prompt's branch gets the call's sizes, the others the unconditional ones.
        device, images = setup.encode["device"], setup.batch_size * args["num_images_per_prompt"]
        projection_dim = (int(pooled.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        size = (args["height"], args["width"])

        def time_ids(original_size, crops_coords_top_left, target_size):
            return self._get_add_time_ids(original_size, crops_coords_top_left, target_size, positive.dtype,
                                          projection_dim).to(device).repeat(images, 1)

        prompt_ids = time_ids(args["original_size"] or size, args["crops_coords_top_left"], args["target_size"] or size)
        uncond_ids = prompt_ids
        if args["negative_original_size"] is not None and args["negative_target_size"] is not None:
            uncond_ids = time_ids(args["negative_original_size"], args["negative_crops_coords_top_left"],
                                  args["negative_target_size"])
        return {
            "prompt_embeds": torch.cat([uncond, positive, *(e[0] for e in encoded)]).to(device),
            "add_text_embeds": torch.cat([uncond_pooled, pooled, *(e[2] for e in encoded)]).to(device),
            "add_time_ids": torch.cat([uncond_ids, prompt_ids] + [uncond_ids] * len(encoded)),
        }

    def _dng_denoise(self, x, t, cond: dict, args: dict):
        added = {"text_embeds": cond["add_text_embeds"], "time_ids": cond["add_time_ids"]}
        return self.unet(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                         cross_attention_kwargs=args["cross_attention_kwargs"], return_dict=False)[0]

    def _dng_decode(self, latents, args: dict) -> dict:
        """Latents to images as the parent does: fp16 VAEs upcast, latent mean/std, watermark."""
        output_type = args["output_type"]
        if output_type == "latent":
            return {"images": latents}
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (mean, std))
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return {"images": self.image_processor.postprocess(image, output_type=output_type)}
