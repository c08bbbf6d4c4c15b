"""The call every DNG pipeline shares (`DNGPipelineMixin`): checks, the guidance rule, the sampler, the loop."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from dng.calibration import ModelCalibration, load_calibration_file
from dng.config import PRESETS, DNGConfig
from dng.errors import ConfigError
from dng.guidance import DynamicNegativeGuidance, Guidance, NegativePrompt, SafeLatentDiffusion
from dng.sampler import STOP, check_steps, sample
from dng.schedulers import NamedSampler, check_tracked, needs_eta, prefers_sibling, schedule_for, stochastic, tracked

logger = logging.get_logger(__name__)

METHODS = ("dng", "np", "sld")
# The keyword-only arguments a DNG pipeline adds to its parent's call.
DNG_ARGUMENTS = ("negative_concepts", "negative_guidance", "dng", "return_trace")
# What callback_on_step_end may ask for besides the latents and the batched conditioning: the posterior and the
# applied scale lam0 p/(1-p), [images, concepts].
DNG_TENSOR_INPUTS = ("dng_p", "dng_applied_scale")
# DDIM and TCD add noise through the eta of their step: a DNG call that gives eta 0 samples with these instead.
NOISY_ETA = {"DDIMScheduler": (1.0, "eta 1 (DDPM-like)"),
             "TCDScheduler": (0.3, "gamma 0.3, TCD's default (its step takes gamma as eta)")}
# Arguments of the former call -> the DNGConfig setting each became.
RENAMED = {"dng_scale": "lam0", "dng_prior": "prior", "dng_temperature": "temperature", "dng_offset": "offset",
           "dng_p_min": "p_min", "dng_p_max": "p_max", "dng_mode": "mode"}
REMOVED = ("dng_preset", *RENAMED, "dng_stochastic")


@dataclass
class CallSetup:
    """What a checked call hands to its encoding, sampling and decoding."""

    rule: Guidance
    sampler: NamedSampler  # pipe.scheduler, or for DNG its stochastic sibling, and the eta the steps get
    cfg_scale: float  # the base's classifier-free guidance scale; 1 is the prompt's branch alone
    batch_size: int
    concepts: list[list[str]]  # per negative concept given as text: one string per prompt
    num_negatives: int  # the text concepts, and negative_prompt_embeds last when given
    encode: dict  # keyword arguments of encode_prompt that every branch shares
    tensor_inputs: list[str]  # what callback_on_step_end asks for


class DNGPipelineMixin:
    """A diffusers text-to-image pipeline whose negative concepts are branches of their own, guided by DNG, NP or SLD.

    A pipeline lists it (through `UNetDNGPipelineMixin` or `dng.pipelines.flow.FlowDNGPipelineMixin`) before its
    diffusers parent and adds only what is its own: `__call__` with the parent's signature plus `DNG_ARGUMENTS`
    (keyword-only), handing `locals()` to `_dng_call`; `_dng_encode(args, setup)`, the batched conditioning
    {name: tensor} with [unconditional, prompt, concepts...] along the batch axis, of which `_dng_conditioning` names
    what a callback may see; `_dng_denoise(x, t, cond, args)`, one denoiser call on every branch; `_dng_decode(latents,
    args)`, the output's fields; `_dng_output`, the output class (with `trace`); and `_dng_unsupported`, the
    parent's arguments a call with negative concepts refuses when set. Without a negative concept the call is the
    parent's own.

    What differs between denoisers are hooks, which `UNetDNGPipelineMixin` and `FlowDNGPipelineMixin` fill in:
    `_dng_prepare(args)` (the model's own checks, the parent's call state, the encode_prompt arguments every branch
    shares), `_dng_default_size()` and `_dng_size_multiple()` (in pixels), `_dng_latent_shape(height, width)` (one
    image's latents as the parent draws them); and with defaults here, `_dng_pack(latents)` (their layout in the
    denoiser: as drawn), `_dng_schedule(args, noise)` (set_timesteps arguments: none) and `_dng_cfg_scale(args)`
    (the base's CFG scale: guidance_scale).
    """

    _dng_unsupported: tuple[str, ...] = ()

    def _dng_call(self, call_locals: dict):
        """The call, from the `locals()` of the pipeline's `__call__`."""
        args = {name: value for name, value in call_locals.items() if name not in ("self", "kwargs")}
        kwargs = call_locals["kwargs"]
        refuse_removed(kwargs)
        options = {name: args.pop(name) for name in DNG_ARGUMENTS}
        tensor_inputs = args["callback_on_step_end_tensor_inputs"]
        if isinstance(args["callback_on_step_end"], (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = args["callback_on_step_end"].tensor_inputs
        if all(args[name] is None for name in ("negative_prompt", "negative_prompt_embeds")) and \
                options["negative_concepts"] is None:
            refuse_without_concept(options, tensor_inputs)
            return super().__call__(**args, **kwargs)

        setup = self._dng_set_up(args, options, tensor_inputs, kwargs)
        cond = self._dng_encode(args, setup)
        noise = self._dng_noise(args, setup.batch_size, cond["prompt_embeds"].dtype)
        result = self._dng_run(args, setup, cond, noise, options["return_trace"])
        fields = self._dng_decode(result.samples, args)
        self.maybe_free_model_hooks()
        if not args["return_dict"]:
            return (*fields.values(), result.trace) if options["return_trace"] else tuple(fields.values())
        return self._dng_output(**fields, trace=result.trace)

    def _dng_set_up(self, args: dict, options: dict, tensor_inputs: list[str], kwargs: dict) -> CallSetup:
        """Check every input before any model runs, build the rule, choose the sampler, set the parent's call state;
        `kwargs` are the parent's deprecated extra arguments, refused here."""
        cfg_scale = self._dng_cfg_scale(args)
        args["height"], args["width"] = self._dng_size(args["height"], args["width"])
        for name, value in {**{name: args[name] for name in self._dng_unsupported}, **kwargs}.items():
            if value is not None and not (isinstance(value, (int, float)) and value == 0):
                raise ConfigError(f"{name} is not supported together with negative concepts; leave it unset")
        checks = {name: args.get(name) for name in inspect.signature(self.check_inputs).parameters}
        try:
            self.check_inputs(**{**checks, "callback_on_step_end_tensor_inputs": tensor_inputs})
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_steps(args["num_inference_steps"], self.scheduler)

        prompt, embeds = args["prompt"], args["negative_prompt_embeds"]
        if embeds is not None and options["negative_concepts"] is not None:
            raise ConfigError("give negative_prompt_embeds (one concept) or negative_concepts, not both")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(args["prompt_embeds"])
        if embeds is not None and len(embeds) != batch_size:
            raise ConfigError(f"negative_prompt_embeds has {len(embeds)} rows for {batch_size} prompts; give one per "
                              f"prompt")
        concepts = concept_prompts(args["negative_prompt"], options["negative_concepts"], batch_size)
        # A concept's name (what a calibration knows it by) is its text where every image has the same one.
        names = [texts[0] if len(set(texts)) == 1 else None for texts in concepts] + [None] * (embeds is not None)
        dng = options["dng"]
        if is_calibration_file(dng):
            # Checked against this pipeline's model by its folder's name (a mismatch is a logged warning).
            dng = load_calibration_file(dng, {"kind": "diffusers", "path": self.name_or_path,
                                              "weights_sha256": None})[0]
        rule = guidance_rule(options["negative_guidance"], dng, cfg_scale, names)
        rule.check(len(names))
        # The flow-matching pipelines have no eta: their scheduler's step takes none.
        sampler = self.dng_sampler(rule, args.get("eta", 0.0))[0]
        check_tensor_inputs(tensor_inputs, rule, self._dng_conditioning)

        shared = self._dng_prepare(args)
        self._interrupt = False  # the parent's interrupt property reads it
        encode = dict(device=self._execution_device, num_images_per_prompt=args["num_images_per_prompt"], **shared)
        return CallSetup(rule, sampler, cfg_scale, batch_size, concepts, len(names), encode, tensor_inputs)

    def _dng_cfg_scale(self, args: dict) -> float:
        """The base's CFG scale: guidance_scale where it turns CFG on (> 1), else 1, the prompt's branch alone."""
        guidance_scale = args["guidance_scale"]
        if not math.isfinite(float(guidance_scale)):
            raise ConfigError(f"guidance_scale must be a finite number, got {guidance_scale} (at most 1 turns "
                              f"classifier-free guidance off, as in diffusers)")
        return float(guidance_scale) if guidance_scale > 1 else 1.0

    def _dng_schedule(self, args: dict, noise) -> dict:
        """The keyword arguments of scheduler.set_timesteps besides the step count (e.g. sigmas, mu): none."""
        return {}

    def _dng_pack(self, latents):
        """Drawn latents [images, channels, height, width] in the denoiser's layout: as they are."""
        return latents

    def _dng_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Height and width, each defaulting to the model's, checked against `_dng_size_multiple`."""
        height, width = (v or d for v, d in zip((height, width), self._dng_default_size(), strict=True))
        factor = self._dng_size_multiple()
        if min(height, width) <= 0 or height % factor or width % factor:
            fix = " x ".join(str(max(factor, math.ceil(v / factor) * factor)) for v in (height, width))
            raise ConfigError(f"height and width must be positive multiples of {factor}, got {height} x {width}; "
                              f"e.g. {fix}")
        return height, width

    def dng_sampler(self, rule: Guidance, eta: float = 0.0, log: bool = True) -> tuple[NamedSampler, str | None]:
        """The sampler a call with `rule` and `eta` samples with (`sampler_for` pipe.scheduler), and the note that says
        why where it is not pipe.scheduler at `eta`. The note is logged once per pipeline; with `log=False` it is
        only returned, and counts as said (for a caller that reports it itself, as `dng sd` does)."""
        sampler, note = sampler_for(self.scheduler, rule, eta)
        said = getattr(self, "_dng_notes", None)
        if said is None:
            said = self._dng_notes = set()
        if note is not None and note not in said:
            said.add(note)
            if log:
                logger.warning(note)
        return sampler, note

    def _dng_noise(self, args: dict, batch_size: int, dtype):
        """x_T before init_noise_sigma, drawn exactly as the parent's prepare_latents draws it."""
        images = batch_size * args["num_images_per_prompt"]
        shape = (images, *self._dng_latent_shape(int(args["height"]), int(args["width"])))
        generator, latents, device = args["generator"], args["latents"], self._execution_device
        if isinstance(generator, list) and len(generator) != images:
            raise ConfigError(f"{len(generator)} generators given for {images} images; give one per image")
        if latents is not None:
            # Given latents are in the denoiser's layout, as the parent takes them: the layout's shape, with no data.
            expected = tuple(self._dng_pack(torch.empty(shape, device="meta")).shape)
            if tuple(latents.shape) != expected:
                raise ConfigError(f"latents have shape {tuple(latents.shape)}; expected {expected}")
            return latents.to(device=device, dtype=dtype)
        return self._dng_pack(randn_tensor(shape, generator=generator, device=device, dtype=dtype))

    def _dng_run(self, args: dict, setup: CallSetup, cond: dict, noise, return_trace: bool):
        """Sample through dng.sampler.sample; `cond` holds the batched conditioning a callback may replace."""
        callback = args["callback_on_step_end"]
        schedule = self._dng_schedule(args, noise)
        # Custom sigmas set the step count, as diffusers' retrieve_timesteps does.
        steps = len(schedule["sigmas"]) if "sigmas" in schedule else args["num_inference_steps"]
        self._num_timesteps = steps
        # The same schedule for the sampler: LTX's Euler ancestral (flow matching's sibling) gets it shifted.
        schedule = schedule_for(setup.sampler.scheduler, schedule, steps)

        def on_step(i, t, x_prev, info):
            available = {"latents": x_prev, **cond, "dng_p": info.get("p"), "dng_applied_scale": info.get("scale")}
            outputs = callback(self, i, t, {k: available[k] for k in setup.tensor_inputs}) or {}
            for key in cond.keys() & outputs.keys():
                if outputs[key].shape[0] != cond[key].shape[0]:
                    raise ConfigError(f"callback_on_step_end returned {key} with {outputs[key].shape[0]} rows; it "
                                      f"holds every branch, [unconditional, prompt, concepts...], in "
                                      f"{cond[key].shape[0]} rows: keep them")
                cond[key] = outputs[key]
            if "latents" in outputs:
                # The sampler continues from this very tensor, so replacing it in place is replacing the latents.
                x_prev.copy_(outputs["latents"])
            # The parent skips every step after the one whose callback set pipe._interrupt.
            return STOP if self.interrupt else None

        return sample(
            lambda x, t: self._dng_denoise(x, t, cond, args), setup.sampler.scheduler, setup.rule, noise=noise,
            num_inference_steps=steps, num_negatives=setup.num_negatives, cfg_scale=setup.cfg_scale,
            eta=setup.sampler.eta, generator=args["generator"], callback=on_step if callback is not None else None,
            progress=not getattr(self, "_progress_bar_config", {}).get("disable", False), return_trace=return_trace,
            set_timesteps_kwargs=schedule,
        )


class UNetDNGPipelineMixin(DNGPipelineMixin):
    """The hooks of the UNet pipelines (SD 1.x/2.x, SDXL): size and latents from the UNet's config, CLIP skip and
    cross-attention kwargs."""

    def _dng_prepare(self, args: dict) -> dict:
        if self.unet.config.time_cond_proj_dim is not None:
            raise ConfigError("this UNet embeds the guidance scale (LCM-style): no unconditional branch to guide")
        # The parent's properties (do_classifier_free_guidance, clip_skip, ...) read these.
        clip_skip, cross_attention_kwargs = args["clip_skip"], args["cross_attention_kwargs"]
        self._guidance_scale, self._guidance_rescale, self._clip_skip = args["guidance_scale"], 0.0, clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        return dict(lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip)

    def _dng_default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def _dng_size_multiple(self) -> int:
        return math.lcm(8, self.vae_scale_factor)

    def _dng_latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor


def refuse_removed(kwargs: dict) -> None:
    """The former DNG arguments, refused with the `dng=` that replaces them."""
    old = [name for name in REMOVED if name in kwargs]
    if not old:
        return
    messages = []
    settings = [name for name in old if name != "dng_stochastic"]
    if settings:
        changes = ", ".join(f"{RENAMED[name]}={kwargs[name]!r}" for name in settings
                            if name in RENAMED and kwargs[name] is not None)
        preset = kwargs.get("dng_preset")
        if preset is None:
            new = f"dng=DNGConfig({changes})"
        else:
            new = f"dng=DNGConfig.preset({preset!r}, {changes})" if changes else f"dng={preset!r}"
        lam0 = "; lam0 is the former dng_scale, 'scale' now being the applied scale lam0 p/(1-p)" * (
            "dng_scale" in settings)
        messages.append(f"{', '.join(settings)} {'was' if len(settings) == 1 else 'were'} replaced by one argument: "
                        f"{new} (DNGConfig from dng.config{lam0})")
    if "dng_stochastic" in old:
        messages.append("dng_stochastic was removed: a DNG call samples with the stochastic sibling of a scheduler it "
                        "cannot track by itself, leaving pipe.scheduler as it is; drop it")
    raise ConfigError("; ".join(messages))


def refuse_without_concept(options: dict, tensor_inputs: list[str]) -> None:
    """A call without a negative concept is the parent's: refuse what only a guided call can honour."""
    given = [name for name in ("negative_guidance", "dng") if options[name] is not None]
    given += ["return_trace"] * bool(options["return_trace"])
    given += [f"callback_on_step_end_tensor_inputs {name!r}" for name in DNG_TENSOR_INPUTS if name in tensor_inputs]
    if given:
        raise ConfigError(f"{', '.join(given)} need{'s' * (len(given) == 1)} a negative concept "
                          f"(negative_prompt, negative_concepts or negative_prompt_embeds); without one the call is "
                          f"the parent's plain classifier-free guidance")


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


def other_encoder_texts(args: dict, setup: CallSetup, name: str) -> list[list[str]]:
    """The concepts' texts for another text encoder: `name` (e.g. negative_prompt_2) for the one negative_prompt,
    else each concept's own text, as the parent defaults it."""
    if args[name] is None:
        return setup.concepts
    if args["negative_prompt"] is None:
        raise ConfigError(f"{name} is another text encoder's text of negative_prompt; give both")
    return concept_prompts(args[name], None, setup.batch_size)


def guidance_rule(method: str | None, dng, cfg_scale: float, concepts: list[str | None]) -> Guidance:
    """The call's rule: `dng` itself where it is a Guidance, else the method `negative_guidance` names (DNG by
    default, with the settings `config_from_argument` reads from `dng`); `cfg_scale` is the base's CFG scale,
    `concepts` are the concepts' names (None: no name)."""
    if isinstance(method, Guidance):
        raise ConfigError(f"negative_guidance takes a method name, one of {METHODS}; pass the rule object as "
                          f"dng={type(method).__name__}(...)")
    if method is not None and method not in METHODS:
        raise ConfigError(f"negative_guidance must be one of {METHODS}, got {method!r} (a rule object goes in dng=)")
    if isinstance(dng, Guidance):
        if method is not None:
            raise ConfigError(f"dng={type(dng).__name__}(...) is the rule itself; drop negative_guidance={method!r}")
        return dng
    if method in ("np", "sld") and dng is not None:
        raise ConfigError(f"dng= sets DNG, which negative_guidance={method!r} does not use; drop dng=, or drop "
                          f"negative_guidance to guide with DNG")
    if method == "np":
        # With the empty prompt as the unconditional branch, diffusers' negative prompt (Flux's true CFG) is NP at
        # scale w - 1; without CFG (w <= 1) the parent ignores its negative prompt, and so does scale 0.
        return NegativePrompt(max(cfg_scale - 1.0, 0.0))
    if method == "sld":
        return SafeLatentDiffusion()
    return DynamicNegativeGuidance(config_from_argument(dng, concepts))


def is_calibration_file(dng) -> bool:
    """Whether `dng=` names a calibration file: an os.PathLike, or a string that is no preset name and ends in .json
    or names an existing file."""
    if isinstance(dng, os.PathLike):
        return True
    return isinstance(dng, str) and dng not in PRESETS and (dng.lower().endswith(".json") or Path(dng).is_file())


def config_from_argument(dng, concepts: list[str | None]) -> DNGConfig:
    """The DNG settings `dng=` gives: None (the default preset), a preset name, a DNGConfig, a dict of changes over
    the default preset, or a ModelCalibration, or the path of a calibration file written by `dng calibrate`, applied
    to the default preset for `concepts`."""
    if dng is None:
        return PRESETS["default"]
    if is_calibration_file(dng):
        dng = load_calibration_file(dng)[0]
    if isinstance(dng, str):
        if dng not in PRESETS:
            raise ConfigError(f"unknown DNG preset {dng!r}; choose one of {', '.join(PRESETS)}, or give the path of "
                              "a calibration file written by `dng calibrate` (a .json file)")
        return DNGConfig.preset(dng)
    if isinstance(dng, DNGConfig):
        return dng
    if isinstance(dng, dict):
        return DNGConfig.preset("default", **dng)
    if isinstance(dng, ModelCalibration):
        # A concept the calibration has no prior for (or without one text) keeps the preset's.
        return dng.apply(PRESETS["default"], concepts)
    raise ConfigError(f"dng= takes a preset name ({', '.join(PRESETS)}), a calibration file's path, a DNGConfig, a "
                      f"dict of settings over the default preset, a dng.calibration.ModelCalibration or a "
                      f"dng.guidance.Guidance rule; got {type(dng).__name__}")


def sampler_for(scheduler, rule: Guidance, eta: float) -> tuple[NamedSampler, str | None]:
    """The scheduler and eta a call with `rule` samples with, and a note where they are not the call's own.

    DNG reads its posterior from each step's noise: on a scheduler it cannot track, or tracks clearly worse than its
    sibling (`dng.schedulers.prefers_sibling`), it samples with the stochastic sibling (`dng.schedulers.stochastic`, a
    new scheduler from the same config), and on DDIM or TCD at eta 0 with `NOISY_ETA`. NP and SLD sample with the
    scheduler and eta as given.
    """
    if not isinstance(rule, DynamicNegativeGuidance):
        return NamedSampler(scheduler, eta), None
    weak = prefers_sibling(scheduler)
    if tracked(scheduler, eta) and not weak:
        return NamedSampler(scheduler, eta), None
    sibling = stochastic(scheduler)  # refuses a scheduler with no stochastic sibling
    how = []
    if sibling is not scheduler:
        changes = ""
        if type(sibling) is type(scheduler):  # e.g. DPM++ 2M -> DPM++ 2M SDE: name what differs
            changes = "(" + ", ".join(f"{key}={value!r}" for key, value in sibling.config.items()
                                      if scheduler.config.get(key) != value) + ")"
        how.append(f"with {type(sibling).__name__}{changes}, its stochastic sibling from the same config "
                   f"(pipe.scheduler is left as it is; assign {'another' if weak else 'a'} stochastic scheduler to "
                   f"it to choose the sampler yourself)")
    noiseless = needs_eta(sibling) and eta == 0
    if noiseless:
        eta, said = NOISY_ETA[type(sibling).__name__]
        how.append(f"with {said} where the call gives eta 0 (pass eta > 0 to choose it yourself)")
    check_tracked(sibling, eta)
    name = type(scheduler).__name__ + " at eta 0" * noiseless
    why = (f"DNG tracks {name} at solver_order {scheduler.config.solver_order} one update per stage, and removes the "
           f"concept clearly worse there than on its multistep sibling (docs/GMM.md)" if weak else
           f"DNG reads its posterior from the noise each step adds, and {name} adds none")
    return NamedSampler(sibling, eta), f"{why}: DNG calls on this pipeline sample {' and '.join(how)}"


def check_tensor_inputs(tensor_inputs: list[str], rule: Guidance, conditioning: tuple[str, ...]) -> None:
    """Refuse, before the loop, a callback tensor that this call cannot give (`conditioning`: the batched ones)."""
    available = ["latents", *conditioning, "dng_applied_scale"]
    if isinstance(rule, DynamicNegativeGuidance):
        available.append("dng_p")
    for name in tensor_inputs:
        if name not in available:
            why = (f"{type(rule).__name__} has no posterior (DNG tracks one)" if name == "dng_p" else
                   "with negative concepts the conditioning of every branch, [unconditional, prompt, concepts...], "
                   f"is batched in {', '.join(conditioning)}")
            raise ConfigError(f"callback_on_step_end_tensor_inputs asks for {name!r}, which this call cannot give: "
                              f"{why}; it can give {', '.join(available)}")
