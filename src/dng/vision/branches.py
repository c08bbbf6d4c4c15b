"""The class-conditional generator as the sampler's model: one UNet call evaluates every branch of a step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dng.errors import ConfigError
from dng.posterior import mixture_weights
from dng.vision.data import NUM_CLASSES
from dng.vision.models import NULL_LABEL

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
    `num_branches` and `sample_shape` tell the sampler the layout it evaluates, so that a wrong one is refused.
    """

    def __init__(self, unet, labels: Sequence[int], dtype: str = "float32", every_class: bool = False):
        self.unet = unet
        self.labels = torch.tensor([int(c) for c in labels])
        if not len(self.labels) or not all(0 <= c <= NULL_LABEL for c in self.labels.tolist()):
            raise ConfigError(f"labels must be class indices 0-{NULL_LABEL} ({NULL_LABEL}: unconditional), one per "
                              f"branch; got {list(labels)}")
        self.num_branches = len(self.labels)
        config = unet.config
        self.sample_shape = (config.in_channels, *((config.sample_size,) * 2 if isinstance(config.sample_size, int)
                                                   else config.sample_size))
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
        # The UNet's own dtype: noise drawn in another float type would fail inside its first conv.
        x = x.to(self.unet.dtype)
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
