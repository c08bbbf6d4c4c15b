"""Stable Diffusion 1.x / 2.x with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from dng.errors import ConfigError
from dng.pipelines import common
from dng.sampler import Trace


@dataclass
class StableDiffusionDNGPipelineOutput(StableDiffusionPipelineOutput):
    """The parent's output plus `trace` (per step and image: p and the applied scale of each negative)."""

    trace: Trace | None = None


class StableDiffusionDNGPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    The unconditional branch is always the empty prompt; each negative concept is a branch of its own,
    and all branches run through the UNet in one batched call per step. Without any negative concept the
    call is exactly the parent's.
    """

    # "prompt_embeds" is the batched conditioning [unconditional, positive, negatives...] of every branch.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "dng_p", "dng_scale"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
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
        """The parent's call; `negative_prompt` is one concept, `negative_concepts` several, each tracked on its own.

        `negative_guidance` is "dng", "np" (constant scale guidance_scale - 1, which is diffusers' negative prompt),
        "sld" (the medium preset) or a `dng.guidance.Guidance`. DNG is `DynamicNegativeGuidance.preset(dng_preset)`;
        the other `dng_*` set its lam0, prior, temperature, offset and posterior clamp where given, and the
        combination mode ("independent" or "exclusive"). `dng_stochastic=True` replaces a scheduler DNG cannot track
        by its stochastic sibling (`dng.schedulers.stochastic`, with a warning). `return_trace=True` adds `trace`.
        """
        if negative_concepts is None and negative_prompt is None and negative_prompt_embeds is None:
            if return_trace:
                raise ConfigError("return_trace needs a negative concept (negative_prompt or negative_concepts)")
            return super().__call__(
                prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale, None,
                num_images_per_prompt, eta, generator, latents, prompt_embeds, None, ip_adapter_image,
                ip_adapter_image_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale, clip_skip,
                callback_on_step_end, callback_on_step_end_tensor_inputs, **kwargs,
            )
        if not height or not width:
            size = self.unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else size
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs)
        if negative_prompt_embeds is not None and negative_concepts is not None:
            raise ConfigError("give negative_prompt_embeds (one concept) or negative_concepts, not both")
        guidance = common.make_guidance(negative_guidance, guidance_scale, dng_preset, scale=dng_scale,
                                        prior=dng_prior, temperature=dng_temperature, offset=dng_offset,
                                        p_min=dng_p_min, p_max=dng_p_max, mode=dng_mode)
        common.check_pipeline(self, guidance, eta, dng_stochastic, timesteps=timesteps, sigmas=sigmas,
                              ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                              guidance_rescale=guidance_rescale, **kwargs)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, 0.0, clip_skip
        self._cross_attention_kwargs, self._interrupt = cross_attention_kwargs, False

        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(prompt_embeds)
        concept_texts = common.concept_prompts(negative_prompt, negative_concepts, batch_size)
        device = self._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        encode = dict(device=device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale,
                      clip_skip=clip_skip)
        # do_classifier_free_guidance=True with no negative prompt encodes the empty prompt, as the parent does.
        positive, uncond = self.encode_prompt(prompt, do_classifier_free_guidance=True, prompt_embeds=prompt_embeds,
                                              **encode)
        concepts = [self.encode_prompt(texts, do_classifier_free_guidance=False, **encode)[0]
                    for texts in concept_texts]
        if negative_prompt_embeds is not None:
            if len(negative_prompt_embeds) != batch_size:
                raise ConfigError(f"negative_prompt_embeds has {len(negative_prompt_embeds)} rows for {batch_size} "
                                  f"prompts; give one per prompt")
            concepts.append(self.encode_prompt(None, do_classifier_free_guidance=False,
                                               prompt_embeds=negative_prompt_embeds, **encode)[0])
        cond = {"prompt_embeds": torch.cat([uncond, positive, *concepts])}
        noise = common.initial_noise(self, batch_size * num_images_per_prompt, height, width, positive.dtype, device,
                                     generator, latents)

        def unet(x, t):
            return self.unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                             cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

        result = common.run(self, unet, cond, guidance, noise, num_inference_steps=num_inference_steps,
                            num_negatives=len(concepts), guidance_scale=guidance_scale, eta=eta, generator=generator,
                            callback_on_step_end=callback_on_step_end,
                            tensor_inputs=callback_on_step_end_tensor_inputs, return_trace=return_trace)

        if output_type == "latent":
            image, nsfw = result.samples, None
        else:
            image = self.vae.decode(result.samples / self.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image, nsfw = self.run_safety_checker(image, device, positive.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, nsfw, result.trace) if return_trace else (image, nsfw)
        return StableDiffusionDNGPipelineOutput(images=image, nsfw_content_detected=nsfw, trace=result.trace)
