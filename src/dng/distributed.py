"""Work split over the processes that `torchrun` (or `accelerate launch`) starts, on torch.distributed.

Outside torchrun everything here is a one-process no-op, so the same code runs both ways. Work is split in
rounds: in each round every rank takes at most one item, then the ranks exchange how it went, so one progress bar
(rank 0) counts the global work and an error on one rank stops every rank with that error instead of a hang.

For a Python user, `shard(items)` and `gather(values)` split a list by rank and bring the outputs back:

    world = World.from_env()
    mine = shard(seeds, world)
    images = [sample_one(seed) for seed in mine]
    everything = gather(images, world)  # on every rank, in the order of `seeds`
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dng.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: `rank` of `size`, on `device`."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in WORLD_SIZE / RANK / LOCAL_RANK (one process without them).

        Joins the process group (NCCL when there are GPUs, gloo on CPU) on first use. Each rank takes the GPU of
        its LOCAL_RANK when there are GPUs.
        """
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def main(self) -> bool:
        """The rank that shows progress and writes what all ranks share."""
        return self.rank == 0

    def all_gather(self, value) -> list:
        """`value` of every rank, in rank order (small, picklable values among our own processes)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_same(self, value, what: str) -> None:
        """Refuse to start when the ranks were given different arguments: their shards would not fit together."""
        values = self.all_gather(value)
        if any(v != values[0] for v in values):
            differ = [r for r, v in enumerate(values) if v != values[0]]
            raise ConfigError(f"the ranks disagree on {what} (ranks {differ} differ from rank 0); start every rank "
                              "with the same command line")


def shard(items: Sequence, world: World) -> list:
    """This rank's share of `items`: every `world.size`-th item from its rank on."""
    return list(items[world.rank :: world.size])


def gather(values: Sequence, world: World) -> list:
    """The inverse of `shard`: every rank's `values`, interleaved back into the order of the sharded items."""
    parts = world.all_gather(list(values))
    return [parts[i % world.size][i // world.size] for i in range(sum(len(p) for p in parts))]


def rounds(items: Sequence, work: Callable, world: World, desc: str, progress: bool = True) -> None:
    """Run `work(item)` for every item, split over the ranks in rounds, with one progress bar on rank 0.

    An exception on any rank stops every rank after the round: the failing rank re-raises its own, the others
    raise a ConfigError naming it.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, disable=not (progress and world.main) or None)
    try:
        for start in range(0, len(items), world.size):
            index = start + world.rank
            error = None
            try:
                if index < len(items):
                    work(items[index])
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                error = err
            failures = world.all_gather(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            failed = [(r, msg) for r, msg in enumerate(failures) if msg is not None]
            if failed:
                rank, msg = failed[0]
                raise ConfigError(f"rank {rank} failed ({msg}); every rank stopped")
            bar.update(min(world.size, len(items) - start))
    finally:
        bar.close()


def threads_per_rank(world: World, threads: int | None) -> None:
    """torch threads: the user's number, else the cores shared among the ranks of this machine."""
    if threads is None and world.size > 1 and world.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        threads = max(1, (os.cpu_count() or 1) // local)
    if threads is not None:
        torch.set_num_threads(threads)
