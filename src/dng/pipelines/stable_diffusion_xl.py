"""Stable Diffusion XL with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device

from dng.errors import ConfigError
from dng.pipelines import common
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import StableDiffusionXLDNGPipeline
        >>> from dng.schedulers import stochastic

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.float16 if device == "cuda" else torch.float32
        >>> pipe = StableDiffusionXLDNGPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", dtype=dtype
        ... ).to(device)
        >>> # SDXL ships Euler, which adds no noise: DNG tracks its posterior through Euler ancestral.
        >>> pipe.scheduler = stochastic(pipe.scheduler)

        >>> out = pipe("a city street at night, photo", negative_concepts=["cars", "people"],
        ...            num_inference_steps=30, generator=torch.Generator(device).manual_seed(0), return_trace=True)
        >>> out.images[0].save("street.png")
        >>> final_p = out.trace.p[-1]  # p_t(concept | x) at the last step, [images, concepts]
        ```
"""


@dataclass
class StableDiffusionXLDNGPipelineOutput(StableDiffusionXLPipelineOutput):
    """The parent's output plus `trace` (per step and image: p and the applied scale of each negative)."""

    trace: Trace | None = None


class StableDiffusionXLDNGPipeline(StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    As in the parent, the unconditional branch is the empty prompt (zeros with force_zeros_for_empty_prompt);
    each negative concept is a branch of its own, with the unconditional branch's micro-conditioning.
    """

    # The batched conditioning of every branch [unconditional, positive, negatives...].
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "dng_p", "dng_scale"]

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
        negative_guidance="dng",
        dng_preset: str = "default",
        dng_scale: float | None = None,
        dng_prior: float | list[float] | None = None,
        dng_temperature: float | None = None,
        dng_offset: float | None = None,
        dng_p_min: float | None = None,
        dng_p_max: float | None = None,
        dng_mode: str = "independent",
        dng_stochastic: bool = False,
        return_trace: bool = False,
        **kwargs,
    ):
        r"""
        The parent's call, with negative concepts applied by a guidance rule of their own.

        Every argument of [`~diffusers.StableDiffusionXLPipeline.__call__`] is accepted, in the same order; the
        keyword-only ones and `guidance_scale`, `negative_prompt`, `negative_prompt_embeds` and `callback_on_step_end`
        mean what they mean in [`StableDiffusionDNGPipeline.__call__`]. Besides:

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
        # 0. Without a negative concept the call is the parent's own.
        if negative_concepts is None and negative_prompt is None and negative_prompt_embeds is None:
            if return_trace:
                raise ConfigError("return_trace needs a negative concept (negative_prompt or negative_concepts)")
            return super().__call__(
                prompt=prompt, prompt_2=prompt_2, height=height, width=width,
                num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                denoising_end=denoising_end, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, num_images_per_prompt=num_images_per_prompt, eta=eta,
                generator=generator, latents=latents, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds, output_type=output_type, return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale,
                original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                negative_original_size=negative_original_size,
                negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size, clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
            )

        # 1. Default height and width to the UNet's, as the parent does.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 2. Check every input before any model runs; build the guidance rule.
        if negative_prompt_2 is not None and negative_prompt is None:
            raise ConfigError("negative_prompt_2 is the second encoder's text of negative_prompt; give both")
        setup = common.set_up(
            self, lambda tensor_inputs: self.check_inputs(
                prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
                ip_adapter_image_embeds, tensor_inputs),
            prompt=prompt, prompt_embeds=prompt_embeds, height=height, width=width, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, negative_concepts=negative_concepts,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt, eta=eta,
            cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            negative_guidance=negative_guidance, dng_preset=dng_preset,
            dng=dict(scale=dng_scale, prior=dng_prior, temperature=dng_temperature, offset=dng_offset,
                     p_min=dng_p_min, p_max=dng_p_max, mode=dng_mode),
            dng_stochastic=dng_stochastic,
            unsupported=dict(timesteps=timesteps, sigmas=sigmas, denoising_end=denoising_end,
                             ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                             guidance_rescale=guidance_rescale, **kwargs),
        )
        self._denoising_end = None
        images = setup.batch_size * num_images_per_prompt
        second = common.concept_prompts(negative_prompt_2, None, setup.batch_size) or setup.concepts

        # 3. Encode the prompt, the unconditional branch and every negative concept with both text encoders.
        # do_classifier_free_guidance=True with no negative prompt gives the parent's unconditional branch.
        positive, uncond, pooled, uncond_pooled = self.encode_prompt(
            prompt, prompt_2, do_classifier_free_guidance=True, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, **setup.encode)
        encoded = [self.encode_prompt(texts, texts_2, do_classifier_free_guidance=False, **setup.encode)
                   for texts, texts_2 in zip(setup.concepts, second, strict=True)]
        if negative_prompt_embeds is not None:
            encoded.append(self.encode_prompt(None, do_classifier_free_guidance=False,
                                              prompt_embeds=negative_prompt_embeds,
                                              pooled_prompt_embeds=negative_pooled_prompt_embeds, **setup.encode))

        # 4. Micro-conditioning: the prompt's branch gets the call's sizes, the others the unconditional ones.
        device = setup.encode["device"]
        projection_dim = (int(pooled.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size, positive.dtype,
                                          projection_dim).to(device).repeat(images, 1)
        uncond_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            uncond_time_ids = self._get_add_time_ids(negative_original_size, negative_crops_coords_top_left,
                                                     negative_target_size, positive.dtype,
                                                     projection_dim).to(device).repeat(images, 1)
        cond = {
            "prompt_embeds": torch.cat([uncond, positive, *(e[0] for e in encoded)]).to(device),
            "add_text_embeds": torch.cat([uncond_pooled, pooled, *(e[2] for e in encoded)]).to(device),
            "add_time_ids": torch.cat([uncond_time_ids, time_ids] + [uncond_time_ids] * len(encoded)),
        }

        # 5. Draw the initial noise as the parent's prepare_latents does.
        noise = common.initial_noise(self, images, height, width, positive.dtype, device, generator, latents)

        # 6. Denoising loop: every branch in one batched UNet call per step, the posterior update after each step.
        def unet(x, t):
            added = {"text_embeds": cond["add_text_embeds"], "time_ids": cond["add_time_ids"]}
            return self.unet(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                             cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

        result = common.run(self, unet, cond, setup.guidance, noise, num_inference_steps=num_inference_steps,
                            num_negatives=len(encoded), eta=eta, generator=generator,
                            callback_on_step_end=callback_on_step_end, tensor_inputs=setup.tensor_inputs,
                            return_trace=return_trace)

        # 7. Decode and postprocess, as the parent does.
        image = self._decode(result.samples, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, result.trace) if return_trace else (image,)
        return StableDiffusionXLDNGPipelineOutput(images=image, trace=result.trace)

    def _decode(self, latents, output_type: str):
        """Latents to images as the parent does: fp16 VAEs upcast, latent mean/std, watermark."""
        if output_type == "latent":
            return latents
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
        return self.image_processor.postprocess(image, output_type=output_type)
