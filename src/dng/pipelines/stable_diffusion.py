"""Stable Diffusion 1.x / 2.x with Dynamic Negative Guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import replace_example_docstring

from dng.pipelines.common import DNG_TENSOR_INPUTS, UNetDNGPipelineMixin
from dng.sampler import Trace

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dng.pipelines import StableDiffusionDNGPipeline

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.float16 if device == "cuda" else torch.float32
        >>> pipe = StableDiffusionDNGPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=dtype
        ... ).to(device)

        >>> # DNG reads its evidence from the noise of each step: PNDM adds none, so DNG samples with Euler ancestral.
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


class StableDiffusionDNGPipeline(UNetDNGPipelineMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline whose negative prompts are applied by DNG (or NP / SLD), several at once.

    The unconditional branch is always the empty prompt; each negative concept is a branch of its own,
    and all branches run through the UNet in one batched call per step. Without any negative concept the
    call is exactly the parent's.
    """

    _callback_tensor_inputs = [*StableDiffusionPipeline._callback_tensor_inputs, *DNG_TENSOR_INPUTS]
    # With negative concepts "prompt_embeds" is the batched conditioning [unconditional, prompt, concepts...].
    _dng_conditioning = ("prompt_embeds",)
    _dng_output = StableDiffusionDNGPipelineOutput
    _dng_unsupported = ("timesteps", "sigmas", "ip_adapter_image", "ip_adapter_image_embeds", "guidance_rescale")

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
        negative_guidance: str | None = None,
        dng=None,
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
                One negative concept (one string, or one per prompt). Unlike the parent, it does not replace the
                unconditional branch, which stays the empty prompt.
            eta (`float`, *optional*, defaults to 0.0):
                As in the parent. DNG reads its posterior from the noise each step adds: on a scheduler that adds
                none, a DNG call samples with its stochastic sibling (`dng.schedulers.stochastic`, built from the
                same config; `pipe.scheduler` is left as it is), and on DDIM / TCD at eta 0 with eta 1 / gamma 0.3.
                It is said once per pipeline in a log warning.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                One negative concept as text embeddings, one row per prompt.
            callback_on_step_end (`Callable`, *optional*):
                As in the parent: it returns a dict of the tensors it replaces. It may also ask for `"dng_p"` (DNG's
                posterior) and `"dng_applied_scale"` (`lam0 p/(1-p)`), both `[images, concepts]`; its
                `"prompt_embeds"` is the batched conditioning `[unconditional, prompt, concepts...]`. Setting
                `pipe._interrupt = True` in it stops the loop after that step, as in the parent.
            negative_concepts (`list[str | list[str]]`, *optional*):
                Several negative concepts, each a string or one string per prompt, each with its own posterior.
            negative_guidance (`str`, *optional*, defaults to `"dng"`):
                `"dng"`, `"np"` (constant scale `guidance_scale - 1`, which is diffusers' negative prompt; 0 without
                CFG, where the parent ignores its negative prompt) or `"sld"` (the medium preset).
            dng (*optional*):
                DNG's settings: a preset name of `dng.config.PRESETS` (`"default"`, `"paper-sd"`, ...), a
                `dng.config.DNGConfig`, a dict of settings over the default preset (`{"lam0": 2}`), a
                `dng.calibration.ModelCalibration` or the path of a calibration file written by `dng calibrate`
                (`str` or `os.PathLike`; applied to the default preset; a concept's name is its text).
                Or a `dng.guidance.Guidance` rule object, which is then the call's rule whatever its method.
            return_trace (`bool`, *optional*, defaults to `False`):
                Add `trace` (`dng.sampler.Trace`: per step, image and concept, `p`, the applied `scale`, `llr`).

        Examples:

        Returns:
            [`StableDiffusionDNGPipelineOutput`] or `tuple`: the parent's output plus `trace`; as a tuple
            `(images, nsfw_content_detected)`, with the trace appended when `return_trace`.
        """
        return self._dng_call(locals())

    def _dng_encode(self, args: dict, setup) -> dict:
        # do_classifier_free_guidance=True with no negative prompt encodes the empty prompt, as the parent does.
        positive, uncond = self.encode_prompt(args["prompt"], do_classifier_free_guidance=True,
                                              prompt_embeds=args["prompt_embeds"], **setup.encode)
        concepts = [self.encode_prompt(texts, do_classifier_free_guidance=False, **setup.encode)[0]
                    for texts in setup.concepts]
        if args["negative_prompt_embeds"] is not None:
            concepts.append(self.encode_prompt(None, do_classifier_free_guidance=False,
                                               prompt_embeds=args["negative_prompt_embeds"], **setup.encode)[0])
        return {"prompt_embeds": torch.cat([uncond, positive, *concepts])}

    def _dng_denoise(self, x, t, cond: dict, args: dict):
        return self.unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                         cross_attention_kwargs=args["cross_attention_kwargs"], return_dict=False)[0]

    def _dng_decode(self, latents, args: dict) -> dict:
        """Decode, run the safety checker and postprocess, as the parent does."""
        output_type = args["output_type"]
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                    generator=args["generator"])[0]
            image, nsfw = self.run_safety_checker(image, self._execution_device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        return {"images": image, "nsfw_content_detected": nsfw}
