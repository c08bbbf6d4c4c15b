"""Training batches: which images each step reads, and the classifier's augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of batch `step`: a fresh permutation per epoch, a function of (seed, epoch) so resumes agree."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts up to `shift` pixels (background padded)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=gen)).unbind(0)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
