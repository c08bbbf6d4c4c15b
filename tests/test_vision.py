"""Fashion-MNIST reader, model files, and a few resumable training steps of each model on tiny data."""

import argparse
import gzip

import numpy as np
import pytest
import torch

from dng.defaults import TRAIN_GENERATOR
from dng.errors import ConfigError
from dng.vision import batches, checkpoint, data, models, train
from dng.vision.export import export

TINY_UNET = dict(models.GENERATOR_CONFIG, block_out_channels=[8, 8, 16], norm_num_groups=8, attention_head_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x0800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist(tmp_path):
    """A tiny Fashion-MNIST directory: 64 train and 40 test images with cycling labels."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 40)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_reads_idx_files_from_env_dir(fmnist, monkeypatch):
    monkeypatch.setenv("DNG_DATA_DIR", str(fmnist))
    images, labels = data.load_split("train")
    assert images.shape == (64, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(64)]
    x, y = data.load_tensors("test")
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32
    raw, _ = data.load_split("test")
    assert torch.allclose(x[3, 0], torch.from_numpy(raw[3] / 127.5 - 1).float(), atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DNG_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("train")


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip", "shape"])
def test_corrupt_files_raise_config_error(fmnist, damage):
    path = fmnist / "train-images-idx3-ubyte.gz"
    if damage == "magic":
        write_idx(path, np.zeros((64, 28, 28)), magic=0x0801)
    elif damage == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:-10]))
    elif damage == "not_gzip":
        path.write_bytes(b"not a gzip file at all")
    else:
        write_idx(path, np.zeros((64, 14, 56)))
    with pytest.raises(ConfigError, match="DNG_DATA_DIR"):
        data.load_split("train", fmnist)


def test_class_names():
    assert len(data.CLASS_NAMES) == 10 and data.CLASS_NAMES[0] == "T-shirt/top" and data.CLASS_NAMES[9] == "Ankle boot"


def test_model_files_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = models.make_classifier().eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    models.save_model(clf, tmp_path / "c.safetensors", "classifier", models.CLASSIFIER_CONFIG, {"note": "t"})
    assert torch.equal(models.load_classifier(tmp_path / "c.safetensors")(x), clf(x))
    assert clf.features(x).shape == (5, models.CLASSIFIER_CONFIG["features"])

    gen = models.make_generator(TINY_UNET).eval()
    models.save_model(gen, tmp_path / "g.safetensors", "generator", TINY_UNET, {}, half=True)
    loaded = models.load_generator(tmp_path / "g.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32
    t, labels = torch.tensor([10, 500, 900, 999, 0]), torch.tensor([0, 3, 9, models.NULL_LABEL, 5])
    with torch.no_grad():
        expected, got = gen(x, t, class_labels=labels).sample, loaded(x, t, class_labels=labels).sample
    assert torch.allclose(expected, got, atol=1e-2) and not torch.equal(expected, got)  # fp16 rounding only

    with pytest.raises(ConfigError, match="holds a 'generator' model"):
        models.load_classifier(tmp_path / "g.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        models.load_generator(tmp_path / "bad.safetensors")


def test_model_files_that_do_not_fit_their_config_are_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    models.save_model(models.make_generator(TINY_UNET), tmp_path / "g.safetensors", "generator",
                      models.GENERATOR_CONFIG, {})
    with pytest.raises(ConfigError, match=r"g.safetensors holds no generator its config describes \(Missing key"):
        models.load_generator(tmp_path / "g.safetensors")
    for name, config in (("json", "{"), ("list", "[1]"), ("keys", json.dumps({"chanels": [8]}))):
        save_file({"w": torch.zeros(1)}, tmp_path / f"{name}.safetensors", {"kind": "classifier", "config": config})
        with pytest.raises(ConfigError, match=f"{name}.safetensors .*export it again"):
            models.load_classifier(tmp_path / f"{name}.safetensors")


def test_default_weights_missing_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="dng train export"):
        models.default_weights("generator")
    (tmp_path / "classifier.safetensors").write_bytes(b"")
    assert models.default_weights("classifier") == tmp_path / "classifier.safetensors"


def test_generator_training_resumes_exactly(fmnist, tmp_path):
    common = dict(batch_size=16, seed=3, config=TINY_UNET, data_root=fmnist, progress=False, log_every=1)
    first = train.train_generator(tmp_path / "a", steps=2, **common)
    assert first["step"] == 2
    resumed = train.train_generator(tmp_path / "a", steps=4, **common)
    straight = train.train_generator(tmp_path / "b", steps=4, **common)
    assert resumed["step"] == straight["step"] == 4 and len(resumed["commands"]) == 2
    for module in ("model", "ema"):
        a, _ = checkpoint.read_checkpoint(tmp_path / "a", module)
        b, _ = checkpoint.read_checkpoint(tmp_path / "b", module)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    init = models.make_generator(TINY_UNET).state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)  # it did train
    steps = [line.split(",")[0] for line in (tmp_path / "a" / checkpoint.LOG).read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train.train_generator(tmp_path / "a", steps=5, resume=False, **common)

    weights = tmp_path / "weights"
    path = export(tmp_path / "a", "generator", weights_dir=weights, data_root=fmnist).weights
    card = (weights / "generator.md").read_text()
    assert "steps: 4" in card and "seed: 3" in card and "test_denoising_loss" in card
    assert "# steps 0-2\n" in card and "# steps 2-4\n" in card  # which command trained which steps
    assert list(models.load_generator(path).config.block_out_channels) == [8, 8, 16]


def test_generator_run_starts_from_exported_weights(fmnist, tmp_path):
    """--init: a new run whose model and EMA start as the given weights (lr 0 keeps them there)."""
    common = dict(batch_size=16, seed=3, data_root=fmnist, progress=False)
    train.train_generator(tmp_path / "a", steps=2, config=TINY_UNET, **common)
    weights = export(tmp_path / "a", "generator", weights_dir=tmp_path / "w", data_root=fmnist).weights
    start, config, _ = models.read_model_file(weights, "generator")
    scalars = train.train_generator(tmp_path / "b", steps=1, lr=0.0, init=weights, **common)
    assert scalars["config"] == config and scalars["init"]["path"] == str(weights)
    for module in ("model", "ema"):
        state, _ = checkpoint.read_checkpoint(tmp_path / "b", module)
        assert all(torch.equal(state[k], start[k]) for k in start)
    first_card = weights.with_suffix(".md").read_text()
    # Exported over the weights it started from, as when the shipped generator is trained on: the history stays.
    card = export(tmp_path / "b", "generator", weights_dir=tmp_path / "w", data_root=fmnist, force=True)
    card = card.card.read_text()
    assert f"started from: {weights}" in card and "in all, with earlier training: 3 steps" in card
    earlier = card.split("## Earlier training")[1]
    assert "2 steps (batch 16, seed 3)" in earlier and first_card.split("```")[1].strip() in earlier
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train.train_generator(tmp_path / "b", steps=2, init=weights, **common)
    with pytest.raises(ConfigError, match="another architecture"):
        train.train_generator(tmp_path / "c", steps=1, init=weights, config=models.GENERATOR_CONFIG, **common)


def test_resume_keeps_the_runs_hyperparameters_unless_given(fmnist, tmp_path):
    common = dict(config=TINY_UNET, data_root=fmnist, progress=False)
    train.train_generator(tmp_path / "r", steps=1, batch_size=16, seed=5, label_dropout=0.5, **common)
    kept = train.train_generator(tmp_path / "r", steps=2, data_root=fmnist, progress=False)
    assert (kept["batch_size"], kept["seed"], kept["label_dropout"], kept["lr"]) == (16, 5, 0.5, 5e-4)
    assert kept["config"] == TINY_UNET  # not the library's default architecture, which would not load
    changed = train.train_generator(tmp_path / "r", steps=3, label_dropout=0.3, **common)
    assert changed["label_dropout"] == 0.3 and checkpoint.read_scalars(tmp_path / "r")["label_dropout"] == 0.3
    new = train.train_generator(tmp_path / "n", steps=1, batch_size=16, **common)
    assert new["label_dropout"] == TRAIN_GENERATOR["label_dropout"] and new["seed"] == 0


def test_sigterm_stops_generator_training_at_a_checkpoint(fmnist, tmp_path, monkeypatch):
    import os
    import signal

    calls = []
    loss = train.denoising_loss

    def loss_then_sigterm(*args):
        calls.append(1)
        if len(calls) == 3:  # a scheduler stopping the background job during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)

    monkeypatch.setattr(train, "denoising_loss", loss_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train.train_generator(tmp_path / "run", steps=10, batch_size=16, config=TINY_UNET, data_root=fmnist,
                              progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    _, scalars = checkpoint.read_checkpoint(tmp_path / "run", "ema")
    assert 2 <= scalars["step"] <= 3


def test_classifier_training_resumes_and_exports(fmnist, tmp_path):
    common = dict(batch_size=16, seed=1, data_root=fmnist, progress=False)
    first = train.train_classifier(tmp_path / "c", epochs=1, **common)
    assert first["step"] == 4 and 0 <= first["test_accuracy"] <= 1
    second = train.train_classifier(tmp_path / "c", epochs=2, **common)
    assert second["step"] == 8
    epochs = [line.split(",")[1] for line in (tmp_path / "c" / checkpoint.LOG).read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]
    path = export(
        tmp_path / "c", "classifier", weights_dir=tmp_path / "w", data_root=fmnist, metrics={"note": "extra"}
    ).weights
    assert isinstance(models.load_classifier(path), models.Classifier)
    card = (tmp_path / "w" / "classifier.md").read_text()
    assert "test_accuracy" in card and "- note: extra" in card


def test_augment_keeps_shape_and_moves_pixels():
    x = torch.zeros(8, 1, 28, 28) - 1
    x[:, :, 10:18, 4:9] = 1
    out = batches.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # shifts of 2 px keep the blob in frame
    assert not torch.equal(out, x)


def test_cli_parses_train_commands(tmp_path):
    from dng.commands import train as command

    top = argparse.ArgumentParser().add_subparsers(dest="model")
    command.register({"train": top})
    args = top._name_parser_map["generator"].parse_args(["--out", str(tmp_path), "--minutes", "2", "--threads", "1"])
    assert args.func is command.run_generator and args.minutes == 2 and args.steps is None and args.resume
    args = top._name_parser_map["export"].parse_args(["--run", str(tmp_path), "--kind", "classifier"])
    assert args.func is command.run_export


@pytest.mark.parametrize("argv, message", [
    (["generator", "--steps", "-1"], "--steps -1: give an integer of at least 1"),
    (["generator", "--minutes", "nan"], "--minutes nan: give a finite number above 0"),
    (["generator", "--steps", "2", "--label-dropout", "1.5"], "--label-dropout 1.5: give a finite number of at least 0 "
                                                              "and at most 1"),
    (["generator", "--steps", "2", "--ema-decay", "-0.1"], "--ema-decay -0.1"),
    (["generator", "--steps", "2", "--warmup-steps", "-1"], "--warmup-steps -1"),
    (["generator", "--steps", "2", "--lr", "nan"], "--lr nan"),
    (["generator", "--steps", "2", "--batch-size", "0"], "--batch-size 0"),
    (["generator", "--steps", "2", "--threads", "-2"], "--threads -2"),
    (["generator", "--steps", "2", "--checkpoint-minutes", "-1"], "--checkpoint-minutes -1"),
    (["classifier", "--epochs", "-1"], "--epochs -1: give an integer of at least 1"),
    (["classifier", "--lr", "nan"], "--lr nan"),
    (["classifier", "--batch-size", "0"], "--batch-size 0"),
    (["classifier", "--threads", "-2"], "--threads -2"),
])
def test_bad_training_options_are_refused_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    from dng import cli

    monkeypatch.setenv("DNG_DATA_DIR", str(tmp_path / "no-data"))  # reading data first would fail differently
    run = tmp_path / "run"
    assert cli.main(["train", *argv, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--out .* is a file: give a directory"):
        train.train_classifier(tmp_path / "file", epochs=1)
    with pytest.raises(ConfigError, match="--out .* cannot be created"):
        train.train_classifier(tmp_path / "file" / "run", epochs=1)


@pytest.mark.parametrize("bad, message", [({"log_every": 0}, "log_every 0"), ({"limit": 0}, "limit 0"),
                                          ({"steps": 2.5}, "--steps 2.5"), ({"batch_size": True}, "--batch-size True")])
def test_bad_training_arguments_from_python(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train.train_generator(tmp_path / "run", **{"steps": 2, **bad})
    assert not (tmp_path / "run").exists()


def test_runs_record_the_command_line_or_the_python_call(fmnist, tmp_path, monkeypatch):
    from dng import cli

    monkeypatch.setenv("DNG_DATA_DIR", str(fmnist))
    run = tmp_path / "cli"
    assert cli.main(["train", "classifier", "--out", str(run), "--epochs", "1", "--batch-size", "32",
                     "--no-progress"]) == 0
    assert checkpoint.read_scalars(run)["commands"] == [f"dng train classifier --out {run} --epochs 1 --batch-size 32"]
    train.train_classifier(tmp_path / "py", epochs=1, batch_size=32, data_root=fmnist, progress=False)
    assert checkpoint.read_scalars(tmp_path / "py")["commands"] == [
        f"dng.vision.train.train_classifier(out={str(tmp_path / 'py')!r}, epochs=1, batch_size=32, "
        f"data_root={str(fmnist)!r})"]


def _fits(temperature=0.3):
    from dng.calibration import Calibration

    fit = Calibration(priors=[0.05, 0.2], temperature=temperature, offset=0.002, nll=0.4, baseline_nll=0.5, auc={},
                      positives=[10, 10], samples=100)
    return {"all": fit}


def test_export_refuses_another_kind_and_existing_weights_and_keeps_what_it_replaces(fmnist, tmp_path, monkeypatch,
                                                                                      capsys):
    from dng import cli

    monkeypatch.setenv("DNG_DATA_DIR", str(fmnist))
    common = dict(steps=1, batch_size=16, config=TINY_UNET, data_root=fmnist, progress=False)
    train.train_generator(tmp_path / "a", **common)
    train.train_generator(tmp_path / "b", seed=1, **common)
    w = tmp_path / "w"
    argv = ["train", "export", "--run", str(tmp_path / "b"), "--weights-dir", str(w)]
    assert cli.main([*argv, "--kind", "classifier"]) == 2
    assert "is a generator run: export it with --kind generator" in capsys.readouterr().err and not w.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--weights-dir .* is a file"):
        export(tmp_path / "b", "generator", weights_dir=tmp_path / "file", data_root=fmnist)

    first = export(tmp_path / "a", "generator", weights_dir=w, data_root=fmnist)
    assert first.backups == [] and first.stale_calibration is None
    old = first.weights.read_bytes()
    calibration = models.save_calibration(models.calibration_path(first.weights), _fits(), [1, 3], {"p_max": 0.9})
    assert cli.main([*argv, "--kind", "generator"]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err and first.weights.read_bytes() == old

    # The same weights again (a new card): their calibration stays, the replaced files are kept.
    again = export(tmp_path / "a", "generator", weights_dir=w, data_root=fmnist, force=True)
    assert again.stale_calibration is None and models.load_calibration(first.weights).temperature == 0.3
    assert [p.read_bytes() for p in again.backups] == [old, (w / "generator.md").read_bytes()]

    assert cli.main([*argv, "--kind", "generator", "--force"]) == 0
    out = capsys.readouterr().out
    assert "kept the replaced files" in out and "moved the calibration fitted to the old weights" in out
    assert not calibration.exists() and len(list(w.glob("generator.calibration.json.*.bak"))) == 1
    backups = list(w.glob("generator.safetensors.*.bak"))
    assert len(backups) == 2 and again.backups[0] in backups  # a second backup in the same second is numbered
    state, _ = checkpoint.read_checkpoint(tmp_path / "b", "ema")
    assert all(torch.allclose(state[k], v, atol=1e-3) for k, v in models.read_model_file(first.weights,
                                                                                           "generator")[0].items())


def test_a_calibration_is_applied_to_the_weights_it_was_fitted_to_only(tmp_path):
    import json
    import warnings

    gen = tmp_path / "g.safetensors"
    model = models.make_generator(TINY_UNET)
    models.save_model(model, gen, "generator", TINY_UNET, {})
    path = models.save_calibration(models.calibration_path(gen), _fits(), [1, 3], {"p_max": 0.9})
    models.save_model(model, gen, "generator", TINY_UNET, {"note": "a new card"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = models.load_calibration(gen)
        assert (cal.prior_of("Trouser"), cal.prior_of("Dress"), cal.prior_of("Bag")) == (0.05, 0.2, None)

    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    models.save_model(model, gen, "generator", TINY_UNET, {})
    with pytest.warns(UserWarning, match=r"fitted to other weights, so it is not applied .* `dng calibrate`"):
        assert models.load_calibration(gen) is None
    entry = json.loads(path.read_text())
    del entry["generator_sha256"]
    path.write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="records no weights it was fitted to"):
        assert models.load_calibration(gen) is None
    with pytest.raises(ConfigError, match="name the weights it was fitted to"):
        models.save_calibration(tmp_path / "x.calibration.json", _fits(), [1, 3], {"p_max": 0.9})


def test_the_shipped_calibration_is_that_of_the_shipped_generator():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.load_calibration() is not None
