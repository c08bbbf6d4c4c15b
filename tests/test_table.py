"""The benches' shared results table: labels (they name stored cells), DNG's cells, comparable groups, the files."""

import ast
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from dng.bench import class_removal, prompted
from dng.bench.table import Table, dng_cells, dng_params, markdown, mean_std, setting_label
from dng.calibration import ModelCalibration
from dng.config import PRESETS

DNG = {"preset": "default", "set": {}, "lam0": 1.0, "prior": 0.1}


@pytest.mark.parametrize("method, params, label", [
    ("data", {}, "data"),
    ("none", {}, "none"),
    ("np", {"scale": 0.5}, "np 0.5"),
    ("np", {"scale": 1.0}, "np 1.0"),
    ("sld", {"preset": "medium", "sld_guidance_scale": 1000}, "sld medium"),
    ("dng", DNG, "dng default"),
    ("dng", {**DNG, "set": {"lam0": 3.0}}, "dng default lam0=3"),
    ("dng", {**DNG, "set": {"late_boost": 4.0, "boost_sigma": 1.0, "lam0": 2.0}},
     "dng default late_boost=4 boost_sigma=1 lam0=2"),
    ("dng-branches", {**DNG, "preset": "paper-cifar10", "set": {"update": "exact"}},
     "dng-branches paper-cifar10 update=exact"),
    ("dng", {"lam0": 1.0}, "dng default"),  # a cell stored without its preset
])
def test_class_removal_labels(method, params, label):
    assert setting_label(method, params) == label
    assert class_removal.cell_key(3, method, params) == f"class3-{label.replace(' ', '-')}"


@pytest.mark.parametrize("method, params, label", [
    ("cfg", {"cfg_scale": 2.0}, "cfg"),
    ("np", {"cfg_scale": 2.0, "scale": 1.0, "diffusers": True}, "np 1"),
    ("np", {"cfg_scale": 2.0, "scale": 0.5, "diffusers": False}, "np 0.5"),
    ("np", {"cfg_scale": 3.0, "scale": 4.0, "diffusers": False}, "np 4"),
    ("dng", {"cfg_scale": 2.0, **DNG}, "dng default"),
    ("dng", {"cfg_scale": 2.0, **DNG, "set": {"lam0": 0.0}}, "dng default lam0=0"),
])
def test_prompted_labels(method, params, label):
    assert setting_label(method, params, "g") == label
    assert prompted.cell_key(1, 8, method, params) == f"pos1-neg8-{label.replace(' ', '-')}"


def test_gmm_labels():
    assert setting_label("np", {"scale": 2.0}) == "np 2.0"
    assert setting_label("dng", {"preset": "default", "prior": 0.1}) == "dng default"
    assert setting_label("dng-oracle", {"lam0": 1.0, "posterior": "exact"}) == "dng-oracle"
    assert setting_label("target", {}) == "target"


def test_dng_cells_name_the_preset_and_what_the_user_set():
    calibration = ModelCalibration(("Trouser",), (0.2,), 0.5, 0.1, 0.9)
    cells = dng_cells(calibration, 1, "default", {"late_boost": 4.0}, [1.0, 3.0])
    assert [user for user, _ in cells] == [{"late_boost": 4.0, "lam0": 1.0}, {"late_boost": 4.0, "lam0": 3.0}]
    assert [config for _, config in cells] == [PRESETS["default"].replace(
        prior=0.2, temperature=0.5, offset=0.1, p_max=0.9, late_boost=4.0, lam0=lam0) for lam0 in (1.0, 3.0)]
    params = dng_params("default", *cells[0])
    assert list(params)[:2] == ["preset", "set"] and params["lam0"] == 1.0 and params["prior"] == 0.2
    (only, config), = dng_cells(None, 1, "default", None)
    assert only == {} and config == PRESETS["default"]


def _table():
    return Table(("pair",), ("cfg", "np"), ("rate", "seconds"), {"pair": lambda r: r["pair"]}, "g")


def _row(pair, method, rate, family="a", **params):
    return {"pair": pair, "method": method, "params": params, "family": family, "rate": rate, "seconds": 1.0}


def test_comparable_keeps_the_groups_with_every_setting_of_their_family():
    rows = [_row(1, "cfg", 0.1), _row(1, "np", 0.2, scale=1.0), _row(2, "cfg", 0.3),
            _row(3, "cfg", 0.4, "b")]
    table = _table()
    assert table.comparable(rows) == rows[:2]
    assert table.comparable(rows, lambda r: r["family"]) == [*rows[:2], rows[3]]


def test_stats_and_summary_text():
    table = _table()
    stats = table.stats([_row(1, "cfg", 0.1), _row(2, "cfg", 0.3)])
    assert list(stats) == ["rate", "rate_std", "seconds", "seconds_std"]
    assert stats["rate"] == pytest.approx(0.2) and stats["rate_std"] == pytest.approx(0.1)
    assert table.stats([_row(1, "cfg", 0.1), _row(2, "cfg", None)])["rate"] is None
    assert [mean_std(stats, m) for m in ("rate", "seconds")] == ["0.2000 ± 0.1000", "1"]
    assert mean_std({"rate": None}, "rate") == "-"
    assert markdown(["a", "b"], [[1, "x"], [None, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| None | y |\n"


def test_write_and_load(tmp_path):
    table = _table()
    rows = [_row(1, "np", 0.2, scale=1.0), _row(1, "cfg", 0.1)]
    for r in rows:
        (tmp_path / "cells").mkdir(exist_ok=True)
        (tmp_path / "cells" / f"{table.label(r)}.json").write_text(json.dumps({"row": r}))
    assert [c["row"]["method"] for c in table.load(tmp_path)] == ["cfg", "np"]
    files = table.write(tmp_path, {"rows": rows}, rows, "text\n")
    assert json.loads(files["results"].read_text()) == {"rows": rows} and files["summary"].read_text() == "text\n"
    with open(files["csv"], newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["pair", "method", "setting", "params", "rate", "seconds"]
    assert lines[1] == ["1", "np", "np 1", '{"scale": 1.0}', "0.2", "1.0"]


def test_figures_import_no_bench():
    tree = ast.parse(Path(importlib.util.find_spec("dng.plots").origin).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m and m.startswith("dng.bench")]
