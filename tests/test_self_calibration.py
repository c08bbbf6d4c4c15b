"""Self-calibration of real pipelines, end to end on tiny models: `dng.pipelines.calibrate_pipeline`,
`dng calibrate --model DIR` (Stable Diffusion / SDXL folders), `dng calibrate --labels model` (the Fashion-MNIST
generator's own verdict) and the model record of the file every one of them writes."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler, StableDiffusionPipeline

from dng import calibration, cli, verdict
from dng.calibration import ModelCalibration
from dng.config import DNGConfig
from dng.errors import ConfigError
from dng.pipelines import (
    FluxDNGPipeline,
    StableDiffusion3DNGPipeline,
    StableDiffusionDNGPipeline,
    StableDiffusionXLDNGPipeline,
    calibrate_pipeline,
)
from dng.pipelines.tiny import flux_components, sd3_components, sd_components, sdxl_components
from dng.vision import models
from dng.vision.data import CLASS_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")
# Tiny and short: 16 images of 8x8 latents, 3 steps, 4 draws. Prior 0.5 gives the random tiny model's soft labels
# about half of each outcome, which the fit needs (5 of each).
TINY_UNET = dict(models.GENERATOR_CONFIG, block_out_channels=[8, 8, 16], norm_num_groups=8, attention_head_dim=8)
TINY_CLASSIFIER = dict(channels=[4, 8, 8], convs=[1, 1, 1], features=16, num_classes=10, dropout=0.0)
SMALL = dict(num_images=16, num_inference_steps=3, height=16, width=16, draws=4, progress=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return _quiet(StableDiffusionDNGPipeline(**sd_components(tmp_path_factory.mktemp("sd"))))


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return _quiet(StableDiffusionXLDNGPipeline(**sdxl_components(tmp_path_factory.mktemp("sdxl"))))


@pytest.mark.parametrize("which", ["sd_pipe", "sdxl_pipe"])
def test_calibrate_pipeline_fits_the_chains_to_the_verdict_of_the_trackers_branches(which, request, monkeypatch,
                                                                                  tmp_path):
    pipe = request.getfixturevalue(which)
    seen = {}
    fit, judge = calibration.fit, verdict.verdict

    def spy_fit(llr, gains, outcome, **kwargs):
        seen["fit"] = (llr.shape, len(gains), outcome.shape)
        return fit(llr, gains, outcome, **kwargs)

    def spy_verdict(model, x0, path, k, **kwargs):
        seen["model"], seen["x0"], seen["k"], seen["priors"] = model, x0, k, kwargs["priors"]
        return judge(model, x0, path, k, **kwargs)

    monkeypatch.setattr(calibration, "fit", spy_fit)
    monkeypatch.setattr(verdict, "verdict", spy_verdict)
    made = calibrate_pipeline(pipe, ["a cat", "a dog"], ["red", "dog"], priors=0.5, batch_size=5,
                              generator=torch.Generator().manual_seed(0), **SMALL)
    # 16 chains in calls of 5, 5, 5, 1: 3 tracked steps, 2 concepts; the verdict labels the 16 final latents.
    assert seen["fit"] == ((3, 16, 2), 3, (16, 2))
    # The last step adds no noise, so it has no evidence (NaN, which the fit drops).
    assert made.trace.llr.shape == (3, 16, 2) and torch.isfinite(made.trace.llr[:2]).all()
    assert made.samples.shape == (16, 4, 8, 8) and seen["x0"] is made.samples and seen["k"] == 2
    assert seen["priors"] == [0.5, 0.5] and made.verdict.p.shape == (16, 2)
    assert ((made.verdict.p >= 0) & (made.verdict.p <= 1)).all()
    cal = made.calibration
    assert cal.concepts == ("red", "dog") and len(cal.priors) == 2 and all(0 < p < 1 for p in cal.priors)
    # The verdict's branches are the tracker's: the empty prompt, then each concept's text, as the pipeline encodes
    # them for its own call (SDXL: with the unconditional micro-conditioning and pooled embeddings).
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(400.0)
    out = seen["model"](x.repeat(3, 1, 1, 1), t)
    for row, text in enumerate(["", "red", "dog"]):
        expected = _branch(pipe, x, t, text)
        assert torch.allclose(out[2 * row: 2 * row + 2], expected, atol=1e-5), text
    # The same seed gives the same calibration.
    again = calibrate_pipeline(pipe, ["a cat", "a dog"], ["red", "dog"], priors=0.5, batch_size=5,
                               generator=torch.Generator().manual_seed(0), **SMALL)
    assert again.calibration == cal
    path = made.save(tmp_path / "c.json", model=calibration.model_record("diffusers", "somewhere"))
    read, entry = ModelCalibration.read(path)
    assert read == cal and entry["labels"] == "model"
    assert entry["model"] == {"kind": "diffusers", "path": "somewhere", "weights_sha256": None}


def _branch(pipe, x, t, text):
    """One branch of the UNet on x at t, conditioned on `text` as the DNG pipeline conditions its unconditional
    (empty) and concept branches."""
    if isinstance(pipe, StableDiffusionXLDNGPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(text, text, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if text == "":  # force_zeros_for_empty_prompt: the unconditional branch is zeros, as in the parent
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), embeds.dtype,
                                     pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": pooled.repeat(len(x), 1), "time_ids": ids.repeat(len(x), 1)}
        return pipe.unet(x, t, encoder_hidden_states=embeds.repeat(len(x), 1, 1), added_cond_kwargs=added).sample
    embeds = pipe.encode_prompt(text, "cpu", 1, False)[0]
    return pipe.unet(x, t, encoder_hidden_states=embeds.repeat(len(x), 1, 1)).sample


@pytest.mark.parametrize("change, message", [
    (dict(concepts=[]), "concepts must be distinct names"),
    (dict(concepts=["red", "red"]), "concepts must be distinct names"),
    (dict(concepts=[""]), "non-empty texts"),
    (dict(priors=None), "needs each concept's prior"),
    (dict(priors=[0.0]), "prior must lie strictly between 0 and 1, got 0.0"),
    (dict(priors=[1.5]), "prior must lie strictly between 0 and 1, got 1.5"),
    (dict(priors=[0.1, 0.2, 0.3]), "3 priors for 1 concepts"),
    (dict(prompts=[]), "prompts must be one or more texts"),
    (dict(num_images=5), "num_images must be a whole number >= 10"),
    (dict(draws=3), "draws must be an even whole number"),
])
def test_calibrate_pipeline_refuses_bad_input_before_sampling(sd_pipe, monkeypatch, change, message):
    monkeypatch.setattr(type(sd_pipe), "__call__", lambda *a, **k: pytest.fail("sampled before checking"))
    kwargs = dict(prompts=["a cat"], concepts=["red"], priors=[0.5], **SMALL)
    kwargs.update(change)
    with pytest.raises(ConfigError, match=message):
        calibrate_pipeline(sd_pipe, kwargs.pop("prompts"), kwargs.pop("concepts"), **kwargs)


def test_calibrate_pipeline_draws_the_chains_on_the_sampler_dng_calls_use(sd_pipe, monkeypatch):
    """A singlestep solver's trace would not replay the tracker (`calibration.check_replayable`); the pipeline's DNG
    calls sample with its multistep sibling, and so do the calibration's chains: the fit is of those chains."""
    monkeypatch.setattr(sd_pipe, "scheduler", DPMSolverSinglestepScheduler.from_config(
        sd_pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2))
    made = calibrate_pipeline(sd_pipe, ["a cat"], ["red"], priors=0.5, **SMALL)
    c, trace = calibration.tracking_only().config, made.trace
    replayed = calibration.trajectory(torch.tensor([c.prior], dtype=torch.float64).log(), 1.0, 0.0,
                                      trace.llr.double().nan_to_num(0.0), calibration.log_snr_gains(trace.sigma),
                                      c.p_min, c.p_max)
    torch.testing.assert_close(replayed[:-1].exp(), trace.p[1:].double(), rtol=0, atol=1e-5)


def test_calibrate_pipeline_takes_dng_pipelines_only(sd_pipe):
    with pytest.raises(ConfigError, match="self_calibrate"):
        calibrate_pipeline(_quiet(StableDiffusionPipeline.from_pipe(sd_pipe)), ["a"], ["red"], priors=0.5, **SMALL)


@pytest.fixture(scope="module")
def sd_folder(sd_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("folder") / "model"
    StableDiffusionPipeline.from_pipe(sd_pipe).save_pretrained(folder)
    return folder


def test_calibrate_command_writes_a_file_for_the_model_folder(sd_folder, tmp_path, capsys):
    out = tmp_path / "sd.calibration.json"
    (tmp_path / "prompts.txt").write_text("a dog\n\n  a red cat \n")
    code = cli.main(["calibrate", "--model", str(sd_folder), "--prompt", "a cat", "--prompts-file",
                     str(tmp_path / "prompts.txt"), "--concept", "red", "--prior", "0.5", "--num-images", "16",
                     "--steps", "3", "--draws", "4", "--height", "16", "--width", "16", "--batch-size", "8",
                     "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Model calls per image: 3 of 3 branches + 4 of 2" in printed.out and f"wrote {out}" in printed.out
    cal, entry = ModelCalibration.read(out)
    assert cal.concepts == ("red",) and 0 < cal.priors[0] < 1 and cal.p_max == 0.95
    assert entry["model"] == {"kind": "diffusers", "path": str(sd_folder.resolve()), "weights_sha256": None}
    assert entry["labels"] == "model"
    settings = entry["settings"]
    assert settings["prompts"] == ["a cat", "a dog", "a red cat"] and settings["num_images"] == 16
    assert settings["steps"] == 3 and settings["draws"] == 4 and settings["priors"] == [0.5]
    assert settings["guidance_scale"] == 7.5 and settings["sampler"] == "EulerAncestralDiscreteScheduler"
    # The file applies to the pipeline's call as any calibration does.
    pipe = _quiet(StableDiffusionDNGPipeline.from_pretrained(sd_folder))
    traced = pipe("a cat", negative_concepts=["red"], dng=cal, num_inference_steps=2, height=16, width=16,
                  output_type="latent", return_trace=True, generator=torch.Generator().manual_seed(0)).trace
    assert traced.p.shape == (2, 1, 1)


@pytest.mark.parametrize("argv, message", [
    ([], "--model needs at least one --concept TEXT"),
    (["--concept", "red"], "needs each concept's --prior P"),
    (["--concept", "red", "--prior", "1.5"], "--prior must lie strictly between 0 and 1, got 1.5"),
    (["--concept", "red", "--prior", "0"], "--prior must lie strictly between 0 and 1, got 0.0"),
    (["--concept", "red", "--prior", "0.1", "--prior", "0.2"], "2 --prior for 1 --concept"),
    (["--concept", "red", "--concept", "red", "--prior", "0.1"], "--concept: concepts must be distinct names"),
    (["--concept", "red", "--prior", "0.1", "--generator", "g"], "--generator applies to the Fashion-MNIST"),
    (["--concept", "red", "--prior", "0.1", "--labels", "classifier"], "--labels classifier needs"),
    (["--concept", "red", "--prior", "0.1", "--draws", "3"], "--draws must be an even whole number"),
    (["--concept", "red", "--prior", "0.1", "--scheduler", "pndm"], "unknown --scheduler 'pndm'"),
    (["--concept", "red", "--prior", "0.1", "--num-images", "5"], "need --num-images >= 10"),
    (["--concept", "red", "--prior", "0.1", "--no-prompt"], "needs the prompts the chains are drawn from"),
    (["--concept", "red", "--prior", "0.1", "--no-out"], "--model needs --out FILE"),
])
def test_calibrate_command_refuses_bad_input_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(StableDiffusionDNGPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    base = ["calibrate", "--model", str(tmp_path / "model")]
    base += [] if "--no-prompt" in argv else ["--prompt", "a cat"]
    base += [] if "--no-out" in argv else ["--out", str(tmp_path / "c.json")]
    assert cli.main(base + [a for a in argv if not a.startswith("--no-")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("folder, message", [
    ("missing", "is not a folder"),
    ("empty", "has no model_index.json"),
    ("sd3 --scheduler euler-a", "drop --scheduler"),
    ("flux --cfg-scale 3", "--cfg-scale (true CFG) is not taken here"),
])
def test_calibrate_command_explains_model_folders_it_cannot_take(tmp_path, capsys, folder, message):
    (tmp_path / "empty").mkdir()
    for name, pipeline in (("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    folder, *options = folder.split()
    argv = ["calibrate", "--model", str(tmp_path / folder), "--prompt", "a", "--concept", "red", "--prior", "0.1",
            "--out", str(tmp_path / "c.json"), *options]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


FLOW = {"sd3": (StableDiffusion3DNGPipeline, sd3_components), "flux-dev": (FluxDNGPipeline, flux_components),
        "flux-schnell": (FluxDNGPipeline, lambda d: flux_components(d, guidance_embeds=False))}


@pytest.fixture(scope="module", params=list(FLOW))
def flow_pipe(request, tmp_path_factory):
    cls, components = FLOW[request.param]
    return _quiet(cls(**components(tmp_path_factory.mktemp(request.param))))


def test_calibrate_pipeline_on_flow_matching_pipelines(flow_pipe, monkeypatch):
    """SD3 and Flux: the chains run on the pipeline's own DNG sampler (LTX's Euler ancestral for rectified flow), and
    the verdict reads the same transformer rows a DNG call evaluates, the empty prompt and each concept, with the
    same distilled guidance (Flux-dev), on the latents in the transformer's layout (Flux: packed)."""
    pipe, seen = flow_pipe, {}
    judge = verdict.verdict

    def spy_verdict(model, x0, path, k, **kwargs):
        seen["model"], seen["path"] = model, path
        return judge(model, x0, path, k, **kwargs)

    monkeypatch.setattr(verdict, "verdict", spy_verdict)
    with pytest.raises(ConfigError, match="has none: drop it"):
        calibrate_pipeline(pipe, ["a cat"], ["red"], priors=0.5, eta=0.5, **SMALL)
    # The fit needs 5 of each soft outcome: more chains than the UNet tests, whose random models split nearer half.
    made = calibrate_pipeline(pipe, ["a cat", "a dog"], ["red", "dog"], priors=0.5, batch_size=8,
                              generator=torch.Generator().manual_seed(0), **{**SMALL, "num_images": 40})
    assert isinstance(seen["path"], verdict.FlowPath)
    assert made.trace.llr.shape == (3, 40, 2) and torch.isfinite(made.trace.llr[:2]).all()
    assert made.verdict.p.shape == (40, 2) and made.calibration.concepts == ("red", "dog")
    assert all(0 < p < 1 for p in made.calibration.priors) and math.isfinite(made.fit.temperature)
    # The transformer's rows in a DNG call: [empty prompt, prompt, red, dog], one image.
    calls, forward = [], pipe.transformer.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe("a cat", negative_concepts=["red", "dog"], num_inference_steps=2, height=16, width=16,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    call = calls[0]
    calls.clear()
    x = torch.randn(2, *made.samples.shape[1:], generator=torch.Generator().manual_seed(1))
    out = seen["model"](x.repeat(3, *[1] * (x.dim() - 1)), torch.tensor(400.0))
    for block, row in enumerate([0, 2, 3]):
        rows = {key: call[key][row:row + 1].expand(2, *call[key].shape[1:])
                for key in ("encoder_hidden_states", "pooled_projections")}
        if isinstance(pipe, StableDiffusion3DNGPipeline):
            extra = dict(timestep=torch.full((2,), 400.0))
        else:  # Flux takes the timestep over 1000, and its call's distilled guidance and positions
            guidance = None if call["guidance"] is None else call["guidance"][:2]
            extra = dict(timestep=torch.full((2,), 0.4), guidance=guidance, txt_ids=call["txt_ids"],
                         img_ids=call["img_ids"])
        with torch.no_grad():
            expected = forward(hidden_states=x, return_dict=False, joint_attention_kwargs=None, **rows, **extra)[0]
        torch.testing.assert_close(out[2 * block:2 * block + 2], expected, atol=1e-5, rtol=1e-4)


def test_prompt_options_need_a_model_folder(capsys):
    assert cli.main(["calibrate", "--concept", "red", "--prior", "0.1"]) == 2
    assert "--concept, --prior apply to --model (a diffusers folder) only" in capsys.readouterr().err


@pytest.fixture
def tiny_generator(tmp_path, monkeypatch):
    """A random tiny generator and classifier; no shipped weights."""
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "no-weights")
    torch.manual_seed(0)
    gen, clf = tmp_path / "g.safetensors", tmp_path / "c.safetensors"
    models.save_model(models.make_generator(TINY_UNET), gen, "generator", TINY_UNET, {})
    models.save_model(models.make_classifier(TINY_CLASSIFIER), clf, "classifier", TINY_CLASSIFIER, {})
    return gen, clf


def test_calibrate_labels_model_uses_the_generators_own_verdict(tiny_generator, tmp_path, capsys, monkeypatch):
    gen, clf = tiny_generator
    seen = {}
    judge = verdict.verdict

    def spy_verdict(model, x0, path, k, **kwargs):
        seen.update(k=k, exhaustive=kwargs["exhaustive"], draws=kwargs["draws"], n=len(x0), bf16=model.bf16)
        seen["verdict"] = judge(model, x0, path, k, **kwargs)
        return seen["verdict"]

    monkeypatch.setattr(verdict, "verdict", spy_verdict)
    out = tmp_path / "g.calibration.json"
    code = cli.main(["calibrate", "--labels", "model", "--generator", str(gen), "--classifier", str(clf),
                     "--num-images", "60", "--steps", "3", "--draws", "2", "--dtype", "bfloat16", "--threads", "1",
                     "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # All ten classes judged at once (they partition the generator), under the --dtype's autocast.
    assert seen == {**seen, "k": 10, "exhaustive": True, "draws": 2, "n": 60, "bf16": True}
    assert "the verdict against the classifier's labels" in printed.out
    cal, entry = ModelCalibration.read(out)
    assert entry["labels"] == "model" and entry["settings"]["labels"] == "model" and entry["settings"]["draws"] == 2
    sha = models.weights_sha256(gen, "generator")
    assert entry["model"] == {"kind": "generator", "path": str(gen), "weights_sha256": sha}
    assert entry["generator_sha256"] == sha and models.load_calibration(gen) == cal
    # The fit's labels are the verdict's p of the fitted classes: their expected counts are the fit's positives.
    p = seen["verdict"].p
    for name, positives in zip(entry["classes"], entry["fits"]["all"]["positives"], strict=True):
        assert positives == pytest.approx(float(p[:, CLASS_NAMES.index(name)].sum()))
    assert set(entry["agreement"]["auc"]) == set(CLASS_NAMES) and 0 <= entry["agreement"]["argmax"] <= 1


def test_an_old_calibration_file_without_the_model_record_is_still_read(tmp_path):
    fit = calibration.Calibration(priors=[0.1], temperature=0.5, offset=0.01, nll=0.3, baseline_nll=0.5, auc={},
                                  positives=[10], samples=100)
    old = {"offset_unit": calibration.OFFSET_UNIT, "generator_sha256": "abc", "settings": {"p_max": 0.9},
           "classes": ["Dress"], "fits": {"all": fit.as_dict()}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    cal, entry = ModelCalibration.read(tmp_path / "old.json")
    assert cal == ModelCalibration(("Dress",), (0.1,), 0.5, 0.01, 0.9) and "model" not in entry
    with pytest.raises(ConfigError, match="model kind must be one of generator, diffusers"):
        calibration.model_record("onnx", "x")
    with pytest.raises(ConfigError, match="labels must be one of model, classifier"):
        calibration.calibration_entry({"all": fit}, ["Dress"], {"p_max": 0.9},
                                      model=calibration.model_record("generator", "g"), labels="human")
    assert np.isclose(cal.priors[0], 0.1)


def test_dng_sd_samples_as_its_calibration_and_sld_has_one_default_preset():
    import inspect

    from dng.guidance import SafeLatentDiffusion
    from dng.pipelines import calibrate_pipeline
    from dng.vision.generate import make_rule

    sd = cli.build_parser().parse_args(["sd", "--model", "m", "--prompt", "p", "--negative", "n", "--out", "x"])
    assert sd.steps == inspect.signature(calibrate_pipeline).parameters["num_inference_steps"].default
    sample = cli.build_parser().parse_args(["sample", "--out", "x"])
    presets = {sample.preset, inspect.signature(SafeLatentDiffusion).parameters["preset"].default,
               inspect.signature(make_rule).parameters["sld_preset"].default}
    assert len(presets) == 1


def test_the_commands_help_states_the_libraries_defaults(capsys):
    import inspect

    from dng.calibration import fit
    from dng.pipelines import calibrate_pipeline

    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = inspect.signature(calibrate_pipeline).parameters
    assert f"(default {verdict.DRAWS})" in text and f"with --model {defaults['num_images'].default})" in text
    assert f"with --model {defaults['num_inference_steps'].default})" in text
    assert f"images per pipeline call (default {defaults['batch_size'].default})" in text
    # The clamp a fit assumes is the tracker's own, in the command, the pipeline calibration and the fit.
    assert f"(default {DNGConfig.p_max:g}, DNG's)" in text
    assert defaults["p_max"].default == inspect.signature(fit).parameters["p_max"].default == DNGConfig.p_max
    assert cli.main(["calibrate", "--draws", "8"]) == 2
    assert "--draws sets the model's verdict: it applies to --labels model" in capsys.readouterr().err


def test_calibrate_command_takes_sd3_and_flux_folders(flow_pipe, tmp_path, capsys):
    """dng calibrate --model on an SD3 or Flux folder: the chains at the model's own guidance, on the LTX sibling."""
    folder, out = tmp_path / "model", tmp_path / "flow.calibration.json"
    flow_pipe.save_pretrained(folder)
    (folder / "model_index.json").write_text((folder / "model_index.json").read_text().replace("DNGPipeline",
                                                                                              "Pipeline"))
    code = cli.main(["calibrate", "--model", str(folder), "--prompt", "a cat", "--concept", "red", "--prior", "0.5",
                     "--num-images", "40", "--steps", "3", "--draws", "4", "--height", "16", "--width", "16",
                     "--batch-size", "8", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    flux = isinstance(flow_pipe, FluxDNGPipeline)
    assert ("the distilled guidance of the model on 1 prompt(s)" in printed.out) == flux
    cal, entry = ModelCalibration.read(out)
    assert cal.concepts == ("red",) and entry["settings"]["sampler"] == "LTXEulerAncestralRFScheduler"

