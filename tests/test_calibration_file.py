"""--calibration FILE on every command that runs DNG, the model a file records, and dng= taking the file."""
# ruff: noqa: F811 - `tiny` is the fixture imported from test_class_removal

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from test_class_removal import tiny  # noqa: F401 - the fixture

from dng import cli
from dng.bench.table import dng_values
from dng.calibration import OFFSET_UNIT, ModelCalibration, load_calibration_file, recorded_model
from dng.commands import sd as sd_command
from dng.config import PRESETS
from dng.errors import ConfigError
from dng.pipelines import StableDiffusionDNGPipeline
from dng.pipelines.common import config_from_argument, guidance_rule
from dng.pipelines.tiny import sd_components
from dng.vision import models

DEFAULT = PRESETS["default"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _generator(tiny):
    return tiny[tiny.index("--generator") + 1]


def write_calibration(path, concepts=("Trouser", "Dress"), priors=(0.05, 0.2), temperature=0.3, offset=0.002,
                      p_max=0.9, model=None, **extra):
    """A calibration file as `dng calibrate` writes it, recording `model` ({"kind", "path", "weights_sha256"})."""
    entry = {"offset_unit": OFFSET_UNIT, "settings": {"p_max": p_max}, "classes": list(concepts),
             "fits": {"all": {"priors": list(priors), "temperature": temperature, "offset": offset}}, **extra}
    if model is not None:
        entry["model"] = model
    path.write_text(json.dumps(entry))
    return path


def _for_generator(tiny, path, **kwargs):
    return write_calibration(path, model=models.generator_model(_generator(tiny)), **kwargs)


# -- reading a file and checking the model it was made for --------------------------------------------------------


def test_a_generator_file_must_be_made_for_these_weights(tiny, tmp_path, caplog):
    gen = _generator(tiny)
    model = models.generator_model(gen)
    assert model == {"kind": "generator", "path": gen, "weights_sha256": models.weights_sha256(gen, "generator")}
    good = _for_generator(tiny, tmp_path / "good.json")
    calibration, entry = load_calibration_file(good, model)
    assert calibration == ModelCalibration(("Trouser", "Dress"), (0.05, 0.2), 0.3, 0.002, 0.9)
    assert recorded_model(entry) == model
    # The older format records the weights as generator_sha256 only: still read, still checked.
    old = write_calibration(tmp_path / "old.json", generator_sha256=model["weights_sha256"])
    assert load_calibration_file(old, model)[0] == calibration
    fix = rf"rerun `dng calibrate --generator {gen}` for these weights, or pass --calibration none"
    for other in (write_calibration(tmp_path / "other.json", model={**model, "weights_sha256": "0" * 64}),
                  write_calibration(tmp_path / "older.json", generator_sha256="0" * 64)):
        with pytest.raises(ConfigError, match=rf"was made for other weights.* than the generator {gen}: {fix}"):
            load_calibration_file(other, model)
    sd = write_calibration(tmp_path / "sd.json", model={"kind": "diffusers", "path": "/m/sd15", "weights_sha256": None})
    with pytest.raises(ConfigError, match=r"made for the diffusers model /m/sd15, not for the generator"):
        load_calibration_file(sd, model)
    # A file that records no model is applied as given, with a warning; without a model to check, nothing is checked.
    bare = write_calibration(tmp_path / "bare.json")
    with caplog.at_level(logging.WARNING, logger="dng.calibration"):
        assert load_calibration_file(bare, model)[0] == calibration
        assert load_calibration_file(tmp_path / "other.json")[0] == calibration
    assert [r.message for r in caplog.records] == [f"{bare} records no weights it was made for; applying it to {gen} "
                                                   "as given"]


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.json", r"calibration file .*missing\.json does not exist; give the JSON file"),
    (lambda d: d, r"calibration file .* is a folder"),
    (lambda d: (d / "x.json").write_text("{") and d / "x.json", r"x\.json is not valid JSON"),
    (lambda d: (d / "y.json").write_text("{}") and d / "y.json", r"not a calibration whose offset"),
])
def test_unreadable_files_are_refused_clearly(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match):
        load_calibration_file(make(tmp_path))


def test_a_diffusers_file_is_compared_by_folder_name_with_a_warning_only(tmp_path, caplog):
    made = {"kind": "diffusers", "path": "/models/sd15/", "weights_sha256": None}
    path = write_calibration(tmp_path / "c.json", concepts=("red",), priors=(0.02,), model=made)
    with caplog.at_level(logging.WARNING, logger="dng.calibration"):
        load_calibration_file(path, {"kind": "diffusers", "path": "/elsewhere/sd15", "weights_sha256": None})
        assert not caplog.records  # the same model folder, elsewhere
        load_calibration_file(path, {"kind": "diffusers", "path": "/models/sdxl", "weights_sha256": None})
    assert [r.message for r in caplog.records] == [
        f"{path} was made for the model /models/sd15/, not /models/sdxl; applying it anyway (rerun `dng calibrate` "
        "for this model to fit its own)"]


# -- the generator commands ------------------------------------------------------------------------------------


def test_generator_calibration_chooses_the_file_none_or_the_one_beside(tiny, tmp_path):
    gen = _generator(tiny)
    assert models.generator_calibration(None, gen) == (None, None)
    models.save_calibration(models.calibration_path(gen), _fits(0.7), [1, 3], {"p_max": 0.9})
    beside = models.load_calibration(gen)
    assert models.generator_calibration(None, gen) == (beside, None) and beside.temperature == 0.7
    assert models.generator_calibration("none", gen) == (None, "none")
    path = _for_generator(tiny, tmp_path / "c.json")
    calibration, file = models.generator_calibration(str(path), gen)
    assert (calibration.temperature, file) == (0.3, str(path))
    assert models.load_generator(gen, str(path)).dng_calibration == calibration
    assert models.load_generator(gen, "none").dng_calibration is None
    assert models.dng_config(calibration, [3]) == DEFAULT.replace(prior=0.2, temperature=0.3, offset=0.002, p_max=0.9)
    assert models.dng_source(calibration, "default", str(path)) == f"the calibration file {path}"
    assert models.dng_source(None, "default", "none") == "library defaults (calibration turned off: --calibration none)"
    assert models.dng_source(calibration, "paper-sd", str(path)) == "the published preset 'paper-sd' as published"


def _fits(temperature):
    from dng.calibration import Calibration

    return {"all": Calibration(priors=[0.05, 0.2], temperature=temperature, offset=0.002, nll=0.4, baseline_nll=0.5,
                               auc={}, positives=[10, 10], samples=100)}


COMMANDS = {
    "demo": ["demo", "--remove", "Dress", "--num-images", "4", "--steps", "2"],
    "sample": ["sample", "--remove", "Dress", "--num-images", "2", "--steps", "2"],
    "class-removal": ["bench", "class-removal", "--classes", "Dress", "--methods", "none,dng", "--dng-lam0", "1",
                      "--num-images", "4", "--steps", "2"],
    "prompted": ["bench", "prompted", "--pairs", "Trouser:Dress", "--methods", "cfg,dng", "--num-images", "4",
                 "--steps", "2"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_generator_command_refuses_a_file_it_cannot_apply(tiny, tmp_path, capsys, command):
    argv = [*COMMANDS[command], "--out", str(tmp_path / "out"), *tiny]
    other = write_calibration(tmp_path / "other.json", model={**models.generator_model(_generator(tiny)),
                                                              "weights_sha256": "0" * 64})
    for path, message in ((tmp_path / "missing.json", "--calibration: calibration file"),
                          (tmp_path, "is a folder"),
                          ((tmp_path / "bad.json").write_text("no") and tmp_path / "bad.json", "is not valid JSON"),
                          (other, "--calibration: " + f"{other} was made for other weights")):
        assert cli.main([*argv, "--calibration", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert message in err, err
    assert "rerun `dng calibrate --generator" in err and "--calibration none" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_sample_and_demo_apply_the_file_and_say_so(tiny, tmp_path, capsys):
    path = _for_generator(tiny, tmp_path / "c.json", temperature=0.45)
    calibrated = DEFAULT.replace(prior=0.2, temperature=0.45, offset=0.002, p_max=0.9)
    out = tmp_path / "s"
    assert cli.main([*COMMANDS["sample"], "--calibration", str(path), "--out", str(out), *tiny]) == 0
    assert f"DNG default (the calibration file {path}): {dng_values(calibrated.to_dict())}" in capsys.readouterr().out
    settings = json.loads(str(np.load(out / "samples.npz")["settings"]))
    assert settings["params"]["temperature"] == 0.45
    assert cli.main([*COMMANDS["sample"], "--calibration", "none", "--out", str(out), *tiny]) == 0
    assert (f"DNG default (library defaults (calibration turned off: --calibration none)): "
            f"{dng_values(DEFAULT.to_dict())}") in capsys.readouterr().out

    demo = tmp_path / "d"
    assert cli.main([*COMMANDS["demo"], "--calibration", str(path), "--out", str(demo), *tiny]) == 0
    report = json.loads((demo / "report.json").read_text())
    assert report["dng_settings_from"] == f"the calibration file {path}"
    assert {k: report["methods"]["dng"]["params"][k] for k in ("temperature", "prior")} == {"temperature": 0.45,
                                                                                           "prior": 0.2}
    assert f"(the calibration file {path})" in (demo / "report.md").read_text()


def _cells(out):
    return {p.stem: p.read_bytes() for p in (out / "cells").glob("*.json")}


def test_class_removal_sweep_recomputes_only_dng_cells_when_the_calibration_changes(tiny, tmp_path, capsys):
    gen = _generator(tiny)
    models.save_calibration(models.calibration_path(gen), _fits(0.7), [1, 3], {"p_max": 0.9})
    out = tmp_path / "sweep"
    argv = ["bench", "class-removal", "--classes", "Dress", "--methods", "none,np,dng", "--np-scales", "1",
            "--dng-lam0", "1", "--num-images", "4", "--steps", "2", "--out", str(out), *tiny]
    assert cli.main(argv) == 0  # the calibration beside the generator
    first = _cells(out)
    assert json.loads(first["class3-dng-default-lam0=1"])["row"]["params"]["temperature"] == 0.7
    assert json.loads((out / "calibration.json").read_text()) == {
        "file": None, "values": {"concepts": ["Trouser", "Dress"], "priors": [0.05, 0.2], "temperature": 0.7,
                                 "offset": 0.002, "p_max": 0.9}}
    capsys.readouterr()
    path = _for_generator(tiny, tmp_path / "c.json", temperature=0.3)
    assert cli.main([*argv, "--calibration", str(path)]) == 0
    assert f"the calibration changed (the calibration file {path} now): recomputing class3-dng-default-lam0=1" in \
        capsys.readouterr().out
    second = _cells(out)
    assert json.loads(second["class3-dng-default-lam0=1"])["row"]["params"]["temperature"] == 0.3
    assert {k: v for k, v in second.items() if k != "class3-dng-default-lam0=1"} == \
        {k: v for k, v in first.items() if k != "class3-dng-default-lam0=1"}  # none and NP: kept as they were
    assert json.loads((out / "calibration.json").read_text())["file"] == str(path)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["params"].get("temperature") for r in rows] == [None, None, 0.3]

    # The same values again: nothing to recompute.
    assert cli.main([*argv, "--calibration", str(path)]) == 0
    assert "recomputing" not in capsys.readouterr().out and _cells(out) == second
    # Uncalibrated: the preset's own settings.
    assert cli.main([*argv, "--calibration", "none"]) == 0
    row = json.loads(_cells(out)["class3-dng-default-lam0=1"])["row"]
    assert row["params"] == {"preset": "default", "set": {"lam0": 1.0}, **DEFAULT.to_dict()}
    # A change that is no calibration's is still refused, not recomputed: nothing is removed then.
    np_cell = json.loads(_cells(out)["class3-np-1.0"])
    np_cell["row"]["params"]["scale"] = 9.0
    (out / "cells" / "class3-np-1.0.json").write_text(json.dumps(np_cell))
    before = _cells(out)
    assert cli.main([*argv, "--calibration", str(path)]) == 2
    assert "class3-np-1.0 with other parameters" in capsys.readouterr().err
    assert _cells(out) == before


def test_prompted_sweep_takes_the_file_and_recomputes_its_dng_cells(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [*COMMANDS["prompted"], "--batch-size", "4", "--out", str(out), *tiny]
    path = _for_generator(tiny, tmp_path / "c.json", temperature=0.3)
    assert cli.main([*argv, "--calibration", str(path)]) == 0
    first = _cells(out)
    dng = next(k for k in first if "dng" in k)
    assert json.loads(first[dng])["row"]["params"]["temperature"] == 0.3
    capsys.readouterr()
    assert cli.main([*argv, "--calibration", "none"]) == 0
    assert f"recomputing {dng}" in capsys.readouterr().out
    second = _cells(out)
    assert json.loads(second[dng])["row"]["params"]["temperature"] == DEFAULT.temperature
    assert {k: v for k, v in second.items() if k != dng} == {k: v for k, v in first.items() if k != dng}


# -- the pipelines and `dng sd` --------------------------------------------------------------------------------

CALL = dict(prompt="a cat", num_inference_steps=3, height=16, width=16, output_type="np")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion folder, as `dng sd --model` takes one."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    StableDiffusionPipeline(**sd_components(tmp_path_factory.mktemp("parts"))).save_pretrained(folder)
    return folder


def _warnings(caplog):
    return [r.message for r in caplog.records if r.name == "dng.calibration"]


def _pipe(folder):
    pipe = StableDiffusionDNGPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd(argv):
    parser = argparse.ArgumentParser()
    sd_command.register({"top": parser.add_subparsers()})
    args = parser.parse_args(["sd", *argv])
    return args, args.func


def test_python_path_sd_command_and_pipeline_get_the_same_settings_from_a_file(sd_folder, tmp_path, capsys, caplog):
    made = {"kind": "diffusers", "path": str(sd_folder), "weights_sha256": None}
    path = write_calibration(tmp_path / "c.json", concepts=("red", "cat"), priors=(0.02, 0.3), temperature=0.25,
                             offset=0.5, p_max=0.9, model=made)
    python = config_from_argument(ModelCalibration.read(path)[0], ["red"])
    assert python == DEFAULT.replace(prior=0.02, temperature=0.25, offset=0.5, p_max=0.9)
    assert config_from_argument(path, ["red"]) == config_from_argument(str(path), ["red"]) == python
    assert guidance_rule(None, str(path), 7.5, ["red"]).config == python

    pipe = _pipe(sd_folder)
    seed = 0
    with caplog.at_level(logging.WARNING, logger="dng.calibration"):
        by_file = pipe(**CALL, negative_concepts=["red"], dng=str(path), return_trace=True,
                       generator=torch.Generator().manual_seed(seed))
    assert not _warnings(caplog)  # made for this folder
    by_config = pipe(**CALL, negative_concepts=["red"], dng=python, return_trace=True,
                     generator=torch.Generator().manual_seed(seed))
    np.testing.assert_array_equal(by_file.images, by_config.images)
    torch.testing.assert_close(by_file.trace.p, by_config.trace.p, rtol=0, atol=0)
    torch.testing.assert_close(by_file.trace.p[0], torch.tensor([[0.02]]))

    out = tmp_path / "out"
    argv = ["--model", str(sd_folder), "--prompt", CALL["prompt"], "--negative", "red", "--steps", "3", "--height",
            "16", "--width", "16", "--seed", str(seed), "--out", str(out), "--calibration", str(path)]
    args, run = _sd(argv)
    rule, dng, source = sd_command._dng(args)
    assert (rule.config, dng, source) == (python, str(path), f"the calibration file {path}")  # the file goes as is
    assert run(args) == 0
    assert f"DNG settings from the calibration file {path}: {dng_values(python.to_dict())}" in capsys.readouterr().out
    first = [line.split(",") for line in (out / "trace.csv").read_text().splitlines()]
    p = first[0].index("p")
    assert float(first[1][p]) == pytest.approx(float(by_file.trace.p[0, 0, 0]))
    # --dng over the file: the same calibration, with the change.
    args, _ = _sd([*argv, "--dng", "lam0=2"])
    assert sd_command._dng(args)[0].config == python.replace(lam0=2.0)
    # The strict preset takes the file too; a published one runs as published.
    args, _ = _sd([*argv, "--dng-preset", "strict"])
    assert sd_command._dng(args)[0].config == python.replace(lam0=4.0)
    args, _ = _sd([*argv, "--dng-preset", "paper-sd"])
    assert sd_command._dng(args)[0].config == PRESETS["paper-sd"].replace(mode="independent")
    # --calibration none: the library default.
    args, _ = _sd([*argv[:-1], "none"])
    assert sd_command._dng(args)[0].config == DEFAULT


def test_the_pipeline_warns_of_a_file_made_for_another_model(sd_folder, tmp_path, caplog):
    other = {"kind": "diffusers", "path": "/models/sdxl-base", "weights_sha256": None}
    path = write_calibration(tmp_path / "c.json", concepts=("red",), priors=(0.02,), model=other)
    with caplog.at_level(logging.WARNING, logger="dng.calibration"):
        out = _pipe(sd_folder)(**CALL, negative_concepts=["red"], dng=path, return_trace=True)
    assert _warnings(caplog) == [
        f"{path} was made for the model /models/sdxl-base, not {sd_folder}; applying it anyway (rerun `dng calibrate` "
        "for this model to fit its own)"]
    torch.testing.assert_close(out.trace.p[0], torch.tensor([[0.02]]))


@pytest.mark.parametrize("dng,match", [
    ("strong", r"unknown DNG preset 'strong'; choose one of default, .*, or give the path of a calibration file"),
    ("nowhere/c.json", r"calibration file nowhere/c\.json does not exist"),
])
def test_dng_argument_errors_name_presets_and_files(dng, match):
    with pytest.raises(ConfigError, match=match):
        config_from_argument(dng, ["red"])


def test_sd_command_refuses_calibration_without_dng_and_missing_files_before_loading(sd_folder, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(StableDiffusionDNGPipeline, "from_pretrained", None)  # nothing may load
    base = ["--model", str(sd_folder), "--prompt", "a", "--negative", "red", "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="--calibration applies to --method dng only, not np"):
        sd_command.run(_sd([*base, "--method", "np", "--calibration", "c.json"])[0])
    with pytest.raises(ConfigError, match="--calibration: calibration file missing.json does not exist"):
        sd_command.run(_sd([*base, "--calibration", "missing.json"])[0])
