"""Class-removal cells of DNG with its calibrated parameters scaled: how scale, temperature, prior and offset trade.

Each variant is scale:temperature_factor:prior_factor:offset_factor, e.g. 6:2:1:1 (scale 6, twice the calibrated
temperature). Cells use the bench's noise and scoring (same seed: comparable with `dng bench class-removal` cells of
the same size) and are stored as DIR/c<class>-n<samples>-<variant>.json, so a rerun skips them.

Run: .venv/bin/python benchmarks/dng_variants.py --remove Trouser --variants 6:1:1:1,6:2:1:1,12:1:0.25:1 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dng.bench.class_removal import ClassRemovalBench
from dng.io import write_json
from dng.vision import generate


def parse_variant(text: str) -> tuple[float, float, float, float]:
    parts = [float(v) for v in text.split(":")]
    if len(parts) != 4:
        raise SystemExit(f"a variant is scale:temperature_factor:prior_factor:offset_factor, got {text!r}")
    return tuple(parts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--remove", required=True, help="class name or index")
    parser.add_argument("--variants", required=True, help="comma-separated scale:temperature:prior:offset factors")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    klass, out = generate.parse_class(args.remove), Path(args.out)
    bench = ClassRemovalBench(out / "bench", steps=50, num_samples=args.num_samples, seed=0, progress=False,
                              dtype=args.dtype)
    base = bench.dng_settings(klass)
    for text in args.variants.split(","):
        scale, temperature, prior, offset = parse_variant(text)
        path = out / f"c{klass}-n{args.num_samples}-{args.dtype}-{text}.json"
        if not path.is_file():
            params = {**base, "scale": scale, "temperature": base["temperature"] * temperature,
                      "prior": base["prior"] * prior, "offset": base["offset"] * offset}
            images, _, seconds = bench.sample(generate.guidance_factory("dng", **params), [klass])
            pred, feats = generate.classify(bench.reference.classifier, images)
            write_json(path, {"class": klass, "variant": text, "params": params, "seconds": seconds,
                              **bench.reference.metrics([klass], pred, feats, 0),
                              "counts": np.bincount(pred, minlength=10).tolist()})
        r = json.loads(path.read_text())
        print(f"{text:<16} forbidden {r['forbidden_rate']:.3f}  class KL {r['class_kl']:.3f}  FID {r['fid']:.2f}  "
              f"counts {r['counts']}")


if __name__ == "__main__":
    main()
