"""`dng bench prompted` on tiny random models: rows, the cfg reference, DNG at lam0 = 0, the claim's bookkeeping."""

import csv
import json

import numpy as np
import pytest
from test_class_removal import tiny  # noqa: F401 - the fixture

from dng import cli
from dng.bench import class_removal, prompted
from dng.bench.table import setting_label
from dng.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
ROW_KEYS = {"positive", "negative", "method", "params", "positive_rate", "negative_rate", "change_vs_cfg",
            "fid_vs_cfg", "mean_scale", "max_scale", "seconds"}


def _bench(tiny, out, pairs="Trouser:Bag,3:3", extra=()):  # noqa: F811
    return cli.main(["bench", "prompted", "--pairs", pairs, "--num-images", "8", "--batch-size", "4",
                     "--steps", "3", "--out", str(out), *extra, *tiny])


def test_rows_reference_and_files(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "p"
    assert _bench(tiny, out, extra=["--np-scales", "1,3"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["positive"], r["negative"], setting_label(r["method"], r["params"], "g")) for r in rows] == [
        (1, 8, "cfg"), (1, 8, "np 1"), (1, 8, "np 3"), (1, 8, "dng default"),
        (3, 3, "cfg"), (3, 3, "np 1"), (3, 3, "np 3"), (3, 3, "dng default")]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert 0 <= r["positive_rate"] <= 1 and 0 <= r["negative_rate"] <= 1 and r["fid_vs_cfg"] >= 0
    cfg = [r for r in rows if r["method"] == "cfg"]
    assert all(r["change_vs_cfg"] == 0 and r["fid_vs_cfg"] == 0 and r["max_scale"] == 0 for r in cfg)
    nps = {r["params"]["scale"]: r for r in rows if r["method"] == "np" and r["positive"] == 1}
    assert nps[1.0]["params"]["diffusers"] and not nps[3.0]["params"]["diffusers"]  # lam = w - 1 at w = 2
    assert nps[3.0]["mean_scale"] == nps[3.0]["max_scale"] == 3.0 and nps[3.0]["activated_rate"] == 1
    assert all(r["activated_rate"] == 0 for r in cfg)
    assert nps[3.0]["change_vs_cfg"] > nps[1.0]["change_vs_cfg"] > 0
    self_pair = [r for r in rows if r["positive"] == 3]
    assert all(r["relation"] == "self" and "positive = negative" in r["note"] for r in self_pair)
    assert all(r["positive_rate"] == r["negative_rate"] for r in self_pair)
    assert "positive = negative" in (out / "summary.md").read_text()
    assert len(list(csv.reader((out / "results.csv").open()))) == 1 + len(rows)
    for name in ("change_vs_negative_rate.png", "grids/pos1-neg8.png", "trajectories/pos1-neg8-dng-default.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    # The cfg samples of a positive class are drawn once, whatever its pairs.
    assert sorted(p.stem for p in (out / "samples").glob("*-cfg.npz")) == ["pos1-cfg", "pos3-cfg"]


def test_dng_at_scale_0_is_the_cfg_row(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "p"
    assert _bench(tiny, out, pairs="Trouser:Bag", extra=["--methods", "dng", "--dng", "lam0=0"]) == 0
    cfg, dng = json.loads((out / "results.json").read_text())["rows"]
    assert dng["method"] == "dng" and dng["params"]["lam0"] == 0
    assert dng["change_vs_cfg"] == 0 and dng["max_scale"] == 0 and dng["activated_rate"] == 0
    assert (dng["positive_rate"], dng["negative_rate"]) == (cfg["positive_rate"], cfg["negative_rate"])
    samples = out / "samples"
    with np.load(samples / "pos1-cfg.npz") as a, np.load(samples / "pos1-neg8-dng-default-lam0=0.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_resume_and_settings_lock(tiny, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "p"
    assert _bench(tiny, out, pairs="Trouser:Bag", extra=["--methods", "cfg"]) == 0
    from dng.vision import generate

    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert _bench(tiny, out, pairs="Trouser:Bag,Trouser:Coat", extra=["--methods", "cfg"]) == 0
    assert calls == []  # the cfg samples of Trouser serve the new pair too
    assert _bench(tiny, out, pairs="Trouser:Bag", extra=["--methods", "cfg", "--cfg-scale", "3"]) == 2


def test_pairs_and_bad_input():
    assert prompted.parse_pairs("Trouser:Bag, 6:0") == [(1, 8), (6, 0)]
    assert len(prompted.parse_pairs("all")) == 90 and (3, 3) not in prompted.parse_pairs("all")
    for bad in ("Trouser", "Trouser:Hat", ""):
        with pytest.raises(ConfigError):
            prompted.parse_pairs(bad)
    with pytest.raises(ConfigError, match="sld"):
        class_removal.parse_methods("cfg,sld", prompted.METHODS)


def test_claim_bookkeeping_by_hand():
    def row(method, neg, change, pos=0.9, **params):
        return {"positive": 1, "negative": 8, "method": method, "negative_rate": neg, "positive_rate": pos,
                "change_vs_cfg": change, "params": params}

    related = [row("cfg", 0.10, 0.0), row("np", 0.04, 0.30, scale=1.0, diffusers=True),
               row("np", 0.01, 0.50, scale=2.0, diffusers=False), row("dng", 0.04, 0.10, set={})]
    for r in related:
        r["relation"] = "related"
    assert prompted.claims(related)["related"] == {"held": 1, "pairs": 1}
    related[-1]["change_vs_cfg"] = 0.35  # NP 1 reaches the same negative rate with a smaller change
    assert prompted.claims(related)["related"] == {"held": 0, "pairs": 1}
    unrelated = [row("cfg", 0.0, 0.0), row("np", 0.0, 0.40, scale=1.0, diffusers=True),
                 row("dng", 0.0, 0.09, pos=0.895, set={})]
    for r in unrelated:
        r["relation"] = "unrelated"
    assert prompted.claims(unrelated)["unrelated"] == {"held": 1, "pairs": 1}
    unrelated[-1]["positive_rate"] = 0.88  # lost more than 1 pp of the positive class
    assert prompted.claims(unrelated)["unrelated"] == {"held": 0, "pairs": 1}


def test_summary_compares_settings_on_the_same_pairs():
    def row(k, j, method, neg=0.0, **params):
        return {"positive": k, "negative": j, "method": method, "params": params, "relation": "unrelated",
                **{m: neg for m in prompted.METRICS}}

    rows = [row(1, 8, "cfg"), row(1, 8, "np", 0.5, scale=1.0), row(2, 8, "cfg", 0.25)]  # pair 2:8 has cfg only
    summary = {s["setting"]: s for s in prompted.summarize(rows)}
    assert summary["cfg"]["pairs"] == 1 and summary["cfg"]["negative_rate"] == 0.0
    assert summary["np 1"]["pairs"] == 1
