"""The benches' shared sweep folder and its split over torch.distributed ranks (gloo, two CPU processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_class_removal import TINY_UNET, tiny  # noqa: F401 - the fixture

from dng import cli
from dng.distributed import World, gather, shard
from dng.vision import generate, models
from dng.vision.seeding import seeded_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tiny, out, extra=()):  # noqa: F811
    return ["bench", "class-removal", "--classes", "1,3", "--methods", "none,np,dng", "--np-scales", "1",
            "--dng-lam0", "1", "--num-images", "10", "--batch-size", "4", "--steps", "3", "--out", str(out),
            *extra, *tiny]


def _rows(out):
    """results.json's rows without the wall time, which no two runs share."""
    rows = json.loads((Path(out) / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _torchrun(nproc, argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "dng",
           *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_noise_depends_on_the_sample_index_only():
    unet = models.make_generator(TINY_UNET)

    def unguided(noise, **kwargs):
        return generate.generate(unet, noise, scheduler="euler-a", guidance=None, negatives=[], steps=3, **kwargs)

    noise = seeded_noise(5, 0, 6)
    assert torch.equal(seeded_noise(5, 2, 4), noise[2:])
    assert not torch.equal(seeded_noise(6, 0, 6), noise)
    full, _ = unguided(noise, seed=5, chunk=2)
    tail, _ = unguided(noise[2:], seed=5, chunk=2, first_index=2)
    assert torch.equal(tail, full[2:])  # the same batches: bit for bit
    other, _ = unguided(noise, seed=5, chunk=4)
    # Other batches change the UNet's arithmetic in its last bits only: the step noise is the same.
    torch.testing.assert_close(other, full, atol=1e-4, rtol=0)
    assert (unguided(noise, seed=6, chunk=2)[0] - full).abs().max() > 1e-2


def test_shard_and_gather_are_inverse_on_one_process():
    items = list(range(7))
    assert shard(items, World()) == items and gather(items, World()) == items
    assert shard(items, World(1, 3)) == [1, 4]


def test_batch_size_is_part_of_the_settings(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    assert cli.main(_args(tiny, out)) == 0
    assert cli.main(_args(tiny, out, ["--batch-size", "5"])) == 2


def test_a_run_that_stored_nothing_does_not_lock_its_folder(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"steps": 2000}))  # a failed run's leftover
    assert cli.main(_args(tiny, out)) == 0


def test_an_unreadable_result_is_recomputed_with_a_warning(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    assert cli.main(_args(tiny, out)) == 0
    rows = _rows(out)
    cell = sorted((out / "cells").glob("*.json"))[0]
    cell.write_text("{not json")
    samples = out / "samples" / "none.npz"
    samples.write_bytes(samples.read_bytes()[:50])
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli.main(_args(tiny, out)) == 0
    assert _rows(out) == rows


def test_torchrun_two_ranks_equal_one_process_and_resume_with_another_count(tiny, tmp_path, monkeypatch):  # noqa: F811
    one = tmp_path / "one"
    assert cli.main(_args(tiny, one)) == 0
    two = tmp_path / "two"
    proc = _torchrun(2, _args(tiny, two))
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert _rows(two) == _rows(one)

    # Stopped after its first shards: a one-process resume redoes none of them and ends where the others did.
    killed = tmp_path / "killed"
    proc = _torchrun(2, _args(tiny, killed))
    deadline = time.time() + 300
    while not any((killed / "shards").glob("*/*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun stops its workers (each in its own session) and waits for them
    assert proc.wait(timeout=120) != 0
    assert not (killed / "results.json").exists()
    done = {p.relative_to(killed): p.stat().st_mtime_ns for p in (killed / "shards").glob("*/*.npz")}
    assert done
    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **k: calls.append(k["first_index"]) or real(*a, **k))
    assert cli.main(_args(tiny, killed)) == 0
    assert _rows(killed) == _rows(one)
    assert len(calls) == 5 * 3 - len(done)  # five sample sets of three shards each, less those on disk


def test_ranks_given_different_arguments_stop_with_a_clear_error(tiny, tmp_path):  # noqa: F811
    script = tmp_path / "disagree.py"
    script.write_text("import os, sys\nfrom dng import cli\n"
                      "extra = ['--num-samples', '12'] if os.environ['RANK'] == '1' else []\n"
                      f"sys.exit(cli.main({_args(tiny, tmp_path / 'x')!r} + extra))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ranks disagree on the sweep's settings" in proc.stdout + proc.stderr


def test_scaling_guide_example_gives_the_same_images_on_two_ranks(tmp_path):
    guide = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
    code = guide.read_text().split("```python\n")[1].split("```")[0]
    script = tmp_path / "sample_many.py"
    script.write_text(code + "\nif world.main:\n    from safetensors.torch import save_file\n"
                             "    save_file({'images': torch.cat(images)}, __import__('sys').argv[1])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=env, check=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path / "two.safetensors")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (load_file(tmp_path / name)["images"] for name in ("one.safetensors", "two.safetensors"))
    assert one.shape == (8, 1, 28, 28) and torch.equal(one, two)


@pytest.mark.parametrize("bench", ["class-removal", "prompted"])
@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "-2"], "--threads must be >= 1"),
    (["--steps", "2000", "--scheduler", "ddpm"], "more than the scheduler's 1000 training timesteps"),
    (["--num-images", "2"], "--num-images must be >= 4"),
])
def test_bad_sweep_options_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, bench, extra, message):
    from dng.vision import models as vision_models

    monkeypatch.setattr(vision_models, "load_generator", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(["bench", bench, "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing left to lock the corrected retry


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert cli.main(["bench", "prompted", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_sample_on_two_ranks_writes_the_images_of_one_process(tiny, tmp_path):  # noqa: F811
    argv = ["sample", "--remove", "Bag", "--num-images", "10", "--batch-size", "4", "--steps", "3", *tiny]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(2, [*argv, "--out", str(tmp_path / "two")])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert one["images"].shape == (10, 28, 28) and np.array_equal(one["images"], two["images"])


def test_ranks_draw_the_largest_shards_first(tiny, tmp_path, monkeypatch):  # noqa: F811
    from dng.bench import sweep as sweep_module
    from dng.bench.sweep import SampleSet, Sweep

    planned = []
    monkeypatch.setattr(sweep_module, "rounds", lambda items, work, *args, **kwargs: planned.append(list(items)))
    sweep = Sweep(tmp_path / "s", {"steps": 2, "num_samples": 6, "scheduler": "euler-a", "seed": 0,
                                   "dtype": "float32", "batch_size": 4}, models.load_generator(tiny[1]),
                  progress=False)
    sweep.draw([SampleSet("a"), SampleSet("b")])
    # Rounds pair shards of one size: each set's last, smaller shard would otherwise always fall to the same rank.
    assert [(key, stop - start) for key, start, stop in planned[0]] == [("a", 4), ("b", 4), ("a", 2), ("b", 2)]
