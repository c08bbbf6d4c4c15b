"""The one label of a setting (labels name stored cells), and figures that take labels as data."""

import ast
import importlib.util
from pathlib import Path

import pytest

from dng.bench import class_removal, prompted
from dng.bench.table import setting_label

DNG = {"preset": "default", "set": {}, "scale": 1.0, "prior": 0.1}


@pytest.mark.parametrize("method, params, label", [
    ("data", {}, "data"),
    ("none", {}, "none"),
    ("np", {"scale": 0.5}, "np 0.5"),
    ("np", {"scale": 1.0}, "np 1.0"),
    ("sld", {"preset": "medium", "sld_guidance_scale": 1000}, "sld medium"),
    ("dng", DNG, "dng default"),
    ("dng", {**DNG, "set": {"scale": 3.0}}, "dng default scale=3"),
    ("dng", {**DNG, "set": {"late_boost": 4.0, "boost_sigma": 1.0, "scale": 2.0}},
     "dng default late_boost=4 boost_sigma=1 scale=2"),
    ("dng-branches", {**DNG, "preset": "paper-cifar10", "set": {"update": "exact"}},
     "dng-branches paper-cifar10 update=exact"),
    ("dng", {"scale": 1.0}, "dng default"),  # a cell stored without its preset
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
    ("dng", {"cfg_scale": 2.0, **DNG, "set": {"scale": 0.0}}, "dng default scale=0"),
])
def test_prompted_labels(method, params, label):
    assert setting_label(method, params, "g") == label
    assert prompted.cell_key(1, 8, method, params) == f"pos1-neg8-{label.replace(' ', '-')}"


def test_gmm_labels():
    assert setting_label("np", {"scale": 2.0}) == "np 2.0"
    assert setting_label("dng", {"preset": "default", "prior": 0.1}) == "dng default"
    assert setting_label("dng-oracle", {"scale": 1.0, "posterior": "exact"}) == "dng-oracle"
    assert setting_label("target", {}) == "target"


def test_figures_import_no_bench():
    tree = ast.parse(Path(importlib.util.find_spec("dng.plots").origin).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m and m.startswith("dng.bench")]
