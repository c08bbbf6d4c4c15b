"""Class-conditional samples (CFG) of the generator, classified: the share landing in the requested class.

Run: .venv/bin/python benchmarks/cfg_accuracy.py [--per-class 30] [--steps 50] [--cfg 2] [--generator PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dng.vision.data import CLASS_NAMES
from dng.vision.generate import generate
from dng.vision.images import classify, grid, save_png, to_uint8
from dng.vision.models import load_classifier, load_generator


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--generator")
    parser.add_argument("--classifier")
    parser.add_argument("--grid", default="runs/cfg_grid.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, classifier = load_generator(args.generator), load_classifier(args.classifier)
    images, accuracy = [], []
    for k in range(len(CLASS_NAMES)):
        noise = torch.randn(args.per_class, 1, 28, 28, generator=torch.Generator().manual_seed(k))
        x, _ = generate(unet, noise, scheduler="ddpm", guidance=None, negatives=[], steps=args.steps, seed=k,
                        positive=k, cfg_scale=args.cfg)
        u8 = to_uint8(x)
        labels, _ = classify(classifier, u8)
        accuracy.append(float((labels == k).mean()))
        images.append(u8[:10])
        print(f"{CLASS_NAMES[k]:<12} {accuracy[-1]:.3f}", flush=True)
    print(f"mean {np.mean(accuracy):.3f} (CFG {args.cfg}, {args.steps} DDPM steps, {args.per_class} per class)")
    save_png(grid(np.concatenate(images), cols=10), args.grid)


if __name__ == "__main__":
    main()
