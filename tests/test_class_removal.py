"""Class-removal bench, `dng sample` and `dng demo` end to end on tiny random models and tiny data."""

import csv
import gzip
import json
import math

import numpy as np
import pytest
import torch

from dng import calibration, cli
from dng.bench import class_removal
from dng.bench.table import setting_label
from dng.commands.demo import DEFAULT_REMOVE
from dng.config import PRESETS
from dng.errors import ConfigError
from dng.schedulers import SAMPLERS
from dng.vision import generate, models
from dng.vision.branches import ClassBranches, ClassPosterior
from dng.vision.data import parse_class, parse_classes
from dng.vision.images import classify

TINY_UNET = dict(models.GENERATOR_CONFIG, block_out_channels=[8, 8, 16], norm_num_groups=8, attention_head_dim=8)
TINY_CLASSIFIER = dict(channels=[4, 8, 8], convs=[1, 1, 1], features=16, num_classes=10, dropout=0.0)
ROW_KEYS = {"class", "method", "params", "forbidden_rate", "class_kl", "fid", "precision", "recall", "artifact_rate",
            "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path, array: np.ndarray) -> None:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Tiny test split (40 images) in DNG_DATA_DIR and random tiny generator/classifier files."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    monkeypatch.setenv("DNG_DATA_DIR", str(tmp_path))
    torch.manual_seed(0)
    gen, clf = tmp_path / "g.safetensors", tmp_path / "c.safetensors"
    models.save_model(models.make_generator(TINY_UNET), gen, "generator", TINY_UNET, {})
    models.save_model(models.make_classifier(TINY_CLASSIFIER), clf, "classifier", TINY_CLASSIFIER, {})
    return ["--generator", str(gen), "--classifier", str(clf), "--no-progress"]


def _bench(tiny, out, classes="1", methods="none,dng", steps="3", dng_lam0="1", dtype="float32", extra=()):
    return cli.main(["bench", "class-removal", "--classes", classes, "--methods", methods, "--num-images", "16",
                     "--steps", steps, "--dng-lam0", dng_lam0, "--dtype", dtype, "--out", str(out), *extra,
                     *tiny])


def test_bench_writes_rows_csv_figures_and_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    assert _bench(tiny, out) == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["class"], r["method"]) for r in rows] == [(1, "none"), (1, "dng")]
    for r in rows:
        assert ROW_KEYS <= set(r) and 0 <= r["forbidden_rate"] <= 1 and r["class_kl"] >= 0 and r["fid"] >= 0
        assert 0 <= r["artifact_rate"] <= 1
    assert rows[1]["params"]["prior"] == 0.1
    counts = {c["row"]["method"]: c["counts"] for c in class_removal.load_cells(out)}
    assert rows[1]["unguided_kl"] == pytest.approx(class_removal.unguided_kl(counts["dng"], counts["none"], 1))
    assert len((out / "results.csv").read_text().splitlines()) == 3
    figures = out / "figures"
    for name in ("tradeoff_class_kl.png", "tradeoff_unguided_kl.png", "tradeoff_fid.png", "histograms/class1.png",
                 "grids/class1-none.png", "grids/class1-dng-default-lam0=1.png",
                 "trajectories/class1-dng-default-lam0=1.png"):
        assert (figures / name).read_bytes()[:4] == b"\x89PNG", name

    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **k: calls.append(k["guidance"]) or real(*a, **k))
    assert _bench(tiny, out) == 0  # every cell is stored: nothing is sampled again
    assert calls == [] and json.loads((out / "results.json").read_text())["rows"] == rows
    assert _bench(tiny, out, classes="Trouser,Dress") == 0  # the unguided samples are reused for class 3
    assert len(calls) == 1 and calls[0] is not None
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["class"], r["method"]) for r in rows] == [(1, "none"), (1, "dng"), (3, "none"), (3, "dng")]
    assert rows[0]["seconds"] == rows[2]["seconds"]

    assert _bench(tiny, out, steps="4") == 2  # other settings in the same folder are refused

    assert _bench(tiny, out, classes="Trouser,Dress", dng_lam0="3") == 0  # a new scale is a new cell per class
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["class"], r["method"], r["params"]["lam0"]) for r in rows if r["method"] == "dng"] == [
        (1, "dng", 1.0), (1, "dng", 3.0), (3, "dng", 1.0), (3, "dng", 3.0)]
    assert {r["params"]["prior"] for r in rows if r["method"] == "dng"} == {0.1}
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [setting_label(s["method"], s["params"]) for s in summary] == [
        "none", "dng default lam0=1", "dng default lam0=3"]


def test_sweep_is_keyed_on_the_weights_not_the_card(tiny, tmp_path):
    out, gen = tmp_path / "sweep", tmp_path / "g.safetensors"
    assert _bench(tiny, out, methods="none") == 0
    model = models.load_generator(gen)
    models.save_model(model, gen, "generator", TINY_UNET, {"note": "recalibrated"})
    assert _bench(tiny, out, methods="none") == 0  # the same tensors with a new card: the sweep goes on
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    models.save_model(model, gen, "generator", TINY_UNET, {"note": "recalibrated"})
    assert _bench(tiny, out, methods="none") == 2  # other weights: refused
    models.save_model(model, gen, "generator", TINY_UNET, {})
    assert _bench(tiny, out, methods="none", dtype="bfloat16") == 2  # and another dtype


def test_bfloat16_sweep(tiny, tmp_path):
    out = tmp_path / "sweep"
    assert _bench(tiny, out, dtype="bfloat16") == 0
    assert json.loads((out / "settings.json").read_text())["dtype"] == "bfloat16"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "dng"] and 0 <= rows[1]["forbidden_rate"] <= 1


def test_dng_cells_are_named_by_preset_and_what_the_user_set(tiny, tmp_path):
    out = tmp_path / "sweep"
    assert _bench(tiny, out, dng_lam0="2") == 0
    assert _bench(tiny, out, dng_lam0="2", extra=("--dng", "late_boost=4", "--dng", "boost_sigma=1")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    dng = {setting_label(r["method"], r["params"]): r["params"] for r in rows if r["method"] == "dng"}
    assert set(dng) == {"dng default lam0=2", "dng default late_boost=4 boost_sigma=1 lam0=2"}
    for key, boost, below in (("class1-dng-default-lam0=2", PRESETS["default"].late_boost,
                               PRESETS["default"].boost_sigma),
                              ("class1-dng-default-late_boost=4-boost_sigma=1-lam0=2", 4.0, 1.0)):
        with np.load(out / "cells" / f"{key}.npz") as f:
            odds = f["p"] / (1 - f["p"])
            lam0 = np.where(f["sigma"] < below, 2.0 * boost, 2.0)[:, None]
            np.testing.assert_allclose(f["scale"], lam0 * odds, rtol=1e-5)


def test_summary_compares_settings_on_the_same_classes():
    def row(k, method, fr):
        return {"class": k, "method": method, "params": {"scale": 1.0} if method == "np" else {},
                **{m: fr for m in class_removal.METRICS}}

    rows = [row(1, "none", 0.2), row(1, "np", 0.0), row(3, "none", 0.4)]  # class 3's np cell is not done yet
    summary = {s["method"]: s for s in class_removal.summarize(class_removal.TABLE.comparable(rows))}
    assert summary["none"]["forbidden_rate"] == 0.2 and summary["none"]["classes"] == 1


def test_cells_stored_before_the_artifact_rate_still_load_and_summarise(tmp_path, monkeypatch):
    from dng import plots

    for figure in ("removal_tradeoff", "class_histogram"):  # the figures do not read it: spare the test their drawing
        monkeypatch.setattr(plots, figure, lambda summary, path, *args: path)
    cells = tmp_path / "cells"
    cells.mkdir()
    counts = [0, 10, 10, 0, 0, 0, 0, 0, 0, 0]
    measures = {"forbidden_rate": 0.0, "class_kl": 0.1, "fid": 2.0, "precision": 0.5, "recall": 0.5, "seconds": 1.0}
    old = {"class": 1, "method": "np", "params": {"scale": 1.0}, **measures}
    new = {"class": 1, "method": "none", "params": {}, **measures, "artifact_rate": 0.05}
    for row in (old, new):
        key = class_removal.cell_key(1, row["method"], row["params"])
        (cells / f"{key}.json").write_text(json.dumps({"row": row, "counts": counts}))
        np.savez(cells / f"{key}.npz", grid=np.zeros((4, 28, 28), np.uint8))
    class_removal.write_results(tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["artifact_rate"]) for r in result["rows"]] == [("none", 0.05), ("np", None)]
    assert [(s["method"], s["artifact_rate"]) for s in result["summary"]] == [("none", 0.05), ("np", None)]
    table = (tmp_path / "summary.md").read_text().splitlines()
    column = table[0].split(" | ").index("artifacts")
    assert [line.split(" | ")[column] for line in table[2:]] == ["0.0500 ± 0.0000", "-"]
    with open(tmp_path / "results.csv", newline="") as f:
        assert [r["artifact_rate"] for r in csv.DictReader(f)] == ["0.05", ""]


def test_unguided_kl_by_hand():
    # Class 0 removed; the unguided cell made 20 of class 1 and 10 of class 2 among the kept classes.
    unguided = [7, 20, 10, 0, 0, 0, 0, 0, 0, 0]
    cell = [1, 10, 20, 0, 0, 0, 0, 0, 0, 0]
    # Both sides get 0.5 per kept class over the cell's 30 kept samples: 34.5 in all; the empty classes cancel.
    smoothed = 30 + 9 * 0.5
    expected = 20.5 / smoothed * math.log(20.5 / 10.5) + 10.5 / smoothed * math.log(10.5 / 20.5)
    assert class_removal.unguided_kl(cell, unguided, 0) == pytest.approx(expected, rel=1e-12)
    # The removed class's own count does not enter: a perfect remover of this generator keeps the kept shares.
    perfect = class_removal.unguided_kl([0, 2000, 1000, 0, 0, 0, 0, 0, 0, 0], [500, 2000, 1000, 0, 0, 0, 0, 0, 0, 0], 0)
    assert perfect == pytest.approx(0, abs=1e-15) and expected > 0.15


def test_summary_leaves_unguided_kl_out_without_an_unguided_cell(tiny, tmp_path):
    out = tmp_path / "sweep"
    assert _bench(tiny, out, methods="dng") == 0
    result = json.loads((out / "results.json").read_text())
    assert result["rows"][0]["unguided_kl"] is None and result["summary"][0]["unguided_kl"] is None
    assert not (out / "figures" / "tradeoff_unguided_kl.png").exists()
    assert "| dng default lam0=1 | 1 | " in (out / "summary.md").read_text()
    assert _bench(tiny, out, methods="none") == 0  # the unguided cell, run later, fills it in
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["unguided_kl"] >= 0 for r in rows)


def test_settings_sort_by_method_then_strength():
    settings = [("dng", {"preset": "default", "set": {"lam0": 6.0}, "lam0": 6.0}), ("sld", {"preset": "max"}),
                ("np", {"scale": 2.0}), ("dng", {"preset": "default", "set": {}, "lam0": 1.0}),
                ("sld", {"preset": "weak"}), ("none", {}), ("np", {"scale": 0.5})]
    ordered = sorted(({"class": 1, "method": m, "params": p} for m, p in settings), key=class_removal.TABLE.order)
    assert [class_removal.TABLE.label(r) for r in ordered] == [
        "none", "np 0.5", "np 2.0", "sld weak", "sld max", "dng default", "dng default lam0=6"]


def _setting(method, forbidden, kl, fid=5.0, **params):
    return {"method": method, "params": params, "forbidden_rate": forbidden, "unguided_kl": kl, "fid": fid}


def test_matched_removal_pairs_each_np_and_sld_setting_with_the_least_damaging_dng_that_removes_as_much():
    summary = [_setting("none", 0.10, 0.0), _setting("np", 0.06, 0.02, scale=0.1),
               _setting("np", 0.01, 0.30, scale=1.0),
               _setting("np", 0.0, 0.90, scale=2.0), _setting("sld", 0.03, 0.05, preset="medium"),
               _setting("dng", 0.05, 0.004, 6.0, preset="default", set={"lam0": 1.0}, lam0=1.0),
               _setting("dng", 0.02, 0.010, 6.5, preset="default", set={"lam0": 2.0}, lam0=2.0),
               _setting("dng", 0.01, 0.050, 7.0, preset="default", set={"lam0": 4.0}, lam0=4.0),
               # Removes as much as lam0 4, with more damage: never the match.
               _setting("dng", 0.01, 0.080, 7.5, preset="default", set={"lam0": 8.0}, lam0=8.0)]
    matches = {m["setting"]: m for m in class_removal.matched_removal(summary)}
    assert list(matches) == ["np 0.1", "np 1.0", "np 2.0", "sld medium"]
    assert matches["np 0.1"]["dng"] == "dng default lam0=1" and matches["np 0.1"]["kl_ratio"] == pytest.approx(5.0)
    assert matches["np 1.0"]["dng"] == "dng default lam0=4" and matches["np 1.0"]["kl_ratio"] == pytest.approx(6.0)
    assert matches["np 1.0"]["dng_fid"] == 7.0 and matches["np 1.0"]["dng_forbidden_rate"] == 0.01
    assert matches["sld medium"]["dng"] == "dng default lam0=2"
    assert matches["np 2.0"]["dng"] is None and matches["np 2.0"]["kl_ratio"] is None  # no DNG setting gets to 0
    # DNG's frontier read at each setting's own forbidden rate: unguided (lam0 0) to lam0 1 for np 0.1 (0.004 at
    # 0.05, a fifth of the way from 0.05 towards 0.10), lam0 1 to 2 for sld medium; lam0 4, not 8, at 0.01.
    at = {k: m["dng_kl_at_equal_removal"] for k, m in matches.items()}
    assert at == pytest.approx({"np 0.1": 0.0032, "np 1.0": 0.05, "np 2.0": None, "sld medium": 0.008})
    assert matches["np 0.1"]["equal_removal_ratio"] == pytest.approx(6.25)
    assert matches["np 2.0"]["equal_removal_ratio"] is None
    text = class_removal.format_summary([{**s, "classes": 10, "by_group": {}, "degenerate": 0,
                                          **{m: s.get(m, 0.0) for m in class_removal.METRICS},
                                          **{f"{m}_std": 0.0 for m in class_removal.METRICS}} for s in summary])
    assert text.startswith("At matched removal")
    assert "| np 1.0 | 0.0100 | 0.3000 | 5.00 | dng default lam0=4 | 0.0100 | 0.0500 | 7.00 | 6.0x | 0.0500 | 6.0x |" \
        in text
    assert "| np 2.0 | 0.0000 | 0.9000 | 5.00 | no DNG setting removes as much | - | - | - | - | - | - |" in text
    # Without NP, SLD or DNG there is nothing to match: the table of every setting only.
    assert class_removal.format_summary([]).startswith("| setting |")


def test_generate_with_every_scheduler_and_cfg(tiny):
    unet = models.load_generator(tiny[1])
    noise = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in SAMPLERS:
        rule = generate.make_rule("dng", dng=PRESETS["default"].replace(mode="exclusive"))
        # A random UNet is no denoiser: DPM++'s x0 estimates carry its chain out of any data range.
        x, trace = generate.generate(unet, noise, scheduler=name, guidance=rule, negatives=[1, 2], steps=5, seed=0,
                                     positive=0, cfg_scale=2.0, chunk=2, max_rms=None)
        assert x.shape == noise.shape and x.abs().max() <= 1
        assert trace.p.shape == (5, 3, 2) and torch.isfinite(trace.scale).all()
    with pytest.raises(ConfigError, match="unknown scheduler"):
        models.generator_sampler("plms")


def test_bfloat16_runs_the_unet_in_bfloat16_and_returns_float32(tiny):
    unet = models.load_generator(tiny[1])
    x, t = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    full = ClassBranches(unet, [models.NULL_LABEL, 1])(x, t)
    half = ClassBranches(unet, [models.NULL_LABEL, 1], "bfloat16")(x, t)
    assert half.dtype == torch.float32 and half.shape == full.shape
    # bfloat16 keeps 8 bits of mantissa: close to float32, but not equal to it
    error = (half - full).abs().max() / full.abs().max()
    assert 0 < error < 0.05
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        ClassBranches(unet, [1], "float16")


def test_parse_class_by_name_or_index():
    assert parse_class("Trouser") == parse_class("1") == 1
    assert parse_class("ankle boot") == 9 and parse_class("t-shirt") == 0
    assert parse_classes("all") == list(range(10)) and parse_classes("3,7,3") == [3, 7]
    with pytest.raises(ConfigError, match="Trouser"):
        parse_class("Hat")


def test_sample_writes_grid_and_npz(tiny, tmp_path):
    out = tmp_path / "s"
    argv = ["sample", "--method", "dng", "--remove", "Trouser,3", "--class", "0", "--num-images", "5", "--steps", "2",
            "--dtype", "bfloat16"]
    assert cli.main([*argv, "--out", str(out), *tiny]) == 0
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (5, 28, 28) and f["images"].dtype == np.uint8
        assert f["labels"].shape == (5,) and f["removed"].tolist() == [1, 3]
    cfg = tmp_path / "cfg"  # no --remove: plain class-conditional sampling
    assert cli.main(["sample", "--class", "Bag", "--num-images", "2", "--steps", "2", "--out", str(cfg), *tiny]) == 0
    assert np.load(cfg / "samples.npz")["removed"].tolist() == []


def test_demo_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--num-images", "8", "--steps", "3", "--out", str(out), *tiny]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["removed_name"] == DEFAULT_REMOVE and list(report["methods"]) == ["none", "np", "dng"]
    assert report["methods"]["dng"]["params"]["preset"] == "strict" and report["methods"]["dng"]["params"]["lam0"] == 4
    assert report["methods"]["np"]["params"]["scale"] == 1
    assert all(ROW_KEYS - {"class", "method"} <= set(m) for m in report["methods"].values())
    for name in ("comparison.png", "dng_trajectories.png", "grid_none.png", "grid_np.png", "grid_dng.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| dng |" in (out / "report.md").read_text() and str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "class-removal", "--classes", "Hat", "--out", "x"], "unknown class 'Hat'"),
        (["bench", "class-removal", "--methods", "none,foo", "--out", "x"], "unknown method"),
        (["bench", "class-removal", "--scheduler", "plms", "--out", "x"], "unknown scheduler"),
        (["bench", "class-removal", "--dng-lam0", "1,x", "--out", "x"], "--dng-lam0 takes comma-separated"),
        (["bench", "class-removal", "--np-scales", "1,-2", "--out", "x"], "--np-scales must be a finite number >= 0"),
        (["bench", "class-removal", "--dng-lam0", "nan", "--out", "x"], "--dng-lam0 must be a finite number >= 0"),
        (["bench", "class-removal", "--dng-lam0", ",", "--out", "x"], "--dng-lam0 needs at least one scale"),
        (["sample", "--method", "foo", "--remove", "1", "--out", "x"], "unknown method 'foo'"),
        (["sample", "--method", "np", "--out", "x"], "needs --remove"),
        (["sample", "--remove", "1", "--class", "Trouser", "--out", "x"], "also removed"),
        (["demo", "--remove", "Hat"], "unknown class 'Hat'"),
        (["demo", "--dng", "lam0=-1"], "lam0 must be a finite number >= 0"),
        (["demo", "--dng", "strength=2"], "NAME one of lam0, prior"),
        (["demo", "--dng-preset", "strongest"], "unknown DNG preset"),
        (["demo", "--np-scale", "nan"], "--np-scale must be a finite number >= 0"),
        (["demo", "--dtype", "half"], "unknown dtype 'half'"),
        (["bench", "class-removal", "--dtype", "fp16", "--out", "x"], "unknown dtype 'fp16'"),
        (["bench", "class-removal", "--dng", "late_boost=-1", "--out", "x"], "--dng-preset / --dng"),
        (["demo", "--dng", "boost_sigma=x"], "'x' is not a number"),
        (["sample", "--remove", "1", "--dng", "late_boost=nan", "--out", "x"], "late_boost"),
    ],
)
def test_bad_inputs_say_what_to_fix(tiny, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, *tiny]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo"], ["sample", "--method", "none", "--out", "x"],
                                  ["bench", "class-removal", "--out", "x"]])
def test_missing_weights_say_how_to_make_them(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--no-progress"]) == 2
    assert "dng train export" in capsys.readouterr().err


def _calibration(temperature=0.3, offset=0.002, priors=(0.05, 0.2)):
    fit = calibration.Calibration(priors=list(priors), temperature=temperature, offset=offset, nll=0.4,
                                  baseline_nll=0.5, auc={}, positives=[10, 10], samples=100)
    return {"all": fit}


def test_calibration_sets_dng_on_every_sampler(tiny, tmp_path, capsys):
    gen = tiny[1]
    settings = {"scheduler": "ddpm", "steps": 3, "p_max": 0.9}
    models.save_calibration(models.calibration_path(gen), _calibration(), [1, 3], settings)
    cal = models.load_calibration(gen)
    assert models.load_generator(gen).dng_calibration == cal  # the calibration travels with the model
    default = PRESETS["default"]
    assert models.dng_config(cal, [3]) == default.replace(prior=0.2, temperature=0.3, offset=0.002, p_max=0.9)
    assert "calibration" in models.dng_source(cal, "default")
    assert models.dng_config(cal, [1, 3]).prior == (0.05, 0.2) and models.dng_config(cal, [1, 3]).exclusive
    assert models.dng_config(cal, [3], prior=0.5).prior == 0.5
    assert models.dng_config(cal, [7]).prior == default.prior  # an uncalibrated class keeps the preset's
    # ... also beside calibrated ones, which keep theirs.
    assert models.dng_config(cal, [3, 7]).prior == (0.2, default.prior)
    # A published preset runs as published: the calibration is not applied to it.
    assert models.dng_config(cal, [7, 1], "paper-sd") == PRESETS["paper-sd"].replace(mode="exclusive")
    assert "as published" in models.dng_source(cal, "paper-sd")
    # Our intent preset is the default at a larger lam0, and takes the calibration like the default.
    assert PRESETS["strict"] == default.replace(lam0=4.0)
    assert models.dng_config(cal, [3], "strict") == models.dng_config(cal, [3]).replace(lam0=4.0)
    assert "calibration" in models.dng_source(cal, "strict")
    assert models.dng_config(None, [3]) == default
    assert models.dng_source(None, "default") == "library defaults (no calibration)"
    with pytest.raises(ConfigError, match="unknown DNG preset 'strong'"):
        models.dng_config(cal, [3], "strong")

    out = tmp_path / "sweep"
    for scheduler in ("ddpm", "euler-a"):  # one fit, whatever the sampler
        assert _bench(tiny, out / scheduler, classes="Dress", extra=("--scheduler", scheduler)) == 0
        rows = json.loads((out / scheduler / "results.json").read_text())["rows"]
        assert rows[1]["params"] == {**default.to_dict(), "preset": "default", "set": {"lam0": 1.0},
                                     "prior": 0.2, "temperature": 0.3, "offset": 0.002, "p_max": 0.9, "lam0": 1.0}
    models.save_calibration(models.calibration_path(gen), _calibration(temperature=0.5), [1, 3], settings)
    ddpm = ("--scheduler", "ddpm")
    capsys.readouterr()
    # A new calibration recomputes the DNG cells, which would otherwise mix into the new table; the others stay.
    assert _bench(tiny, out / "ddpm", classes="Dress", extra=ddpm) == 0
    assert "the calibration changed (the generator's calibration now): recomputing class3-dng-default-lam0=1" in \
        capsys.readouterr().out
    assert json.loads((out / "ddpm" / "results.json").read_text())["rows"][1]["params"]["temperature"] == 0.5
    assert _bench(tiny, out / "ddpm", classes="Dress", methods="none", extra=ddpm) == 0  # other cells stay valid

    with pytest.raises(ConfigError, match="needs the joint fit"):
        models.save_calibration(tmp_path / "x.json", _calibration(), [1, 3], {"steps": 3})
    with pytest.raises(ConfigError, match="2 priors for 1 classes"):
        models.save_calibration(tmp_path / "x.json", _calibration(), [1], settings)
    old = json.dumps({"calibrations": [{"fits": {}, "settings": {}}]})  # per-step offsets: never misread
    for bad, message in (('{"fits": {}}', "not a calibration whose offset"), (old, "older per-step fit"),
                         ("{", "not valid JSON"),
                         (json.dumps({"offset_unit": calibration.OFFSET_UNIT, "fits": {}}), "not a calibration file")):
        models.calibration_path(gen).write_text(bad)
        with pytest.raises(ConfigError, match=message):
            models.load_calibration(gen)


def test_data_row_scores_real_kept_class_images(tiny, tmp_path):
    """The floor of the metrics: held-out real images of the kept classes, scored exactly like samples."""
    out = tmp_path / "sweep"
    assert _bench(tiny, out, classes="2", methods="data,none") == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["data", "none"]
    with np.load(out / "cells" / "class2-data.npz") as f:
        grid = f["grid"]
    images, labels = class_removal.load_split("train")
    kept = images[labels != 2]
    # Every scored image is a real train image of a kept class, drawn without repeats.
    assert len(grid) == 16 and len({g.tobytes() for g in grid}) == 16
    assert all((kept == g).all(axis=(1, 2)).any() for g in grid)
    clf = models.load_classifier(tiny[tiny.index("--classifier") + 1])
    pred, _ = classify(clf, grid)
    assert rows[0]["forbidden_rate"] == pytest.approx(float((pred == 2).mean()))
    assert rows[0]["seconds"] == 0.0
    code = cli.main(["bench", "class-removal", "--classes", "2", "--methods", "data", "--num-images", "28",
                     "--out", str(tmp_path / "big"), *tiny])
    assert code == 2


def test_trajectory_figure_reads_sigma_when_the_rule_has_one(tmp_path):
    from dng import plots
    from dng.sampler import Trace

    p = torch.rand(4, 3, 1)
    with_levels = torch.tensor([[10.0, 1.0], [1.0, 0.1], [0.1, 0.01], [0.01, 0.0]], dtype=torch.float64)
    without = torch.full((4, 2), float("nan"), dtype=torch.float64)  # NP and SLD read no noise level
    for name, sigma in (("dng", with_levels), ("np", without), ("old", None)):
        path = plots.trajectories(Trace(torch.arange(4), p, p, p, sigma), tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_grids_side_by_side_takes_the_figure_size(tmp_path):
    from PIL import Image

    from dng import plots

    grid = np.zeros((60, 120), np.uint8)
    small = plots.grids_side_by_side([("a", grid), ("b", grid)], tmp_path / "small.png", "title")
    large = plots.grids_side_by_side([("a", grid), ("b", grid)], tmp_path / "large.png", "title", 6, 4)
    assert Image.open(large).width > 1.5 * Image.open(small).width


def test_calibrate_command_writes_a_fit_in_log_snr_units(tmp_path, capsys):
    """On the shipped models (a tiny random generator makes too few of any class to fit), a few short chains."""
    out = tmp_path / "g.calibration.json"
    code = cli.main(["calibrate", "--num-images", "40", "--steps", "4", "--threads", "1", "--mode", "exclusive",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    entry = json.loads(out.read_text())
    assert entry["offset_unit"] == calibration.OFFSET_UNIT and entry["settings"]["scheduler"] == "euler-a"
    assert entry["settings"]["mode"] == "exclusive"
    fit = entry["fits"]["all"]
    assert len(fit["priors"]) == len(entry["classes"]) >= 1 and math.isfinite(fit["offset"])
    assert all(0 < p < 1 for p in fit["priors"]) and "wrote" in capsys.readouterr().out


def test_every_class_branches_are_the_single_label_calls_in_one_batch():
    torch.manual_seed(0)
    unet = models.make_generator(TINY_UNET).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor(500)
    labels = [models.NULL_LABEL, 4]
    branches = ClassBranches(unet, labels, every_class=True)
    out = branches(x.repeat(2, 1, 1, 1), t)
    assert torch.allclose(out, ClassBranches(unet, labels)(x.repeat(2, 1, 1, 1), t), atol=1e-5)
    assert branches.last.shape == (models.NULL_LABEL + 1, 3, 1, 28, 28)
    for label in (0, 4, 9, models.NULL_LABEL):
        alone = ClassBranches(unet, [label])(x, t)
        assert torch.allclose(branches.last[label], alone, atol=1e-5), label
    repeated = ClassBranches(unet, [models.NULL_LABEL, 4, 4], every_class=True)  # positive = negative
    repeated(x.repeat(3, 1, 1, 1), t)
    assert torch.allclose(repeated.last, branches.last, atol=1e-5)
    p = ClassPosterior(branches, [4, 7])(x, t)
    from dng.posterior import mixture_weights

    assert torch.equal(p, mixture_weights(branches.last[models.NULL_LABEL], branches.last[:10])[:, [4, 7]])
    with pytest.raises(ConfigError, match="every_class"):
        ClassPosterior(ClassBranches(unet, labels), [4])
    with pytest.raises(ConfigError, match="before"):
        ClassPosterior(branches, [4])(torch.randn(5, 1, 28, 28), t)


def test_the_class_posterior_row_reads_p_from_every_branch(tiny, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    seen = []
    real = ClassPosterior.__call__
    monkeypatch.setattr(ClassPosterior, "__call__", lambda self, x, t: seen.append(1) or real(self, x, t))
    assert _bench(tiny, out, methods="none,dng,dng-branches") == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "dng", "dng-branches"]
    assert len(seen) == 3  # one read per step, and only for its own row
    with pytest.raises(ConfigError, match="DNG rule"):
        generate.generate(models.load_generator(tiny[1]), torch.randn(2, 1, 28, 28), scheduler="ddpm",
                          guidance=generate.make_rule("np"), negatives=[1], steps=2, seed=0, class_posterior=True)


def test_class_branches_declare_their_layout(tiny):
    """A 2-label model under cfg_scale ran with a 'positive' branch half null, half Bag; a 3-label one under one
    negative failed inside the UNet. Both are refused before the first call; noise of another float type runs."""
    from dng.guidance import DynamicNegativeGuidance
    from dng.sampler import sample

    unet = models.load_generator(tiny[1])
    scheduler, eta = models.generator_sampler("euler-a")
    noise = torch.randn(2, 1, 28, 28)
    two = ClassBranches(unet, [models.NULL_LABEL, 8])
    for model, kwargs in ((two, dict(cfg_scale=2.0)), (ClassBranches(unet, [models.NULL_LABEL, 3, 8]), {})):
        with pytest.raises(ConfigError, match="branches per call but this sample"):
            sample(model, scheduler, DynamicNegativeGuidance(), noise=noise, num_inference_steps=2, num_negatives=1,
                   progress=False, **kwargs)
    with pytest.raises(ConfigError, match=r"noise has samples of shape \(1, 14, 14\)"):
        sample(two, scheduler, DynamicNegativeGuidance(), noise=torch.randn(2, 1, 14, 14), num_inference_steps=2,
               num_negatives=1, progress=False)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = sample(two, scheduler, DynamicNegativeGuidance(), noise=noise.to(dtype), num_inference_steps=2,
                     num_negatives=1, progress=False)
        assert torch.isfinite(out.samples).all()
    with pytest.raises(ConfigError, match="labels must be class indices 0-10"):
        ClassBranches(unet, [models.NULL_LABEL, 11])
