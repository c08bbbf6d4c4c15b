"""Bad options of demo, sample, bench gmm and calibrate fail before any model runs: exit 2, one line, no traceback;
a NaN model is an error, not an image; the demo's report does not take noise for success."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_class_removal import TINY_CLASSIFIER, TINY_UNET, _write_idx

from dng import cli, commands
from dng.commands.demo import format_report
from dng.errors import ConfigError
from dng.vision import models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Random tiny generator/classifier files and a 40-image test split; the weights folder is empty, so a command
    that would read the shipped models fails loudly instead."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    monkeypatch.setenv("DNG_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "no-weights")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    gen, clf = tmp_path / "g.safetensors", tmp_path / "c.safetensors"
    models.save_model(models.make_generator(TINY_UNET), gen, "generator", TINY_UNET, {})
    models.save_model(models.make_classifier(TINY_CLASSIFIER), clf, "classifier", TINY_CLASSIFIER, {})
    return ["--generator", str(gen), "--classifier", str(clf)]


def _unwritable() -> str:
    """A folder no one may create files in, root included."""
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("/sys takes new files here")
    except OSError:
        return "/sys/dng-out"


def _refused(argv, message, capsys, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", [["demo"], ["sample", "--out", "x"], ["bench", "gmm"], ["calibrate"]])
@pytest.mark.parametrize("option, value, message", [
    ("--threads", "-2", "--threads must be >= 1"),
    ("--threads", "0", "--threads must be >= 1"),
    ("--steps", "1001", "--steps 1001 is more than the scheduler's 1000 training timesteps"),
])
def test_threads_and_steps_are_checked_by_every_command(tiny, capsys, command, option, value, message):
    _refused([*command, option, value, *(tiny if command[0] != "bench" else [])], message, capsys)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "euler-a"])
def test_steps_above_training_are_refused_on_every_scheduler(tiny, capsys, scheduler):
    # DDPM and DDIM raised diffusers' ValueError as a traceback; Euler ancestral ran them.
    _refused(["sample", "--steps", "2000", "--scheduler", scheduler, "--out", "x", *tiny], "at most 1000", capsys)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--class", "1", "--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 0"),
    (["sample", "--class", "1", "--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0"),
    (["sample", "--method", "np", "--remove", "1", "--scale", "inf"], "--scale must be a finite number >= 0"),
    (["sample", "--num-images", "0"], "--num-images must be >= 1"),
    # One prior for five exclusive classes sums to 1.5: the tracker's clamp used to cap it at p_max silently.
    (["sample", "--remove", "0,1,2,3,4", "--dng", "prior=0.3"], "5 priors sum to 1.5"),
    (["sample", "--remove", "1", "--dng", "prior=0.97"], "prior 0.97 lies outside"),
    (["sample", "--remove", "1", "--dng", "endpoint=both"], "endpoint must be one of kernel, on, off"),
])
def test_sample_scales_counts_and_priors(tiny, capsys, argv, message):
    _refused([*argv, "--out", "x", *tiny], message, capsys)
    assert not Path("x").exists()


def test_output_places_are_checked_before_sampling(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "x.npz").mkdir()
    readonly = _unwritable()
    cases = [
        (["demo", "--out", "file"], "--out file is a file; give a folder"),
        (["demo", "--out", "file/demo"], "file is a file, not a folder"),
        (["demo", "--out", readonly], "cannot write in /sys"),
        (["sample", "--out", "file"], "--out file is a file; give a folder"),
        (["sample", "--out", "file/x"], "file is a file, not a folder"),
        (["sample", "--out", f"{readonly}/x"], "cannot write in /sys"),
        (["calibrate", "--out", "folder.png"], "is a folder"),
        (["calibrate", "--out", f"{readonly}/c.json"], "cannot write in /sys"),
    ]
    for argv, message in cases:
        _refused([*argv, *tiny], message, capsys)
    for argv, message in [(["--out", "file"], "--out file is a file"), (["--jobs", "0"], "--jobs"),
                          (["--out", f"{readonly}/r"], "cannot write in /sys")]:
        _refused(["bench", "gmm", "--steps", "2", "--num-images", "10", *argv], message, capsys)
    assert not list(tmp_path.glob("*/grid_*.png")) and not (tmp_path / "runs").exists()


def test_check_out_dir_takes_a_folder_to_be_made_in_a_writable_place(tmp_path):
    assert commands.check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(ConfigError, match="--plot"):
        commands.check_out_dir(_unwritable(), "--plot")


@pytest.fixture
def nan_generator(tiny, tmp_path):
    unet = models.make_generator(TINY_UNET)
    with torch.no_grad():
        unet.conv_out.weight.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    models.save_model(unet, path, "generator", TINY_UNET, {})
    return [*tiny[:1], str(path), *tiny[2:]]


def test_nan_weights_are_a_numerical_error_and_no_image_is_written(nan_generator, tmp_path, capsys):
    """A blow-up is not bad input: its own error type and exit code 3."""
    err = _refused(["sample", "--num-images", "2", "--steps", "2", "--out", "s", *nan_generator],
                   "the model returned NaN or inf at step 1 of 2", capsys, code=3)
    assert err.startswith("dng: numerical error:")
    assert "unconditional branch for 2 of 2 samples" in err and "NaN or inf weights" in err
    assert not (tmp_path / "s").exists()
    _refused(["demo", "--num-images", "4", "--steps", "2", "--out", "demo", *nan_generator], "NaN", capsys, code=3)
    assert not list((tmp_path / "demo").glob("*.png"))


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_the_benches_help_states_the_defaults_the_benches_draw(capsys):
    import inspect

    from dng.bench.class_removal import configs
    from dng.bench.prompted import PromptedBench
    from dng.defaults import CFG_SCALE, DNG_LAM0S, NP_FACTORS, NP_SCALES, as_text

    text = _help(capsys, "bench", "class-removal")
    assert f"(default {as_text(NP_SCALES)})" in text and f"(default: {as_text(DNG_LAM0S)} with" in text
    text = _help(capsys, "bench", "prompted")
    assert f"(default {CFG_SCALE:g})" in text and f"(default (w-1) x {as_text(NP_FACTORS)};" in text
    assert as_text((0.1, 1.0, 2.5)) == "0.1,1,2.5"
    # What the help says is what a run draws when it is not told.
    assert [p["scale"] for m, p, _ in configs(["np"], []) if m == "np"] == list(NP_SCALES)
    assert inspect.signature(PromptedBench).parameters["cfg_scale"].default == CFG_SCALE


@pytest.mark.parametrize("command", ["class-removal", "prompted"])
def test_a_bench_class_draws_what_its_command_draws_when_not_told(command):
    import inspect

    from dng.bench.class_removal import ClassRemovalBench
    from dng.bench.prompted import PromptedBench

    bench = {"class-removal": ClassRemovalBench, "prompted": PromptedBench}[command]
    args = cli.build_parser().parse_args(["bench", command, "--out", "x"])
    parameters = inspect.signature(bench).parameters
    for name in ("steps", "num_samples", "scheduler", "seed", "batch_size"):
        assert parameters[name].default == getattr(args, name), name


def test_version_and_renamed_options(tiny, capsys):
    from dng import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dng {__version__}"
    # An old spelling still works, with a note naming the new one.
    err = _refused(["bench", "gmm", "--num-samples", "3", "--steps", "2", "--threads", "0"], "--threads", capsys)
    assert "--num-samples is now --num-images" in err
    err = _refused(["sample", "--dng", "scale=-1", "--remove", "Bag", "--out", "x", *tiny], "lam0 must be", capsys)
    assert "--dng scale= is now --dng lam0=" in err


def test_a_scale_that_leaves_the_models_range_is_an_error_with_its_step(tiny, tmp_path, capsys):
    """NP at 1e9 gave saturated noise reported as results; now the step and the likely cause are named (exit 3)."""
    err = _refused(["demo", "--num-images", "4", "--steps", "2", "--np-scale", "1e9", "--out", "demo",
                    "--no-progress", *tiny], "left the model's range at step 1 of 2", capsys, code=3)
    assert "guidance scale too large" in err and not (tmp_path / "demo" / "report.json").exists()


def test_report_warns_only_about_degenerate_methods():
    row = {"forbidden_rate": 0.0, "class_kl": 0.1, "fid": 2.0, "precision": 1.0, "recall": 0.5, "seconds": 1.0}
    report = {"removed": 8, "removed_name": "Bag", "num_images": 4, "steps": 2, "scheduler": "ddpm", "seed": 0,
              "dng_settings_from": "test", "seconds": 1.0, "degenerate": ["np"],
              "methods": {"none": {**row, "artifact_rate": 0.0, "saturated_rate": 0.0, "params": {}},
                          "np": {**row, "artifact_rate": 0.25, "saturated_rate": 0.75, "params": {"scale": 1e9}},
                          "dng": {**row, "artifact_rate": 0.0, "saturated_rate": 0.0, "params": {"scale": 1.0}}}}
    text = format_report(report)
    assert "**np: 75% of its images are saturated noise or speckled" in text
    assert "none:" not in text and "**dng" not in text
