"""Generated Fashion-MNIST images: uint8 conversion, grids, PNG and .npz files, the classifier's labels and
features."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, 28, 28] from images [N, 1, 28, 28] in [-1, 1]."""
    return ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def grid(images: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """One uint8 image tiling [N, H, W] images row by row on a white background."""
    n, h, w = images.shape
    rows = max(1, -(-n // cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return out


def save_png(array: np.ndarray, path, scale: int = 2) -> None:
    """Write a uint8 grayscale array as PNG (nearest-neighbour upscaled), atomically."""
    import io

    from PIL import Image

    from dng.io import write_atomic

    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def npz_bytes(**arrays) -> bytes:
    """The bytes of a compressed .npz, for an atomic write."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@torch.no_grad()
def classify(classifier, images_u8: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels [N] and penultimate features [N, D] of uint8 images."""
    from dng.vision.data import to_tensor

    x = to_tensor(images_u8)
    labels, feats = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i : i + batch_size])
        feats.append(f.double().numpy())
        labels.append(classifier.head(f).argmax(1).numpy())
    return np.concatenate(labels), np.concatenate(feats)
