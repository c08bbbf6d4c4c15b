"""Per-sample random streams: a sample's noise depends on the run's seed and its index only."""

from __future__ import annotations

import torch

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
