"""Sampling the class-conditional generator with a guidance rule: branch wrapper, schedulers, image helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dng.config import DNGConfig
from dng.errors import ConfigError
from dng.guidance import DynamicNegativeGuidance, Guidance, NegativePrompt, SafeLatentDiffusion
from dng.posterior import ReadPosterior, mixture_weights
from dng.sampler import Trace, sample
from dng.vision.data import CLASS_NAMES, NUM_CLASSES
from dng.vision.models import NULL_LABEL, generator_sampler

# The UNet's arithmetic: float32, or bfloat16 autocast (about twice as fast on CPUs with AMX or AVX512-BF16, slower
# on CPUs without). Its outputs are float32 either way, so the scheduler and the tracker work in float32.
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose {' or '.join(DTYPES)}")
    return dtype


class ClassBranches:
    """The sampler's model callable: one UNet, one branch per label (NULL_LABEL for eps_u), one batched call.

    With `every_class`, the same call also evaluates every class the sampler did not ask for and keeps all NUM_CLASSES
    + 1 predictions of the step, by label, in `last` [NUM_CLASSES + 1, batch, ...] (for `ClassPosterior`).
    """

    def __init__(self, unet, labels: Sequence[int], dtype: str = "float32", every_class: bool = False):
        self.unet = unet
        self.labels = torch.tensor([int(c) for c in labels])
        self.bf16 = check_dtype(dtype) == "bfloat16"
        others = [k for k in range(NUM_CLASSES + 1) if k not in self.labels.tolist()] if every_class else []
        self.others = torch.tensor(others, dtype=torch.long)
        self.every_class = every_class
        # Where each label's prediction sits in the call's output: the first branch of each (a positive class may
        # also be a negative).
        called = self.labels.tolist() + others
        self.by_label = [called.index(k) for k in range(NUM_CLASSES + 1)] if every_class else []
        self.last = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = len(self.labels)
        batch = x.shape[0] // n
        labels = torch.cat([self.labels, self.others])
        if len(self.others):
            x = torch.cat([x, x[:batch].repeat((len(self.others),) + (1,) * (x.dim() - 1))])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.unet(x, t, class_labels=labels.repeat_interleave(batch).to(x.device)).sample.float()
        if self.every_class:
            self.last = out.unflatten(0, (len(labels), batch))[self.by_label]
        return out[: n * batch]


class ClassPosterior:
    """DNG's p from every class's branch instead of tracking: `dng.posterior.mixture_weights` of the step's
    predictions (the model's own posterior over the classes), for the removed `classes`, [batch, negatives].

    A reference for what tracking costs, at NUM_CLASSES + 1 branches per step instead of 1 + negatives. It reads the
    predictions of the step that `branches` (a `ClassBranches` with `every_class`) has just evaluated: the sampler
    calls the model, then the rule, at every step.
    """

    def __init__(self, branches: ClassBranches, classes: Sequence[int]):
        if not branches.every_class:
            raise ConfigError("ClassPosterior needs ClassBranches(..., every_class=True)")
        self.branches, self.classes = branches, list(classes)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        last = self.branches.last
        if last is None or last.shape[1] != x.shape[0]:
            raise ConfigError("ClassPosterior was read before its ClassBranches evaluated this step's batch")
        return mixture_weights(last[NULL_LABEL], last[:NUM_CLASSES])[:, self.classes]


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


GUIDED = ("np", "sld", "dng")


def make_rule(method: str, *, np_scale: float = 1.0, sld_preset: str = "medium",
              dng: DNGConfig | None = None) -> Guidance | None:
    """The rule of `method`: None for 'none', NP at `np_scale`, SLD's `sld_preset` or DNG with `dng` (the default
    preset if None). Rules reset in `start`, so one rule serves every batch of a run."""
    if method == "none":
        return None
    if method == "np":
        return NegativePrompt(np_scale)
    if method == "sld":
        return SafeLatentDiffusion(sld_preset)
    if method == "dng":
        return DynamicNegativeGuidance(dng if dng is not None else "default")
    raise ConfigError(f"unknown method {method!r}; choose from none, {', '.join(GUIDED)}")


# torch's CPU generator keeps only the low 32 bits of a seed: per-sample seeds are offsets from a mixed base in
# that range, so the samples of one run never share a stream and nearby run seeds still give unrelated streams.
_SEED_MASK = 0xFFFFFFFF


def _mix(seed: int) -> int:
    """splitmix64's finaliser of `seed`, to 32 bits."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _SEED_MASK


def sample_generators(seed: int, start: int, count: int, stream: int) -> list[torch.Generator]:
    """One generator per sample `start .. start+count-1` of a run: stream 0 draws x_T, stream 1 the step noise.

    A sample's noise then depends on the seed and its index only, never on the batch it was drawn in or on the
    process that drew it.
    """
    base = _mix(seed)
    return [torch.Generator().manual_seed((base + 2 * i + stream) & _SEED_MASK) for i in range(start, start + count)]


def seeded_noise(seed: int, start: int, count: int, shape=(1, 28, 28)) -> torch.Tensor:
    """x_T of samples `start .. start+count-1` of a run with `seed`, [count, *shape]."""
    if count < 1:
        return torch.empty(0, *shape)
    return torch.cat([torch.randn(1, *shape, generator=g) for g in sample_generators(seed, start, count, 0)])


def generate(
    unet,
    noise: torch.Tensor,
    *,
    scheduler: str,
    guidance: Guidance | None,
    negatives: Sequence[int],
    steps: int,
    seed: int,
    positive: int | None = None,
    cfg_scale: float | None = None,
    chunk: int = 128,
    progress: bool = False,
    dtype: str = "float32",
    first_index: int = 0,
    class_posterior: bool = False,
) -> tuple[torch.Tensor, Trace | None]:
    """Samples in [-1, 1] from `noise` [N, 1, 28, 28] with the sampler named `scheduler`, `chunk` images per sampler
    run; the trace if guided.

    Sample j's step noise comes from its own generator (`sample_generators`, index `first_index + j`), so the same
    seed and index give the same step noise for every method, batch size and process. `dtype` 'bfloat16' runs the
    UNet under bfloat16 autocast (`DTYPES`). `class_posterior`: DNG reads p from every class's branch
    (`ClassPosterior`) instead of tracking it.
    """
    guided = guidance is not None
    if guided and not negatives:
        raise ConfigError("a guidance rule needs at least one class to remove")
    negatives = list(negatives) if guided else []
    labels = [NULL_LABEL] + ([positive] if positive is not None else []) + negatives
    model = ClassBranches(unet, labels, dtype, every_class=class_posterior)
    if class_posterior:
        if not isinstance(guidance, DynamicNegativeGuidance):
            raise ConfigError("class_posterior gives DNG its posterior: it needs a DNG rule")
        guidance = guidance.with_posterior(ReadPosterior(ClassPosterior(model, negatives)))
    sampler = generator_sampler(scheduler)
    samples, traces = [], []
    for start in range(0, len(noise), chunk):
        x_T = noise[start : start + chunk]
        out = sample(
            model,
            sampler.scheduler,
            guidance,
            noise=x_T,
            num_inference_steps=steps,
            num_negatives=len(negatives),
            cfg_scale=cfg_scale if positive is not None else None,
            eta=sampler.eta,
            generator=sample_generators(seed, first_index + start, len(x_T), 1),
            progress=progress,
            return_trace=guided,
        )
        samples.append(out.samples)
        traces.append(out.trace)
    trace = None
    if guided:
        trace = Trace(traces[0].timesteps, *(torch.cat([getattr(tr, f) for tr in traces], 1)
                                             for f in ("p", "scale", "llr")), traces[0].sigma)
    return torch.cat(samples).clamp(-1, 1), trace


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
