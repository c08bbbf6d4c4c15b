"""DNG on the shipped generator with the UNet in float32 and in bfloat16 autocast, same noise, in one run.

Prints seconds per image of each, the class-removal metrics of each, how often the classifier gives both samples of
one noise the same label, and how far the tracked log-odds of the two runs drift apart (mid-chain and last step).

Run: .venv/bin/python benchmarks/bench_dtype.py [--remove Shirt] [--lam0 LAM0] [--num-images 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dng.bench.class_removal import Reference
from dng.vision import generate
from dng.vision.branches import DTYPES
from dng.vision.data import parse_class
from dng.vision.images import classify, to_uint8
from dng.vision.models import dng_config, load_classifier, load_generator


def logit(p: torch.Tensor) -> torch.Tensor:
    return p.log() - (-p).log1p()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--remove", default="Shirt")
    parser.add_argument("--lam0", type=float, default=None, help="DNG lam0 (default: the preset's)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    klass = parse_class(args.remove)
    unet, classifier = load_generator(), load_classifier()
    reference = Reference(classifier)
    config = dng_config(unet.dng_calibration, [klass], **({} if args.lam0 is None else {"lam0": args.lam0}))
    noise = torch.randn(args.num_images, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    runs = {}
    for dtype in DTYPES:
        start = time.perf_counter()
        x, trace = generate.generate(unet, noise, scheduler="ddpm", guidance=generate.make_rule("dng", dng=config),
                                     negatives=[klass], steps=args.steps, seed=args.seed, dtype=dtype)
        seconds = time.perf_counter() - start
        images = to_uint8(x)
        pred, feats = classify(classifier, images)
        runs[dtype] = dict(seconds=seconds, images=images, pred=pred, trace=trace,
                           metrics=reference.metrics([klass], images, pred, feats, args.seed))
    print(f"DNG lam0 {config.lam0:g} removing {args.remove}, {args.num_images} images, {args.steps} DDPM steps, "
          f"{torch.get_num_threads()} thread(s)")
    for dtype, r in runs.items():
        m = r["metrics"]
        print(f"{dtype:<9} {r['seconds'] / args.num_images * 1e3:7.1f} ms/image   forbidden {m['forbidden_rate']:.3f}"
              f"   class KL {m['class_kl']:.4f}   FID {m['fid']:.2f}   precision {m['precision']:.2f}"
              f"   recall {m['recall']:.2f}")
    full, half = runs["float32"], runs["bfloat16"]
    print(f"speed-up bfloat16 / float32: {full['seconds'] / half['seconds']:.2f}x")
    print(f"same classifier label: {np.mean(full['pred'] == half['pred']):.3f}; pixels within 8/255: "
          f"{np.mean(np.abs(full['images'].astype(int) - half['images'].astype(int)) <= 8):.3f}")
    # Median as well as mean: near p_min the log-odds are large and their gap barely changes the applied scale.
    a, b = logit(full["trace"].p[..., 0]), logit(half["trace"].p[..., 0])
    for name, step in (("mid-chain", args.steps // 2), ("last step", args.steps - 1)):
        print(f"|logit p_fp32 - logit p_bf16| at {name}: median {(a[step] - b[step]).abs().median():.3f}, "
              f"mean {(a[step] - b[step]).abs().mean():.3f}")


if __name__ == "__main__":
    main()
