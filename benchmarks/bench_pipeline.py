"""Per-step wall time of DNG (3 branches) vs diffusers' own negative prompt (2 branches) vs NP with 3 branches.

All three run in one process on the same small offline SD pipeline (dng.pipelines.tiny), interleaved
round by round so that load from other processes hits them alike; a step's time is the gap between two
consecutive callback_on_step_end calls, in wall time and in process CPU time (the steadier of the two when
other jobs share the cores); reported is the median over all steps.

    .venv/bin/python benchmarks/bench_pipeline.py [--unet-width 64] [--size 64] [--steps 12] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from diffusers.utils import logging

from dng.guidance import NegativePrompt
from dng.pipelines import StableDiffusionDNGPipeline
from dng.pipelines.tiny import sd_components


def step_times(pipe, **kwargs) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per denoising step, first step (warm-up and setup) left out."""
    stamps = []

    def stamp(pipe, i, t, tensors):
        stamps.append((time.perf_counter(), time.process_time()))
        return {}

    pipe(**kwargs, callback_on_step_end=stamp)
    return tuple([b[k] - a[k] for a, b in zip(stamps, stamps[1:], strict=False)] for k in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-width", type=int, default=64, help="UNet channels (width, 2*width)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latents are size/2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        parent = StableDiffusionPipeline(**sd_components(Path(tmp), width=args.unet_width))
    parent.scheduler = EulerAncestralDiscreteScheduler.from_config(parent.scheduler.config)
    parent.set_progress_bar_config(disable=True)
    pipe = StableDiffusionDNGPipeline.from_pipe(parent)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                output_type="latent", guidance_scale=7.5)
    runs = {
        "parent negative prompt (2 branches)": lambda: step_times(parent, **call, negative_prompt="red"),
        "NP, 3 branches": lambda: step_times(pipe, **call, negative_prompt="red",
                                             dng=NegativePrompt(6.5)),
        "DNG, 3 branches": lambda: step_times(pipe, **call, negative_prompt="red", negative_guidance="dng"),
    }
    for run in runs.values():
        run()  # warm-up
    wall, cpu = ({name: [] for name in runs} for _ in range(2))
    for _ in range(args.rounds):
        for name, run in runs.items():
            run_wall, run_cpu = run()
            wall[name] += run_wall
            cpu[name] += run_cpu

    print(f"torch {torch.__version__}, {args.threads} thread(s), UNet width {args.unet_width}, "
          f"{args.size}x{args.size} px, {args.steps} steps x {args.rounds} rounds")
    # With one thread, CPU time is the work itself; wall time also counts waiting for a core on a shared machine.
    for label, times in (("wall time, median step", wall), ("CPU time, median step", cpu)):
        per_step = {name: statistics.median(v) for name, v in times.items()}
        print(f"{label}:")
        for name, value in per_step.items():
            print(f"  {name:38s} {1000 * value:8.2f} ms/step")
        parent_ms, np3, dng = per_step.values()
        print(f"  DNG / NP (3 branches)          {dng / np3:.3f}")
        print(f"  DNG / parent (2 branches)      {dng / parent_ms:.3f}")
        print(f"  NP (3) / parent (2 branches)   {np3 / parent_ms:.3f}")


if __name__ == "__main__":
    main()
