"""Stable Diffusion 1.x / 2.x with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import replace_example_docstring

from dng.errors import ConfigError
from dng.pipelines import common
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import StableDiffusionDNGPipeline
        >>> from dng.schedulers import stochastic

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.float16 if device == "cuda" else torch.float32
        >>> pipe = StableDiffusionDNGPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=dtype
        ... ).to(device)
        >>> # DNG reads its evidence from the noise of each step: PNDM adds none, its stochastic sibling does.
        >>> pipe.scheduler = stochastic(pipe.scheduler)

        >>> out = pipe("a city street at night, photo", negative_concepts=["cars", "people"],
        ...            num_inference_steps=30, generator=torch.Generator(device).manual_seed(0), return_trace=True)
        >>> out.images[0].save("street.png")
        >>> final_p = out.trace.p[-1]  # p_t(concept | x) at the last step, [images, concepts]
        ```
"""


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
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
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
        r"""
        The parent's call, with negative concepts applied by a guidance rule of their own.

        Every argument of [`~diffusers.StableDiffusionPipeline.__call__`] is accepted, in the same order; these mean
        more, or are new (keyword-only):

        Args:
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance scale `w`, as in the parent: CFG is on for `w > 1`; for `w <= 1` the prompt's
                branch alone is the base. The negative concepts' term is added on top, against the unconditional
                branch, in either case.
            negative_prompt (`str` or `list[str]`, *optional*):
                One negative concept (one string, or one per prompt), applied by `negative_guidance`. Unlike the
                parent, it does not replace the unconditional branch, which stays the empty prompt.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                One negative concept as text embeddings, one row per prompt.
            callback_on_step_end (`Callable`, *optional*):
                As in the parent; it may also ask for `"dng_p"` and `"dng_scale"` (`[images, concepts]`), and its
                `"prompt_embeds"` is the batched conditioning `[unconditional, prompt, concepts...]`. Setting
                `pipe._interrupt = True` in it stops the loop after that step, as in the parent.
            negative_concepts (`list[str | list[str]]`, *optional*):
                Several negative concepts, each a string or one string per prompt, each with its own posterior.
            negative_guidance (`str` or `dng.guidance.Guidance`, *optional*, defaults to `"dng"`):
                `"dng"`, `"np"` (constant scale `guidance_scale - 1`, which is diffusers' negative prompt; 0 without
                CFG, where the parent ignores its negative prompt), `"sld"` (the medium preset) or a rule object.
            dng_preset (`str`, *optional*, defaults to `"default"`):
                The named setting of `dng.guidance.DNG_PRESETS` that DNG starts from.
            dng_scale, dng_prior, dng_temperature, dng_offset, dng_p_min, dng_p_max (`float`, *optional*):
                Override the preset's lam0, prior (one value or one per concept), temperature, offset and posterior
                clamp where given.
            dng_mode (`str`, *optional*, defaults to `"independent"`):
                How several concepts combine: `"independent"` (free text) or `"exclusive"` (classes).
            dng_stochastic (`bool`, *optional*, defaults to `False`):
                Replace a scheduler DNG cannot track by its stochastic sibling (`dng.schedulers.stochastic`), with a
                warning.
            return_trace (`bool`, *optional*, defaults to `False`):
                Add `trace` (`dng.sampler.Trace`: per step, image and concept, `p`, the applied `scale`, `llr`).

        Examples:

        Returns:
            [`StableDiffusionDNGPipelineOutput`] or `tuple`: the parent's output plus `trace`; as a tuple
            `(images, nsfw_content_detected)`, with the trace appended when `return_trace`.
        """
        # 0. Without a negative concept the call is the parent's own.
        if negative_concepts is None and negative_prompt is None and negative_prompt_embeds is None:
            if return_trace:
                raise ConfigError("return_trace needs a negative concept (negative_prompt or negative_concepts)")
            return super().__call__(
                prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
            )

        # 1. Default height and width to the UNet's, as the parent does.
        if not height or not width:
            size = self.unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else size
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor

        # 2. Check every input before any model runs; build the guidance rule.
        setup = common.set_up(
            self, lambda tensor_inputs: self.check_inputs(
                prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                ip_adapter_image, ip_adapter_image_embeds, tensor_inputs),
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
            unsupported=dict(timesteps=timesteps, sigmas=sigmas, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds, guidance_rescale=guidance_rescale,
                             **kwargs),
        )

        # 3. Encode the prompt, the empty prompt (the unconditional branch) and every negative concept.
        # do_classifier_free_guidance=True with no negative prompt encodes the empty prompt, as the parent does.
        positive, uncond = self.encode_prompt(prompt, do_classifier_free_guidance=True, prompt_embeds=prompt_embeds,
                                              **setup.encode)
        concepts = [self.encode_prompt(texts, do_classifier_free_guidance=False, **setup.encode)[0]
                    for texts in setup.concepts]
        if negative_prompt_embeds is not None:
            concepts.append(self.encode_prompt(None, do_classifier_free_guidance=False,
                                               prompt_embeds=negative_prompt_embeds, **setup.encode)[0])
        cond = {"prompt_embeds": torch.cat([uncond, positive, *concepts])}

        # 4. Draw the initial noise as the parent's prepare_latents does.
        device = setup.encode["device"]
        noise = common.initial_noise(self, setup.batch_size * num_images_per_prompt, height, width, positive.dtype,
                                     device, generator, latents)

        # 5. Denoising loop: every branch in one batched UNet call per step, the posterior update after each step.
        def unet(x, t):
            return self.unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                             cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

        result = common.run(self, unet, cond, setup.guidance, noise, num_inference_steps=num_inference_steps,
                            num_negatives=len(concepts), eta=eta, generator=generator,
                            callback_on_step_end=callback_on_step_end, tensor_inputs=setup.tensor_inputs,
                            return_trace=return_trace)

        # 6. Decode, run the safety checker and postprocess, as the parent does.
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
