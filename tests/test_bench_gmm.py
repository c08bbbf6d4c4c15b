"""`dng bench gmm` end to end: the JSON schema, the table, the figures and config errors."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dng import metrics
from dng.bench.gmm import GMMBench, sliced_w2
from dng.cli import main
from dng.gmm import default_mixture_config

SMALL = {"means": [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.5, 0.4], "weights": [1, 2, 1], "remove": [0]}


def test_bench_gmm_cli_writes_results_and_plots_into_its_folder(tmp_path, capsys):
    (tmp_path / "mix.json").write_text(json.dumps(SMALL))
    out = tmp_path / "run"
    code = main(["bench", "gmm", "--config", str(tmp_path / "mix.json"), "--steps", "20", "--num-images", "300",
                 "--methods", "none,np,sld,dng,dng-oracle,target", "--out", str(out), "--plot"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["dng_trajectories.png", "results.json", "tradeoff.png"]
    result = json.loads((out / "results.json").read_text())
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
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "dng_trajectories.png").stat().st_size > 1000
    assert "forbidden" in capsys.readouterr().out
    # Without --plot: results.json alone.
    assert main(["bench", "gmm", "--config", str(tmp_path / "mix.json"), "--steps", "2", "--num-images", "10",
                 "--methods", "none", "--out", str(tmp_path / "bare")]) == 0
    assert [p.name for p in (tmp_path / "bare").iterdir()] == ["results.json"]
    # A flow schedule starts at sigma = inf (pure noise), which the trajectories' log axis leaves out.
    assert main(["bench", "gmm", "--config", str(tmp_path / "mix.json"), "--scheduler", "flow-euler", "--steps", "3",
                 "--num-images", "10", "--methods", "dng", "--out", str(tmp_path / "flow"), "--plot"]) == 0
    assert (tmp_path / "flow" / "dng_trajectories.png").stat().st_size > 1000


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
    config = {"means": [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.5, 0.4], "weights": [1, 3, 1],
              "remove": [0]}
    bench = GMMBench(config, steps=2, num_samples=40, seed=0)
    x = bench.gmm.sample(40, bench.kept, torch.Generator().manual_seed(1))[0]
    labels = bench.gmm.log_joint(x).argmax(-1).numpy()
    row = bench.score("target", {}, x, 0.0, None)
    # The mixture is float32 here: its normalised weights are 0.75 and 0.25 to float32 precision.
    assert row["class_kl"] == pytest.approx(metrics.class_kl(labels, [1, 2], [0.75, 0.25]), rel=1e-6)


def test_sliced_w2_by_hand():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(a, a) == pytest.approx(0.0, abs=1e-9)
    # A pure shift by v: every projection moves by <v, dir>, so sW2 = |v| / sqrt(d) on average over directions.
    shifted = sliced_w2(a, a + torch.tensor([3.0, 0.0, 0.0]), projections=4000)
    assert shifted == pytest.approx(3.0 / 3**0.5, rel=0.05)


def test_rows_in_parallel_processes_equal_the_serial_rows():
    from dng.bench.gmm import GMMBench, run_rows

    bench = GMMBench(SMALL, steps=10, num_samples=200, seed=3)
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


@pytest.mark.parametrize("scheduler", ["flow-euler", "flow-euler-a"])
@pytest.mark.parametrize("options, reference", [
    ({"shift": 3.0}, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
    ({"mu": 0.8}, lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)),
])
def test_flow_samplers_run_sd3s_shift_and_fluxs_dynamic_shifting(scheduler, options, reference):
    bench = GMMBench(SMALL, steps=6, num_samples=20, seed=0, scheduler=scheduler, **options)
    bench.run(*next(bench.configs(["dng"])))
    expected = reference()
    expected.set_timesteps(6, **{k: v for k, v in options.items() if k == "mu"})
    # Shifted: the unshifted second level of 6 steps is 0.80.
    assert torch.equal(bench.scheduler.sigmas, expected.sigmas) and expected.sigmas[1] > 0.85


@pytest.mark.parametrize("argv, message", [
    (["--shift", "3"], "--shift shifts flow matching's schedule; it needs --scheduler flow-euler or flow-euler-a"),
    (["--scheduler", "flow-euler", "--shift", "3", "--mu", "1"], "not both"),
    (["--scheduler", "flow-euler", "--shift", "0"], "--shift must be > 0"),
    (["--scheduler", "flow-euler", "--mu", "nan"], "--mu must be a finite number"),
    (["--scheduler", "flow"], "unknown scheduler 'flow'; choose one of ddpm, euler-a, dpmpp-2m-sde, ddim, flow-euler"),
    (["--out", "file"], "--out file is a file; give a folder"),
])
def test_bad_sampler_and_output_options_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    assert main(["bench", "gmm", "--steps", "2", "--num-images", "10", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_flow_matching_bed_with_the_exact_posterior_is_close_to_the_target():
    """With the exact velocity and the exact posterior, Euler ancestral on the rectified-flow path samples the target;
    so does tracked DNG."""
    bench = GMMBench(default_mixture_config(), steps=50, num_samples=1500, seed=0, scheduler="flow-euler-a")
    rows = {m: bench.run(m, p, f)[0] for m, p, f in bench.configs(["dng", "dng-oracle", "target"])}
    target = rows["target"]
    for method in ("dng-oracle", "dng"):
        assert rows[method]["forbidden_rate"] <= target["forbidden_rate"] + 0.006, method
        assert rows[method]["class_kl"] < 0.005 and rows[method]["sliced_w2"] < 1.25 * target["sliced_w2"], method
    assert rows["dng"]["posterior_logit_mae"] < 0.3


def test_renoising_flow_sampler_is_biased_and_its_tracker_overcounts():
    """diffusers' stochastic flow-matching step replaces x_t by (1 - s') E[x_0 | x_t] + s' z: even with the exact
    velocity its chain under-disperses and loses the removed class (which has near neighbours) as steps grow, and a
    tracker that reads each re-noising as fresh evidence drifts further from the exact posterior the more steps it
    takes. Euler ancestral on the same path keeps the class's 10 %."""
    unguided, mae = {}, {}
    for scheduler, steps in (("flow-euler", 25), ("flow-euler", 100), ("flow-euler-a", 100)):
        bench = GMMBench(default_mixture_config(), steps=steps, num_samples=1000, seed=0, scheduler=scheduler)
        (unguided[scheduler, steps], _), (tracked, _) = (bench.run(*next(bench.configs([m]))) for m in ("none", "dng"))
        mae[scheduler, steps] = tracked["posterior_logit_mae"]
    assert unguided["flow-euler-a", 100]["forbidden_rate"] == pytest.approx(0.1, abs=0.03)
    assert unguided["flow-euler", 100]["forbidden_rate"] < 0.02 < unguided["flow-euler", 25]["forbidden_rate"]
    assert mae["flow-euler-a", 100] < 0.5 < 2 < mae["flow-euler", 25] < mae["flow-euler", 100]


def test_a_row_that_overflows_is_scored_as_diverged():
    from dng.guidance import NegativePrompt

    bench = GMMBench(SMALL, steps=5, num_samples=50, seed=0)
    row, _ = bench.run("np", {"scale": 1e30}, lambda: NegativePrompt(1e30))
    assert row["diverged"] == 50 and row["sliced_w2"] == float("inf") and row["forbidden_rate"] == 1.0
