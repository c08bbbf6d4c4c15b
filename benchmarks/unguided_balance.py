"""Class balance of the generator's unconditional branch: what no guidance rule can fix in the class-removal KL.

Unguided samples are classified; prints each class's share and KL(uniform || generated) over all ten classes, with
the same figure for as many real test images (the floor from sampling noise and classifier errors).

Run: .venv/bin/python benchmarks/unguided_balance.py [--num-images 400] [--steps 50] [--seed 2] [--generator PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dng import metrics
from dng.vision.data import CLASS_NAMES, NUM_CLASSES, load_split
from dng.vision.generate import generate
from dng.vision.images import classify, to_uint8
from dng.vision.models import load_classifier, load_generator


def kl_from_uniform(labels: np.ndarray) -> float:
    classes = list(range(NUM_CLASSES))
    return metrics.class_kl(labels, classes, np.full(NUM_CLASSES, 1 / NUM_CLASSES))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--generator")
    parser.add_argument("--classifier")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, classifier = load_generator(args.generator), load_classifier(args.classifier)
    noise = torch.randn(args.num_images, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    x, _ = generate(unet, noise, scheduler="ddpm", guidance=None, negatives=[], steps=args.steps, seed=args.seed)
    labels, _ = classify(classifier, to_uint8(x))
    images, _ = load_split("test")
    pick = np.random.default_rng(args.seed).choice(len(images), args.num_images, replace=False)
    real, _ = classify(classifier, images[pick])
    shares = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    print(" ".join(f"{name.split('/')[0]} {share:.3f}" for name, share in zip(CLASS_NAMES, shares, strict=True)))
    print(f"KL(uniform || generated) {kl_from_uniform(labels):.4f}; real test images, same count: "
          f"{kl_from_uniform(real):.4f} ({args.num_images} images, {args.steps} DDPM steps, seed {args.seed})")


if __name__ == "__main__":
    main()
