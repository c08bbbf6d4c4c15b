"""`dng sd`: text-to-image with Stable Diffusion 1.x / 2.x / XL / 3 or Flux from local weights, with DNG, NP or SLD."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from dng.commands import add_dng_arguments, check_count, check_out_dir, check_seed, dng_changes
from dng.config import DNGConfig
from dng.defaults import PIPELINE_STEPS, SLD_PRESET
from dng.errors import ConfigError

PIPELINE_DTYPES = ("float32", "float16", "bfloat16")
# A folder's pipeline (model_index.json's _class_name, diffusers' or ours) -> the DNG pipeline that loads it.
PIPELINES = {"StableDiffusionPipeline": "StableDiffusionDNGPipeline",
             "StableDiffusionXLPipeline": "StableDiffusionXLDNGPipeline",
             "StableDiffusion3Pipeline": "StableDiffusion3DNGPipeline", "FluxPipeline": "FluxDNGPipeline"}
# DNG pipeline -> the call argument --cfg-scale sets and its default: the CFG scale of the base. Flux's guidance is
# distilled, so its CFG is diffusers' true CFG, off by default (the prompt's branch alone is the base).
CFG = {"StableDiffusionDNGPipeline": ("guidance_scale", 7.5), "StableDiffusionXLDNGPipeline": ("guidance_scale", 7.5),
       "StableDiffusion3DNGPipeline": ("guidance_scale", 7.0), "FluxDNGPipeline": ("true_cfg_scale", 1.0)}


class Renamed(argparse.Action):
    """A former spelling of an option: hidden, stores into the new option, with a note on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"dng: note: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def register(groups) -> None:
    p = groups["top"].add_parser("sd", help="generate images with Stable Diffusion or Flux (local weights) and DNG",
                                 description="Generate with a local diffusers Stable Diffusion 1.x / 2.x / XL / 3 or "
                                             "Flux folder; saves the images, the trace as CSV, a per-image summary of "
                                             "the guidance's action (summary.csv) and a plot of p_t and the scale per "
                                             "step.")
    p.add_argument("--model", type=Path, required=True, help="local diffusers folder (with model_index.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", action="append", required=True, metavar="TEXT",
                   help="a negative concept; repeat for several, each with its own posterior")
    p.add_argument("--method", choices=("dng", "np", "sld"), default="dng")
    p.add_argument("--steps", type=int, default=PIPELINE_STEPS, help="sampling steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--images", dest="num_images", type=int, action=Renamed, new="--num-images")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale of the base; at most 1 turns CFG off, as in diffusers "
                        "(default 7.5; SD3 7.0; Flux 1: on Flux it is diffusers' true_cfg_scale)")
    p.add_argument("--distilled-guidance", type=float, default=None,
                   help="Flux-dev: the guidance its transformer embeds, in every branch (diffusers' guidance_scale, "
                        "default 3.5); Flux-schnell has none and ignores it, as in diffusers")
    p.add_argument("--cfg", dest="cfg_scale", type=float, action=Renamed, new="--cfg-scale")
    add_dng_arguments(p, "diffusers")
    p.add_argument("--np-scale", type=float, default=None,
                   help="np: the constant scale (default cfg-scale - 1, diffusers' negative prompt)")
    p.add_argument("--mode", choices=("independent", "exclusive"), default=None,
                   help=f"dng: how several concepts combine (default {DNGConfig.mode})")
    p.add_argument("--sld-preset", choices=("weak", "medium", "strong", "max"), default=None,
                   help=f"sld: the preset (default {SLD_PRESET})")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="a multiple of 8 (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=PIPELINE_DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Refuse bad options before anything is loaded."""
    check_count("--steps", args.steps)
    check_count("--num-images", args.num_images)
    check_seed(args.seed)
    if args.cfg_scale is not None and (not math.isfinite(args.cfg_scale) or args.cfg_scale < 0):
        raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale} (at most 1 turns "
                          f"classifier-free guidance off, as in diffusers)")
    if args.distilled_guidance is not None and (not math.isfinite(args.distilled_guidance)
                                                or args.distilled_guidance < 0):
        raise ConfigError(f"--distilled-guidance must be a finite number >= 0, got {args.distilled_guidance}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"--{name} must be a positive multiple of 8, got {value}; e.g. "
                              f"{max(8, math.ceil(value / 8) * 8)}")
    if not all(text.strip() for text in args.negative):
        raise ConfigError("--negative is empty: give the concept's text (an empty prompt is the unconditional branch)")
    given = {"dng": [name for name, value in (("--dng", args.dng), ("--mode", args.mode),
                                              ("--calibration", args.calibration)) if value]
                    + (["--dng-preset"] if args.dng_preset != "default" else []),
             "np": ["--np-scale"] if args.np_scale is not None else [],
             "sld": ["--sld-preset"] if args.sld_preset is not None else []}
    for method, options in given.items():
        if options and method != args.method:
            raise ConfigError(f"{', '.join(options)} applies to --method {method} only, not {args.method}; drop it")
    check_out_dir(args.out)


def _pipeline_class(model: Path):
    """The DNG pipeline class for the folder's model_index.json."""
    index = model / "model_index.json"
    if not model.is_dir():
        raise ConfigError(f"--model {model} is not a folder; give a local diffusers Stable Diffusion or Flux folder")
    if not index.is_file():
        raise ConfigError(f"--model {model} has no model_index.json; give a diffusers folder (e.g. one written by "
                          f"pipe.save_pretrained or `huggingface-cli download <repo> --local-dir DIR`)")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{index} is not valid JSON: {err}") from None
    ours = PIPELINES.get(name, name if name in PIPELINES.values() else None)
    if ours is None:
        raise ConfigError(f"{model} holds a {name or 'unnamed'} pipeline; dng sd takes folders of "
                          f"{', '.join(PIPELINES)} (Stable Diffusion 1.x/2.x, XL, 3 / 3.5 and Flux.1)")
    import dng.pipelines

    return getattr(dng.pipelines, ours)


def _cfg(args, cls) -> tuple[float, dict]:
    """The base's CFG scale for the pipeline `cls`, and the call arguments --cfg-scale and --distilled-guidance set."""
    name, default = CFG[cls.__name__]
    if args.distilled_guidance is not None and name != "true_cfg_scale":
        raise ConfigError(f"--distilled-guidance is Flux's embedded guidance; {args.model} holds a "
                          f"{cls.__name__.replace('DNG', '')}: drop it")
    scale = default if args.cfg_scale is None else args.cfg_scale
    given = {name: scale}
    return scale, given if args.distilled_guidance is None else {**given, "guidance_scale": args.distilled_guidance}


def _guidance(args, cfg_scale: float):
    """The rule of --method; NP's scale defaults to `cfg_scale` - 1 (the base's CFG scale), diffusers' negative
    prompt."""
    from dng.config import check_scale
    from dng.guidance import NegativePrompt, SafeLatentDiffusion

    if args.method == "dng":
        return _dng(args)[0]
    if args.method == "np":
        scale = max(cfg_scale - 1, 0.0) if args.np_scale is None else args.np_scale
        return NegativePrompt(check_scale("--np-scale", scale))
    return SafeLatentDiffusion.preset(args.sld_preset or SLD_PRESET)


def _dng(args):
    """DNG's rule, what the pipeline's `dng=` gets and where the settings come from. --calibration FILE goes to the
    pipeline as the file, which it checks against the model's folder (`dng.calibration.load_calibration_file`),
    with --dng, --mode or the strict preset over it as a rule of the same settings; the file applies to our presets
    (`dng.config.CALIBRATED_PRESETS`) only."""
    from dng.calibration import load_calibration_file
    from dng.config import CALIBRATED_PRESETS, DNGConfig
    from dng.guidance import DynamicNegativeGuidance
    from dng.pipelines.common import config_from_argument

    changes = {"mode": args.mode or DNGConfig.mode, **dng_changes(args)}
    file = args.calibration
    ours = args.dng_preset in CALIBRATED_PRESETS
    if file is None or file.strip().lower() == "none" or not ours:
        source = ("library defaults (calibration turned off: --calibration none)"
                  if file is not None and ours else f"the preset {args.dng_preset!r}"
                  + (" as published: --calibration applies to our presets only" if file is not None else ""))
        rule = DynamicNegativeGuidance(DNGConfig.preset(args.dng_preset, **changes))
        return rule, rule, source
    source = f"the calibration file {file}"
    try:
        if not (args.dng or args.mode) and args.dng_preset == "default":
            # Read now, before the model loads; the pipeline reads it again and checks it against its model.
            calibration = load_calibration_file(file)[0]
            return DynamicNegativeGuidance(config_from_argument(calibration, list(args.negative))), file, source
        calibration = load_calibration_file(file, {"kind": "diffusers", "path": str(args.model),
                                                   "weights_sha256": None})[0]
    except ConfigError as err:
        raise ConfigError(f"--calibration: {err}") from None
    try:
        config = calibration.apply(DNGConfig.preset(args.dng_preset), list(args.negative))
        rule = DynamicNegativeGuidance(config.replace(**changes))
    except ConfigError as err:
        raise ConfigError(f"--dng-preset / --dng / --mode over --calibration {file}: {err}") from None
    return rule, rule, f"{source} on the preset {args.dng_preset!r}, with --dng / --mode over it"


def _device(name: str | None) -> str:
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--device {name} is not usable here ({reason}); use --device cpu") from None
    return name


def run(args) -> int:
    check_args(args)
    cls = _pipeline_class(args.model)  # checks the folder before loading it
    cfg_scale, cfg = _cfg(args, cls)
    if args.method == "dng":
        from dng.bench.table import dng_values

        guidance, dng, source = _dng(args)
        print(f"DNG settings from {source}: {dng_values(guidance.config.to_dict())}")
    else:
        guidance = dng = _guidance(args, cfg_scale)
    device = _device(args.device)
    import torch

    from dng.io import write_atomic
    from dng.pipelines.report import plot_trace, summarize_trace, write_summary_csv, write_trace_csv
    from dng.sampler import check_steps
    from dng.schedulers import tracked

    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    try:
        pipe = cls.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"could not load {args.model} as {cls.__name__}: {err}") from None
    check_steps(args.steps, pipe.scheduler, "--steps")
    # The pipeline chooses the sampler (for DNG a stochastic one); say which, as the images depend on it, once: the
    # pipeline's own note of the switch is taken as said.
    sampler, _ = pipe.dng_sampler(guidance, log=False)
    ran, folder = type(sampler.scheduler).__name__, type(pipe.scheduler).__name__
    how = ("the folder's" if sampler.scheduler is pipe.scheduler else
           f"the stochastic sibling of the folder's {folder}, "
           f"{'on which DNG tracks best' if tracked(pipe.scheduler) else 'as DNG needs'}")
    print(f"sampling with {ran}{f' at eta {sampler.eta:g}' if sampler.eta else ''} ({how})")
    pipe.to(device)
    out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
               num_images_per_prompt=args.num_images, negative_concepts=args.negative, dng=dng,
               generator=torch.Generator(device).manual_seed(args.seed), return_trace=True, **cfg)
    names = [f"image_{i}.png" for i in range(len(out.images))]
    for name, image in zip(names, out.images, strict=True):
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_atomic(args.out / name, png.getvalue())
    write_trace_csv(out.trace, args.out / "trace.csv", args.negative)
    rows = summarize_trace(out.trace, args.negative, names)
    write_summary_csv(rows, args.out / "summary.csv")
    plot_trace(out.trace, args.out / "trace.png", args.negative)
    for row in rows:
        p = "" if row["final_p"] is None else (f", p_t max {row['max_p']:.3g}, final {row['final_p']:.3g}"
                                              f"{', activated' if row['activated'] else ''}")
        print(f"{row['image']} {row['concept']!r}: scale mean {row['mean_scale']:.3g}, max {row['max_scale']:.3g}{p}")
    print(f"wrote {len(names)} image(s), trace.csv, summary.csv and trace.png to {args.out}")
    return 0
