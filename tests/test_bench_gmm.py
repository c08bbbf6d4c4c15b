"""`dng bench gmm` end to end: the JSON schema, the table, the figures and config errors."""

import json

import pytest

from dng import metrics
from dng.bench.gmm import GMMBench, sliced_w2
from dng.cli import main


def test_bench_gmm_cli_writes_results_and_plots(tmp_path, capsys):
    config = {"means": [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.5, 0.4], "weights": [1, 2, 1],
              "remove": [0]}
    (tmp_path / "mix.json").write_text(json.dumps(config))
    code = main(["bench", "gmm", "--config", str(tmp_path / "mix.json"), "--steps", "20", "--num-images", "300",
                 "--methods", "none,np,sld,dng,dng-oracle,target", "--out", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "plots")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["config"]["remove"] == [0] and result["variance"] == "fixed_large"
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["none"] + ["np"] * 3 + ["sld"] * 4 + ["dng", "dng-oracle", "target"]
    keys = {"method", "params", "forbidden_rate", "class_kl", "target_log_density", "sliced_w2",
            "posterior_logit_mae", "seconds"}
    for row in result["rows"]:
        assert keys <= row.keys()
        assert (row["posterior_logit_mae"] is not None) == (row["method"] == "dng")
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["dng"]["params"]["prior"] == pytest.approx(0.25)
    assert rows["none"]["forbidden_rate"] > 0.15 > rows["dng-oracle"]["forbidden_rate"]
    assert (tmp_path / "plots" / "tradeoff.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "dng_trajectories.png").stat().st_size > 1000
    assert "forbidden" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"means": [[0, 0]], "stds": [1], "weights": [1]}', "lacks remove"),
        ('{"means": [[0], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [2]}', "remove must be"),
        ('{"means": [[0], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [0, 1]}', "keeps at least one"),
        ('{"means": [[0], [1]], "stds": [1], "weights": [1, 1], "remove": [0]}', "one std and one weight"),
        ('{"means": [[0], [1]], "stds": [1, -1], "weights": [1, 1], "remove": [0]}', "stds must be finite and > 0"),
        # JSON's true is not component 1.
        ('{"means": [[0], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [true]}', "remove must be"),
        ('{"means": [[0], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [[0]]}', "remove must be"),
        ('{"means": [[0, 1], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [0]}', "means must be K lists"),
        ('{"means": [["a"], [1]], "stds": [1, 1], "weights": [1, 1], "remove": [0]}', "means must be K lists"),
    ],
)
def test_malformed_configs_get_clear_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["bench", "gmm", "--config", str(path), "--steps", "2", "--num-images", "10"]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_and_unknown_method(tmp_path, capsys):
    assert main(["bench", "gmm", "--config", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "gmm", "--methods", "none,cfg", "--steps", "2", "--num-images", "10"]) == 2
    assert "unknown method 'cfg'" in capsys.readouterr().err


def test_class_kl_is_the_one_of_dng_metrics():
    import torch

    config = {"means": [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.5, 0.4], "weights": [1, 3, 1],
              "remove": [0]}
    bench = GMMBench(config, steps=2, num_samples=40, seed=0)
    x = bench.gmm.sample(40, bench.kept, torch.Generator().manual_seed(1))[0]
    labels = bench.gmm.log_joint(x).argmax(-1).numpy()
    row = bench.score("target", {}, x, 0.0, None)
    # The mixture is float32 here: its normalised weights are 0.75 and 0.25 to float32 precision.
    assert row["class_kl"] == pytest.approx(metrics.class_kl(labels, [1, 2], [0.75, 0.25]), rel=1e-6)


def test_sliced_w2_by_hand():
    import torch

    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(a, a) == pytest.approx(0.0, abs=1e-9)
    # A pure shift by v: every projection moves by <v, dir>, so sW2 = |v| / sqrt(d) on average over directions.
    shifted = sliced_w2(a, a + torch.tensor([3.0, 0.0, 0.0]), projections=4000)
    assert shifted == pytest.approx(3.0 / 3**0.5, rel=0.05)


def test_rows_in_parallel_processes_equal_the_serial_rows():
    from dng.bench.gmm import GMMBench, run_rows

    config = {"means": [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.5, 0.4], "weights": [1, 2, 1],
              "remove": [0]}
    bench = GMMBench(config, steps=10, num_samples=200, seed=3)
    methods = ["none", "np", "dng", "target"]
    serial = run_rows(bench, methods, jobs=1, threads=1, keep_traces={"dng"})
    seen = []
    parallel = run_rows(bench, methods, jobs=2, threads=1, keep_traces={"dng"}, on_row=lambda: seen.append(1))
    assert len(seen) == len(serial) == len(parallel) == 6
    for (a, trace_a), (b, trace_b) in zip(serial, parallel, strict=True):
        # Equal up to float rounding of the scoring, which may run on another thread count.
        assert a.keys() == b.keys() and a["params"] == b["params"] and a["method"] == b["method"]
        for key in ("forbidden_rate", "class_kl", "target_log_density", "sliced_w2", "posterior_logit_mae"):
            assert b[key] == (a[key] if a[key] is None else pytest.approx(a[key], rel=1e-5)), key
        assert (trace_a is None) == (trace_b is None) == (a["method"] != "dng")
    assert main(["bench", "gmm", "--jobs", "0"]) == 2
