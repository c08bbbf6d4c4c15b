"""Issue 29, the CLI's part: degenerate images flagged by every command that must finish, sample files that know
what they are, numbers checked before any work, the DNG values in force reported and checked, a CLI that starts fast
and speaks plainly."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_class_removal import tiny  # noqa: F401 - the fixture

from dng import cli, commands

pytestmark = pytest.mark.usefixtures("one_thread")

# Every command that samples the generator or trains, with the options it needs to start.
SAMPLING = [["sample", "--out", "x"], ["demo", "--out", "x"], ["calibrate"], ["bench", "class-removal", "--out", "x"],
            ["bench", "prompted", "--out", "x"]]
TRAINING = [["train", "generator", "--out", "x", "--steps", "1"], ["train", "classifier", "--out", "x"]]


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """Loading a model (or training one) fails the test: every refusal here comes before any."""
    from dng.bench import class_removal, prompted
    from dng.vision import models, train

    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded")

    for module in (models, class_removal, prompted):
        monkeypatch.setattr(module, "load_generator", loaded)
        monkeypatch.setattr(module, "load_classifier", loaded)
    monkeypatch.setattr(train, "train_generator", loaded)
    monkeypatch.setattr(train, "train_classifier", loaded)
    monkeypatch.chdir(tmp_path)


def _refused(argv, message, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


def test_building_the_parser_loads_no_heavy_module():
    # `dng --help` and a bad option took 3-9 s: `dng bench prompted`'s register imported the bench (torch, diffusers).
    code = ("import sys\nfrom dng.cli import build_parser\nbuild_parser()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'diffusers', 'transformers', "
            "'scipy', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_known_harmless_third_party_notices_are_silenced_by_the_command_only(caplog):
    import logging

    from dng import cli

    notices = {"transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); "
                                                  "falling back to `CLIPImageProcessorPil`",
               "diffusers.models.modeling_utils": "Cannot initialize model with low cpu memory usage because "
                                                  "`accelerate` was not found in the environment.",
               "diffusers.pipelines.pipeline_utils": "Pipelines loaded with `dtype=torch.float16` cannot run with "
                                                     "`cpu` device."}
    with pytest.raises(SystemExit):
        cli.main(["sample", "--no-such-option"])
    with caplog.at_level(logging.WARNING):
        for name, text in notices.items():
            logging.getLogger(name).warning(text)
            logging.getLogger(name).warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"] * 3


@pytest.mark.parametrize("argv", SAMPLING + TRAINING)
@pytest.mark.parametrize("seed", ["-1", str(10**23), str(2**63)])
def test_seeds_outside_0_to_2_63_are_refused_before_any_model_loads(no_models, capsys, argv, seed):
    # demo and the benches failed after sampling with numpy's ValueError; 10**23 overflowed in torch.
    _refused([*argv, "--seed", seed], "--seed must be a whole number from 0 to 2**63 - 1", capsys)


def test_the_largest_seed_is_taken(no_models):
    assert commands.check_seed(2**63 - 1) == 2**63 - 1 and commands.check_seed(None) is None


@pytest.mark.parametrize("argv", SAMPLING)
def test_counts_beyond_memory_are_refused_with_the_estimate(no_models, capsys, argv):
    # sample was killed after 69 s, demo raised an allocation traceback, the bench a MemoryError after 34 s.
    err = _refused([*argv, "--num-images", "100000000000"], "--num-images 100000000000 needs about", capsys)
    assert "GB of memory" in err and "kB per image kept" in err and "available: lower --num-images" in err


@pytest.mark.parametrize("argv, option", [(argv, "--num-images") for argv in SAMPLING]
                         + [(argv, "--num-samples") for argv in SAMPLING[2:]])
def test_counts_must_be_whole_numbers(capsys, argv, option):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, option, "1e11"])
    assert done.value.code == 2 and "invalid int value: '1e11'" in capsys.readouterr().err


def test_the_memory_estimate_counts_precision_recall_and_the_batch(monkeypatch):
    from dng.errors import ConfigError

    monkeypatch.setattr(commands, "memory_available", lambda: 16e9)
    # 30 000 images fit as images, not as the N x N distances of precision/recall.
    assert commands.check_memory("--num-images", 30_000, 10e3) < 1e9
    with pytest.raises(ConfigError, match="32 bytes per pair"):
        commands.check_memory("--num-images", 30_000, 10e3, per_pair=commands.PER_PAIR_PRECISION_RECALL)
    # A batch of 10 000 images in the UNet is the problem, not the images: both options are named.
    with pytest.raises(ConfigError, match="lower --batch-size or --num-images"):
        commands.check_memory("--num-images", 10_000, 10e3, batch=10_000, batch_option="--batch-size")


# --- Degenerate images are flagged by every command that must finish (one definition: dng.metrics.degenerate) ---

@pytest.fixture
def noisy_np(monkeypatch):
    """NP's samples become black-and-white noise (what a scale far too large gives), whatever the sampler does
    with such a scale; the other rules sample as they do."""
    import torch

    from dng.guidance import NegativePrompt
    from dng.vision import generate

    real = generate.generate

    def generate_noise(unet, noise, **kwargs):
        x, trace = real(unet, noise, **kwargs)
        if isinstance(kwargs["guidance"], NegativePrompt):
            x = torch.where(noise > 0, 1.0, -1.0)
        return x, trace

    monkeypatch.setattr(generate, "generate", generate_noise)


def test_sample_flags_images_of_noise(tiny, noisy_np, tmp_path, capsys):  # noqa: F811
    assert cli.main(["sample", "--method", "np", "--remove", "Bag", "--scale", "2", "--num-images", "4",
                     "--steps", "2", "--out", str(tmp_path / "s"), *tiny]) == 0
    out, err = capsys.readouterr()
    assert "saturated noise: 100% of the images" in out
    assert "dng: warning: np 2: 100% of its images are saturated noise or speckled" in err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert bool(f["degenerate"]) and float(f["saturated_rate"]) == 1.0
        assert json.loads(str(f["settings"]))["params"] == {"scale": 2.0}


@pytest.mark.parametrize("bench, argv, label, units", [
    ("class-removal", ["--classes", "Bag", "--methods", "none,np", "--np-scales", "2"], "np 2.0", "classes"),
    ("prompted", ["--pairs", "Trouser:Bag", "--methods", "np", "--np-scales", "2"], "np 2", "pairs"),
])
def test_benches_flag_images_of_noise(tiny, noisy_np, tmp_path, bench, argv, label, units):  # noqa: F811
    out = tmp_path / "b"
    assert cli.main(["bench", bench, *argv, "--num-images", "4", "--steps", "2", "--out", str(out), *tiny]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    flagged = [r for r in rows if r["method"] == "np"]
    assert flagged and all(r["degenerate"] and r["saturated_rate"] == 1.0 for r in flagged)
    assert "saturated_rate" in (out / "results.csv").read_text().splitlines()[0]
    summary = (out / "summary.md").read_text()
    assert f"**{label}: most images of 1 of its 1 {units} are saturated noise or speckled, so its metrics describe " \
           "noise, not garments: lower its scale.**" in summary


# --- Sample files know what they are ---

def test_a_swapped_sample_file_is_recomputed_with_a_warning(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    argv = ["bench", "class-removal", "--classes", "Bag", "--methods", "none,dng", "--dng-lam0", "1",
            "--num-images", "8", "--batch-size", "4", "--steps", "2", "--out", str(out), *tiny]
    assert cli.main(argv) == 0
    dng_samples = next(p for p in (out / "samples").glob("*.npz") if p.stem != "none")
    shutil.copy(out / "samples" / "none.npz", dng_samples)  # the probe: the unguided file over DNG's
    (out / "cells" / f"{dng_samples.stem}.json").unlink()
    with pytest.warns(UserWarning, match=f"{dng_samples} holds other samples than"):
        assert cli.main(argv) == 0
    with np.load(dng_samples) as f:
        assert "p" in f.files and str(f["key"]) == dng_samples.stem  # DNG's samples again, with their trace
    # The summary lists DNG's values in force (the tiny generator has no calibration: the preset's).
    assert "- `dng default lam0=1`: DNG values in force lam0=1, prior=0.1, temperature=1, offset=0, p_min=1e-06, " \
           "p_max=0.95, mode=independent, late_boost=6, boost_sigma=0.72, sigma_min=0, push_cap=4" \
           in (out / "summary.md").read_text()


def test_a_shard_of_another_set_is_recomputed_and_an_identity_is_checked_on_load(tiny, tmp_path):  # noqa: F811
    from dng.bench.sweep import SampleSet, Sweep
    from dng.errors import ConfigError
    from dng.vision import models

    unet = models.load_generator(tiny[1])
    sweep = Sweep(tmp_path / "s", {"steps": 2, "num_samples": 4, "scheduler": "euler-a", "seed": 0,
                                   "dtype": "float32", "batch_size": 4}, unet, progress=False)
    a, b = SampleSet("a"), SampleSet("b", params={"other": 1})
    assert sweep.identity(a) != sweep.identity(SampleSet("a", params={"other": 1}))
    sweep.draw([a])
    shard = sweep.shard_path("b", 0, 4)
    shard.parent.mkdir(parents=True)
    shutil.copy(sweep.sample_path("a"), shard)
    with pytest.warns(UserWarning, match=f"{shard} holds other samples than 'b'"):
        sweep.draw([b])
    assert sweep.load(b)["identity"] == sweep.identity(b)
    with pytest.raises(ConfigError, match="holds other samples than 'a'"):
        sweep.load(SampleSet("a", params={"changed": True}))


# --- Settings mismatches are refused before any model loads ---

@pytest.mark.parametrize("bench", ["class-removal", "prompted"])
def test_a_sweep_folder_of_other_settings_is_refused_before_any_model_loads(no_models, tmp_path, capsys, bench):
    # It took 14-20 s: the bench loaded the classifier, its reference features and the generator first.
    out = tmp_path / "sweep"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "a.json").write_text("{}")
    (out / "settings.json").write_text(json.dumps({"steps": 7}))
    err = _refused(["bench", bench, "--out", str(out)], "holds a sweep with other settings (", capsys)
    assert "steps: 7 -> 25" in err


# --- Presets are what they say: the values in force, reported and checked ---

def _shipped_prior(klass: int) -> float:
    from dng.vision import models

    return models.dng_config(models.load_calibration(), [klass]).prior


@pytest.mark.parametrize("argv", [["sample", "--remove", "Bag"], ["demo", "--remove", "Bag"],
                                  ["bench", "class-removal", "--classes", "Bag", "--methods", "dng"],
                                  ["bench", "prompted", "--pairs", "Trouser:Bag", "--methods", "dng"]])
def test_dng_settings_are_checked_with_the_calibrated_prior(no_models, tmp_path, capsys, argv):
    # --dng p_max=0.07 was refused with "prior 0.1 lies outside [1e-06, 0.07]", the preset's prior, not the one in use.
    prior = _shipped_prior(8)
    assert prior < 0.07
    (tmp_path / "file").write_text("")
    err = _refused([*argv, "--dng", "p_max=0.07", "--out", "file"], "--out file is a file", capsys)
    assert "lies outside" not in err
    _refused([*argv, "--dng", f"p_max={prior / 2}", "--out", "x"], f"prior {prior} lies outside", capsys)


@pytest.mark.parametrize("argv", [["sample", "--out", "x"], ["demo"], ["bench", "class-removal", "--out", "x"],
                                  ["bench", "prompted", "--out", "x"]])
def test_the_schedule_knobs_switch_off_from_every_command(argv):
    args = cli.build_parser().parse_args([*argv, "--dng", "late_boost=1", "--dng", "push_cap=0"])
    config, _ = commands.generator_dng(args, [8])
    assert (config.late_boost, config.push_cap) == (1.0, 0.0)
    assert config.lam0_at(0.01) == config.lam0  # no boost late in the chain


def test_the_schedule_knobs_switch_off_in_dng_sd():
    from dng.config import DNGConfig

    args = cli.build_parser().parse_args(["sd", "--model", "m", "--prompt", "a", "--negative", "b", "--out", "o",
                                          "--dng", "late_boost=1", "--dng", "push_cap=0"])
    config = DNGConfig.preset(args.dng_preset, **commands.dng_changes(args))
    assert (config.late_boost, config.push_cap) == (1.0, 0.0)


def test_dng_without_schedule_is_np_at_lam0_odds_from_the_command_line(tiny, tmp_path, capsys):  # noqa: F811
    """The documented identity: temperature 0, offset 0, late_boost 1, push_cap 0 give NP at lam0 prior/(1-prior),
    from the same seed (per-sample noise); the tiny generator has no calibration, so the prior is the preset's."""
    from dng.config import PARAMETERS

    common = ["--remove", "Bag", "--num-images", "4", "--steps", "3", "--batch-size", "2", *tiny]
    lam0, prior = 2.0, 0.1
    assert cli.main(["sample", "--method", "dng", "--dng", f"lam0={lam0}", "--dng", "temperature=0", "--dng",
                     "offset=0", "--dng", "late_boost=1", "--dng", "push_cap=0", "--out", str(tmp_path / "dng"),
                     *common]) == 0
    printed = capsys.readouterr().out
    # The printed line lists every value in force, not only those that differ from the default preset.
    line = next(line for line in printed.splitlines() if line.startswith("DNG default"))
    assert all(f"{name}=" in line for name in PARAMETERS) and f"prior={prior}" in line
    assert cli.main(["sample", "--method", "np", "--scale", repr(lam0 * prior / (1 - prior)), "--out",
                     str(tmp_path / "np"), *common]) == 0
    with np.load(tmp_path / "dng" / "samples.npz") as a, np.load(tmp_path / "np" / "samples.npz") as b:
        diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 rounding of p/(1-p) at most


@pytest.mark.parametrize("argv, message", [
    (["bench", "gmm", "--seed", "-1"], "--seed must be a whole number from 0 to 2**63 - 1"),
    (["bench", "gmm", "--seed", str(10**23)], "--seed must be a whole number from 0 to 2**63 - 1"),
    (["bench", "gmm", "--num-images", "100000000000"], "needs about"),
    (["sd", "--model", "m", "--prompt", "a", "--negative", "b", "--out", "o", "--seed", "-1"], "2**63 - 1"),
])
def test_bench_gmm_and_sd_check_seeds_and_counts_up_front(argv, message, capsys):
    """bench gmm took --seed -1, overflowed on 10**23 and died allocating 1e11 samples; sd allowed seeds to 2**64."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
