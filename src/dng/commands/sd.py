"""`dng sd`: text-to-image with Stable Diffusion 1.x / 2.x / XL from local weights, with DNG, NP or SLD."""

from __future__ import annotations

import json
from pathlib import Path

from dng.errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")


def register(groups) -> None:
    p = groups["top"].add_parser("sd", help="generate images with Stable Diffusion (local weights) and DNG",
                                 description="Generate with a local diffusers Stable Diffusion folder; saves the "
                                             "images, the trace as CSV and a plot of p_t and the scale per step.")
    p.add_argument("--model", type=Path, required=True, help="local diffusers folder (with model_index.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", action="append", required=True, metavar="TEXT",
                   help="a negative concept; repeat for several, each with its own posterior")
    p.add_argument("--method", choices=("dng", "np", "sld"), default="dng")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--dng-preset", default="default",
                   help="dng: the named setting (dng.guidance.DNG_PRESETS: default, paper-sd, paper-cifar10)")
    p.add_argument("--scale", type=float, default=None,
                   help="dng: lam0 (default: the preset's); np: the constant scale (default cfg - 1, diffusers' "
                        "negative prompt)")
    p.add_argument("--prior", type=float, default=None, help="dng: p_t at the first step (default: the preset's)")
    p.add_argument("--temperature", type=float, default=None, help="dng: weight of each step's evidence")
    p.add_argument("--offset", type=float, default=None, help="dng: drift of log p per unit of log-SNR")
    p.add_argument("--p-max", type=float, default=None, help="dng: upper clamp of p_t, caps the scale")
    p.add_argument("--mode", choices=("independent", "exclusive"), default="independent")
    p.add_argument("--sld-preset", choices=("weak", "medium", "strong", "max"), default="medium")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def _pipeline_class(model: Path):
    index = model / "model_index.json"
    if not model.is_dir():
        raise ConfigError(f"--model {model} is not a folder; give a local diffusers Stable Diffusion folder")
    if not index.is_file():
        raise ConfigError(f"--model {model} has no model_index.json; give a diffusers folder (e.g. one written by "
                          f"pipe.save_pretrained or `huggingface-cli download <repo> --local-dir DIR`)")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{index} is not valid JSON: {err}") from None
    from dng.pipelines import StableDiffusionDNGPipeline, StableDiffusionXLDNGPipeline

    if name.startswith("StableDiffusionXL"):
        return StableDiffusionXLDNGPipeline
    if name.startswith("StableDiffusion"):
        return StableDiffusionDNGPipeline
    raise ConfigError(f"{model} holds a {name or 'unnamed'} pipeline; dng sd supports Stable Diffusion 1.x/2.x/XL")


def _guidance(args):
    from dng.guidance import NegativePrompt, SafeLatentDiffusion
    from dng.pipelines.common import make_guidance

    if args.method == "dng":
        return make_guidance("dng", args.cfg, args.dng_preset, scale=args.scale, prior=args.prior,
                             temperature=args.temperature, offset=args.offset, p_max=args.p_max, mode=args.mode)
    if args.method == "np":
        return NegativePrompt(max(args.cfg - 1, 0.0) if args.scale is None else args.scale)
    return SafeLatentDiffusion.preset(args.sld_preset)


def run(args) -> int:
    if args.steps < 1 or args.images < 1:
        raise ConfigError("--steps and --images must be at least 1")
    cls = _pipeline_class(args.model)  # checks the folder before the slow imports below
    import torch

    from dng.pipelines.report import plot_trace, write_trace_csv
    from dng.schedulers import needs_eta, stochastic

    guidance = _guidance(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    try:
        pipe = cls.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"could not load {args.model} as {cls.__name__}: {err}") from None
    # DNG needs a stochastic sampler: the folder's own, or its stochastic sibling on the same schedule. Every method
    # uses the same one so that their images compare at one seed.
    old = type(pipe.scheduler).__name__
    pipe.scheduler = stochastic(pipe.scheduler)
    if type(pipe.scheduler).__name__ != old:
        print(f"sampling with {type(pipe.scheduler).__name__}, the stochastic sibling of the folder's {old}")
    eta = 1.0 if needs_eta(pipe.scheduler) else 0.0  # DDIM's eta, TCD's gamma: the step's noise
    pipe.to(device)
    out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps, eta=eta,
               guidance_scale=args.cfg, num_images_per_prompt=args.images, negative_concepts=args.negative,
               negative_guidance=guidance, generator=torch.Generator(device).manual_seed(args.seed),
               return_trace=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(out.images):
        image.save(args.out / f"image_{i}.png")
    write_trace_csv(out.trace, args.out / "trace.csv", args.negative)
    plot_trace(out.trace, args.out / "trace.png", args.negative)
    print(f"wrote {len(out.images)} image(s), trace.csv and trace.png to {args.out}")
    return 0
