"""Per-step wall time of DNG vs NP on the same model, in one run; and the GMM bench at full size.

Run: .venv/bin/python benchmarks/bench_overhead.py [--threads 2] [--jobs 2] [--skip-unet] [--skip-full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from dng.bench.gmm import GMMBench, run_rows
from dng.gmm import GaussianMixture, default_mixture_config
from dng.guidance import DynamicNegativeGuidance, NegativePrompt
from dng.sampler import sample


def per_step(model, noise, guidance, steps, repeats):
    """Median over repeats of seconds per sampling step."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(model, DDPMScheduler(clip_sample=False), guidance, noise=noise, num_inference_steps=steps,
               num_negatives=1, generator=torch.Generator().manual_seed(0), progress=False)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def ratio(name, model, noise, steps, repeats):
    # Interleave the two methods so drift in machine load hits both alike.
    np_t, dng_t = [], []
    for _ in range(repeats):
        np_t.append(per_step(model, noise, NegativePrompt(1.0), steps, 1))
        dng_t.append(per_step(model, noise, DynamicNegativeGuidance(), steps, 1))
    a, b = statistics.median(np_t), statistics.median(dng_t)
    print(f"{name:<34} NP {a * 1e3:8.3f} ms/step   DNG {b * 1e3:8.3f} ms/step   DNG/NP {b / a:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-unet", action="store_true", help="the UNet takes minutes on one thread")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="processes for the full bench (one torch thread each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    cfg = default_mixture_config()
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], DDPMScheduler().alphas_cumprod,
                          dtype=torch.float32)
    ratio("GMM d=64 K=10, 10000 samples", gmm.branch_model([0]), torch.randn(10000, 64), 100, 5)

    if not args.skip_unet:
        unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2).eval()
        params = sum(p.numel() for p in unet.parameters()) / 1e6

        @torch.no_grad()
        def unet_model(x, t):
            return unet(x, t).sample

        ratio(f"UNet2DModel 28x28 {params:.1f}M, batch 64", unet_model, torch.randn(64, 1, 28, 28), 10, 5)

    if not args.skip_full:
        bench = GMMBench(cfg, steps=1000, num_samples=10000, seed=0)
        start = time.perf_counter()
        run_rows(bench, ["none", "np", "sld", "dng", "dng-oracle", "target"], jobs=args.jobs, threads=1)
        print(f"dng bench gmm --steps 1000 --num-samples 10000 --jobs {args.jobs} --threads 1 (all methods): "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
