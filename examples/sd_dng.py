"""Stable Diffusion with DNG next to diffusers' negative prompt, from a local copy of the weights.

    python examples/sd_dng.py --model ~/models/stable-diffusion-v1-5 --prompt "a city street, photo" \
        --negative "cars" --negative "people" --out sd_dng_out

Writes np.png (NP at scale cfg - 1 per concept; for one concept exactly diffusers' negative prompt), dng.png (same
seed and sampler, DNG with the library default or --dng-preset), trace.csv and trace.png (p_t and the applied scale
per step and concept).
"""

import argparse
from pathlib import Path

import torch

from dng.pipelines import StableDiffusionDNGPipeline, StableDiffusionXLDNGPipeline
from dng.pipelines.report import plot_trace, write_trace_csv
from dng.schedulers import stochastic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="local diffusers folder of SD 1.x / 2.x / XL")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", action="append", required=True, help="repeat for several concepts")
    parser.add_argument("--xl", action="store_true", help="the folder holds an SDXL pipeline")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dng-preset", default="default", help="DNG's preset: default, paper-sd, paper-cifar10")
    parser.add_argument("--out", type=Path, default=Path("sd_dng_out"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cls = StableDiffusionXLDNGPipeline if args.xl else StableDiffusionDNGPipeline
    pipe = cls.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device)
    # One stochastic sampler for both methods, so that they compare at one seed: a DNG call would sample with the
    # stochastic sibling of SD's PNDM by itself, but NP would keep PNDM.
    pipe.scheduler = stochastic(pipe.scheduler)
    args.out.mkdir(parents=True, exist_ok=True)

    common = dict(prompt=args.prompt, negative_concepts=args.negative, num_inference_steps=args.steps,
                  guidance_scale=7.5)
    baseline = pipe(**common, negative_guidance="np", generator=torch.Generator(device).manual_seed(args.seed))
    baseline.images[0].save(args.out / "np.png")
    out = pipe(**common, dng=args.dng_preset, return_trace=True,
               generator=torch.Generator(device).manual_seed(args.seed))
    out.images[0].save(args.out / "dng.png")
    write_trace_csv(out.trace, args.out / "trace.csv", args.negative)
    plot_trace(out.trace, args.out / "trace.png", args.negative)
    final_p = out.trace.p[-1, 0].tolist()
    print("final posterior per concept:", dict(zip(args.negative, (round(p, 4) for p in final_p), strict=True)))


if __name__ == "__main__":
    main()
