"""The storage and work split the Fashion-MNIST benches share: a locked folder of sample sets and scored cells.

A *sample set* is the sweep's noise sampled with one rule. It is drawn in shards of `batch_size` samples
(DIR/shards/KEY/START-STOP.npz), each a function of the seed and its samples' indices only, so any number of
ranks (`dng.distributed`) draws the same shards; when every shard is there they are merged into
DIR/samples/KEY.npz. A *cell* scores one or two sample sets into a row (DIR/cells/KEY.json). Every file is written
atomically and skipped on rerun, so an interrupted run resumes, with any number of ranks, where it stopped.

Every sample file records what it holds (`Sweep.identity`: its set's key, rule, parameters and branches, and the
sweep's settings: seed, sampler, steps, weights); a file that holds something else (copied from another cell, or
written by an older dng) is recomputed with a warning, like an unreadable one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dng.distributed import World, rounds
from dng.errors import ConfigError
from dng.guidance import Guidance
from dng.io import write_atomic, write_json
from dng.vision import generate
from dng.vision.images import npz_bytes, to_uint8
from dng.vision.seeding import seeded_noise

# Recorded in every sweep's settings: folders whose noise was drawn another way are refused, not mixed.
NOISE = "per-sample generators (dng.vision.generate.sample_generators)"


@dataclass(frozen=True)
class SampleSet:
    """The sweep's noise sampled with one rule: `rule` (None: no negative) against `negatives`, with
    classifier-free guidance on `positive` at `cfg_scale` when given; `class_posterior` as in `generate.generate`.
    `params` are the rule's settings as its cell stores them (every value it runs with): part of the set's
    identity."""

    key: str
    rule: Guidance | None = None
    negatives: tuple[int, ...] = ()
    positive: int | None = None
    cfg_scale: float | None = None
    class_posterior: bool = False
    params: Mapping = field(default_factory=dict)


def calibration_record(calibration, file: str | None) -> dict:
    """What a sweep folder records of the DNG calibration its cells ran with (`Sweep.refuse_stale`): the file it came
    from (`dng.vision.models.generator_calibration`'s: None beside the generator, "none" turned off) and its values
    (a `ModelCalibration` as a dict; None uncalibrated)."""
    from dataclasses import asdict

    return {"file": file, "values": None if calibration is None else asdict(calibration)}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, or a ConfigError naming the file if it cannot be read."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err}); delete it to recompute it") from None


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err}); delete it to recompute it") from None


def readable(path: Path) -> bool:
    """Whether a stored result can be read; an unreadable one is removed with a warning, to be recomputed."""
    try:
        read_npz(path) if path.suffix == ".npz" else read_json(path)
        return True
    except ConfigError:
        warnings.warn(f"{path} is unreadable (a crash of another program, or a disk fault); recomputing it",
                      stacklevel=2)
        path.unlink()
        return False


@contextmanager
def one_thread():
    """Score on one thread: the classifier's features (torch) and FID's covariances and eigenvalues (numpy's BLAS)
    change in their last digits with the thread count, and every rank count must score alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


class Sweep:
    """A folder bound to `settings` (everything that changes the samples), drawn with the generator `unet` (a
    module, or a function that loads it: called when the first shard is drawn, so that a folder of other settings
    is refused, and a finished one rescored, without loading it)."""

    def __init__(self, out, settings: dict, unet, world: World | None = None, progress: bool = True):
        self.out = Path(out)
        self.settings = {**settings, "noise": NOISE}
        self.world = world or World()
        self._unet = unet
        self.progress = progress
        self.world.check_same(self.settings, "the sweep's settings")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder (new or holding a sweep of these settings)")
        self._lock()

    def _lock(self) -> None:
        # Results of other settings or weights would mix silently into the table: refuse them. A folder that holds
        # no result (a run that failed before its first one) is taken over, so its corrected retry is not refused.
        path = self.out / "settings.json"
        if path.is_file():
            old = read_json(path)
            if old != self.settings and self.holds_results():
                diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in self.settings.items() if old.get(k) != v)
                raise ConfigError(f"{self.out} holds a sweep with other settings ({diff}); choose another --out")
        self.world.barrier()
        if self.world.main:
            write_json(path, self.settings)
        self.world.barrier()

    @property
    def unet(self) -> torch.nn.Module:
        if not isinstance(self._unet, torch.nn.Module):
            self._unet = self._unet()
        self._unet = self._unet.to(self.world.device)
        return self._unet

    def identity(self, sample_set: SampleSet) -> str:
        """A digest of what `sample_set`'s samples are: its key, rule, parameters and branches, and the sweep's
        settings (seed, sampler, steps, batch, weights). Stored in each of its files and checked when they are
        read."""
        what = {"key": sample_set.key, "rule": None if sample_set.rule is None else type(sample_set.rule).__name__,
                "params": sample_set.params, "negatives": list(sample_set.negatives), "positive": sample_set.positive,
                "cfg_scale": sample_set.cfg_scale, "class_posterior": sample_set.class_posterior,
                "settings": self.settings}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def holds(self, path: Path, sample_set: SampleSet) -> bool:
        """Whether `path` holds `sample_set`'s samples. An unreadable file, or one that holds other samples (another
        cell's, or an older dng's that records no identity), is removed with a warning naming it, to be recomputed."""
        if not path.is_file():
            return False
        try:
            stored = read_npz(path)
        except ConfigError:
            stored = None
            why = "is unreadable (a crash of another program, or a disk fault)"
        if stored is not None:
            found = str(stored["identity"]) if "identity" in stored else None
            if found == self.identity(sample_set):
                return True
            why = (f"holds other samples than {sample_set.key!r} of these settings"
                   if found is not None else "records no identity (written by an older dng)")
        warnings.warn(f"{path} {why}; recomputing it", stacklevel=2)
        path.unlink()
        return False

    def holds_results(self) -> bool:
        return any(any((self.out / d).glob("**/*.*")) for d in ("shards", "samples", "cells"))

    def shards(self) -> list[tuple[int, int]]:
        n, size = self.settings["num_samples"], self.settings["batch_size"]
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def sample_path(self, key: str) -> Path:
        return self.out / "samples" / f"{key}.npz"

    def shard_path(self, key: str, start: int, stop: int) -> Path:
        return self.out / "shards" / key / f"{start:07d}-{stop:07d}.npz"

    def draw(self, sets: list[SampleSet]) -> None:
        """Draw and merge every sample set not yet stored, split over the ranks (a set listed twice is drawn once)."""
        by_key = {s.key: s for s in sets}
        sets = list(by_key.values())
        self.world.barrier()
        plan = None
        if self.world.main:
            missing = [s.key for s in sets if not self.holds(self.sample_path(s.key), s)]
            todo = [(key, *shard) for key in missing for shard in self.shards()
                    if not self.holds(self.shard_path(key, *shard), by_key[key])]
            # Largest shards first: the ranks run in lockstep rounds, so a round should pair shards of one size (a
            # last, smaller shard per set would otherwise always fall to the same rank and keep the others waiting).
            todo.sort(key=lambda item: item[1] - item[2])
            plan = (missing, todo)
        # Rank 0's view of the folder, so that no rank plans from a folder another rank is already writing to.
        missing, todo = self.world.all_gather(plan)[0]
        rounds(todo, lambda item: self._draw_shard(by_key[item[0]], *item[1:]), self.world, "sampling",
               self.progress)
        self.world.barrier()
        rounds(missing, lambda key: self._merge(by_key[key]), self.world, "merging", progress=False)
        self.world.barrier()

    def _draw_shard(self, sample_set: SampleSet, start: int, stop: int) -> None:
        s = self.settings
        begin = time.perf_counter()
        x, trace = generate.generate(
            self.unet, seeded_noise(s["seed"], start, stop - start).to(self.world.device), scheduler=s["scheduler"],
            guidance=sample_set.rule, negatives=list(sample_set.negatives), steps=s["steps"], seed=s["seed"],
            positive=sample_set.positive, cfg_scale=sample_set.cfg_scale, chunk=s["batch_size"],
            dtype=s["dtype"], first_index=start, class_posterior=sample_set.class_posterior)
        arrays = {"images": to_uint8(x.cpu()), "seconds": np.float64(time.perf_counter() - begin),
                  "key": np.array(sample_set.key), "identity": np.array(self.identity(sample_set))}
        if trace is not None:
            arrays.update(timesteps=trace.timesteps.numpy(), sigma=trace.sigma[:, 0].numpy(),
                          p=trace.p.numpy(), scale=trace.scale.numpy())
        write_atomic(self.shard_path(sample_set.key, start, stop), npz_bytes(**arrays))

    def _merge(self, sample_set: SampleSet) -> None:
        key, identity = sample_set.key, self.identity(sample_set)
        parts = [read_npz(self.shard_path(key, *shard)) for shard in self.shards()]
        if any(str(p.get("identity")) != identity for p in parts):
            raise ConfigError(f"{self.out / 'shards' / key} holds shards of other samples than {key!r}; delete it to "
                              "recompute them")
        merged = {"images": np.concatenate([p["images"] for p in parts]),
                  "seconds": np.float64(sum(float(p["seconds"]) for p in parts)),
                  "key": np.array(key), "identity": np.array(identity)}
        if "p" in parts[0]:
            merged.update(timesteps=parts[0]["timesteps"], sigma=parts[0]["sigma"],
                          p=np.concatenate([p["p"] for p in parts], 1),
                          scale=np.concatenate([p["scale"] for p in parts], 1))
        write_atomic(self.sample_path(key), npz_bytes(**merged))
        shutil.rmtree(self.out / "shards" / key)

    def load(self, sample_set: SampleSet) -> dict[str, np.ndarray]:
        """A merged sample set: images [N, 28, 28] uint8, seconds, its key and identity, and for a guided set
        timesteps, sigma [steps], p and scale [steps, N, negatives]. A file that holds other samples is refused."""
        path = self.sample_path(sample_set.key)
        stored = read_npz(path)
        if "identity" not in stored or str(stored["identity"]) != self.identity(sample_set):
            raise ConfigError(f"{path} holds other samples than {sample_set.key!r} (was it replaced during the run?); "
                              "delete it and rerun to recompute it")
        return stored

    def cell_path(self, key: str) -> Path:
        return self.out / "cells" / f"{key}.json"

    def refuse_stale(self, params: dict[str, dict], calibration: dict | None = None,
                     calibrated: Collection[str] = (), source: str = "") -> None:
        """Refuse stored cells whose parameters differ from `params` (cell key -> params): a changed preset or a
        recalibrated generator would otherwise mix old cells into the new table. One rank reads (and clears
        unreadable cells), so the ranks agree.

        `calibration` is the DNG calibration this run applies ({"file": where it came from, "values": the
        calibration as a dict, or None}), recorded in DIR/calibration.json. Where the folder recorded other values,
        the stored cells of `calibrated` (the keys of the cells the calibration sets, DNG's) whose parameters differ
        are removed with their sample sets, to be recomputed, instead of refused, and a note says so, naming the
        calibration's `source` (`dng.vision.models.dng_source`).
        """
        stale = dropped = None
        if self.world.main:
            def differs(key):
                path = self.cell_path(key)
                return path.is_file() and readable(path) and read_json(path)["row"]["params"] != params[key]

            record = self.out / "calibration.json"
            if calibration is not None:
                calibration = json.loads(json.dumps(calibration))
            old = read_json(record) if calibration is not None and record.is_file() else None
            changed = old is not None and old.get("values") != calibration["values"]
            different = [key for key in params if differs(key)]
            dropped = [key for key in different if changed and key in calibrated]
            stale = [key for key in different if key not in dropped]
            if not stale:
                for key in dropped:
                    self._remove(key)
                if calibration is not None:
                    write_json(record, calibration)
        stale, dropped = self.world.all_gather((stale, dropped))[0]
        if stale:
            raise ConfigError(f"{self.out} holds {', '.join(stale)} with other parameters (was the generator "
                              f"recalibrated?); delete those cells/<name>.json and .npz files or choose another --out")
        if dropped and self.world.main:
            print(f"{self.out}: the calibration changed ({source} now): recomputing {', '.join(dropped)}")

    def _remove(self, key: str) -> None:
        """Remove a stored cell and the sample set of the same key."""
        for path in (self.cell_path(key), self.cell_path(key).with_suffix(".npz"), self.sample_path(key)):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.out / "shards" / key, ignore_errors=True)

    def score(self, keys: list[str], work: Callable[[str], None]) -> None:
        """Run `work(key)` for every cell whose file is not stored (or unreadable), split over the ranks."""
        self.world.barrier()
        todo = None
        if self.world.main:
            todo = [k for k in keys if not (self.cell_path(k).is_file() and readable(self.cell_path(k)))]
        todo = self.world.all_gather(todo)[0]
        with one_thread():
            rounds(todo, work, self.world, "scoring", progress=False)
        self.world.barrier()

