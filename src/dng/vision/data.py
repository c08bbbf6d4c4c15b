"""Fashion-MNIST read from its IDX gz files with numpy."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from dng.errors import ConfigError

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (1, 28, 28)

_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_FIX = "install it with `apt-get install dataset-fashion-mnist` or set DNG_DATA_DIR to a directory holding it"


def data_dir() -> Path:
    """The Fashion-MNIST directory: $DNG_DATA_DIR or the Debian package's location."""
    return Path(os.environ.get("DNG_DATA_DIR") or DEFAULT_DATA_DIR)


def read_idx(path: str | os.PathLike, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file, checked against its magic number and header."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Fashion-MNIST file {path} is missing: {_FIX}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"Fashion-MNIST file {path} is not a readable gzip file ({err}): {_FIX}") from err
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ConfigError(f"Fashion-MNIST file {path} has a bad IDX header (expected magic {magic:#010x}): {_FIX}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise ConfigError(
            f"Fashion-MNIST file {path} holds {len(raw) - header} bytes of data, its header says {shape}: {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the 'train' or 't10k'/'test' split."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root) if root is not None else data_dir()
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", _IMAGES_MAGIC, 3)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", _LABELS_MAGIC, 1)
    if images.shape[1:] != IMAGE_SHAPE[1:] or len(images) != len(labels):
        raise ConfigError(
            f"Fashion-MNIST {split} split in {root} has images {images.shape} and labels {labels.shape}: {_FIX}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ConfigError(f"Fashion-MNIST {split} labels in {root} go beyond {NUM_CLASSES - 1}: {_FIX}")
    return images, labels.astype(np.int64)


def to_tensor(images: np.ndarray):
    """Float32 torch tensor [N, 1, 28, 28] in [-1, 1] from uint8 images [N, 28, 28]."""
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def load_tensors(split: str = "train", root: str | os.PathLike | None = None):
    """Images as float tensor [N, 1, 28, 28] in [-1, 1] and labels as int64 tensor [N]."""
    import torch

    images, labels = load_split(split, root)
    return to_tensor(images), torch.from_numpy(labels)


def parse_class(text: str) -> int:
    """A Fashion-MNIST class from its index or (case-insensitive) name, e.g. '1', 'Trouser', 'ankle boot'."""
    text = text.strip()
    if text.isdigit() and int(text) < NUM_CLASSES:
        return int(text)
    lowered = {name.lower(): i for i, name in enumerate(CLASS_NAMES)}
    lowered.update({name.split("/")[0].lower(): i for i, name in enumerate(CLASS_NAMES)})
    if text.lower() in lowered:
        return lowered[text.lower()]
    choices = ", ".join(f"{i}={name}" for i, name in enumerate(CLASS_NAMES))
    raise ConfigError(f"unknown class {text!r}; give an index or a name: {choices}")


def parse_classes(text: str) -> list[int]:
    """Comma-separated classes (or 'all'), deduplicated in order."""
    if text.strip().lower() == "all":
        return list(range(NUM_CLASSES))
    classes = [parse_class(part) for part in text.split(",") if part.strip()]
    if not classes:
        raise ConfigError("no class given; use e.g. 'all', '3,7' or 'Trouser'")
    return list(dict.fromkeys(classes))
