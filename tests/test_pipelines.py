"""SD and SDXL pipelines with DNG on tiny offline models: identities with the parent, trace, refusals."""

import argparse
import csv
import inspect
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
)

from dng import cli
from dng.calibration import ModelCalibration
from dng.commands import sd as sd_command
from dng.config import PRESETS, DNGConfig
from dng.errors import ConfigError
from dng.guidance import DynamicNegativeGuidance, NegativePrompt, SafeLatentDiffusion
from dng.pipelines import StableDiffusionDNGPipeline, StableDiffusionXLDNGPipeline
from dng.pipelines.common import guidance_rule, sampler_for
from dng.pipelines.report import summarize_trace
from dng.pipelines.tiny import sd_components, sdxl_components
from dng.posterior import log_snr_gain
from dng.sampler import Trace
from dng.schedulers import NamedSampler, stochastic

CALL = dict(prompt=["a cat", "a dog"], num_inference_steps=3, height=16, width=16, output_type="np")
PIPELINES = [(StableDiffusionDNGPipeline, StableDiffusionPipeline), (StableDiffusionXLDNGPipeline,
                                                                     StableDiffusionXLPipeline)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_parent(tmp_path_factory):
    """The parent pipeline with SD's own (deterministic) PNDM scheduler."""
    return _quiet(StableDiffusionPipeline(**sd_components(tmp_path_factory.mktemp("sd"))))


@pytest.fixture()
def sd_pair(sd_parent):
    """(parent, DNG pipeline) sharing components, both on Euler Ancestral."""
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = EulerAncestralDiscreteScheduler.from_config(sd_parent.scheduler.config)
    return parent, _quiet(StableDiffusionDNGPipeline.from_pipe(parent))


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    parent = _quiet(StableDiffusionXLPipeline(**sdxl_components(tmp_path_factory.mktemp("sdxl"))))
    return parent, _quiet(StableDiffusionXLDNGPipeline.from_pipe(parent))


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pair", ["sd_pair", "sdxl_pair"])
def test_zero_scale_equals_parent_plain_cfg(pair, request):
    parent, pipe = request.getfixturevalue(pair)
    expected = parent(**CALL, generator=_seed()).images
    out = pipe(**CALL, negative_prompt="red", dng=DNGConfig(lam0=0), generator=_seed(), return_trace=True)
    np.testing.assert_array_equal(out.images, expected)
    assert torch.all(out.trace.scale == 0)


@pytest.mark.parametrize("pair", ["sd_pair", "sdxl_pair"])
def test_frozen_posterior_equals_three_branch_np(pair, request):
    _, pipe = request.getfixturevalue(pair)
    lam0, prior = 12.0, 0.05
    rule = DynamicNegativeGuidance(lam0=lam0, prior=prior, temperature=0.0, offset=0.0, late_boost=1.0, push_cap=0.0)
    frozen = pipe(**CALL, negative_prompt="red", dng=rule, generator=_seed(), return_trace=True)
    np_out = pipe(**CALL, negative_prompt="red", dng=NegativePrompt(lam0 * prior / (1 - prior)), generator=_seed(),
                  return_trace=True)
    np.testing.assert_allclose(frozen.images, np_out.images, atol=1e-6)
    torch.testing.assert_close(frozen.trace.p, torch.full_like(frozen.trace.p, prior))
    assert torch.isnan(np_out.trace.p).all()


def test_np_is_diffusers_negative_prompt_on_any_scheduler(sd_parent):
    # PNDM is deterministic: NP needs no posterior, so it runs on PNDM itself.
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(sd_parent))
    expected = sd_parent(**CALL, negative_prompt=["red", "red"], generator=_seed()).images
    out = pipe(**CALL, negative_prompt="red", negative_guidance="np", generator=_seed())
    np.testing.assert_allclose(out.images, expected, atol=1e-5)
    assert np.isfinite(pipe(**CALL, negative_prompt="red", negative_guidance="sld").images).all()


def test_several_negatives_trace(sd_pair):
    _, pipe = sd_pair
    out = pipe(**CALL, negative_concepts=["red", ["cat", "dog"], "dog"], num_images_per_prompt=2,
               dng={"temperature": 1.0, "p_max": 0.5}, generator=_seed(), return_trace=True)
    trace = out.trace
    assert out.images.shape == (4, 16, 16, 3) and np.isfinite(out.images).all()
    assert trace.p.shape == trace.scale.shape == trace.llr.shape == (3, 4, 3)
    assert trace.p.dtype == torch.float32 and len(trace.timesteps) == 3
    torch.testing.assert_close(trace.p[0], torch.full((4, 3), PRESETS["default"].prior))
    assert torch.all((trace.p >= 1e-6 * (1 - 1e-5)) & (trace.p <= 0.5 * (1 + 1e-5)))
    torch.testing.assert_close(trace.scale, default_scale(trace, trace.p / (1 - trace.p)))
    # The last Euler step adds no noise, so it carries no likelihood ratio.
    assert torch.isfinite(trace.llr[:-1]).all() and torch.isnan(trace.llr[-1]).all()
    assert not torch.all(trace.p[1:] == PRESETS["default"].prior)


def default_scale(trace, odds) -> torch.Tensor:
    """The library default's scale lam0(sigma) * odds, capped at push_cap / (log-SNR gain), at each step of a trace."""
    return torch.stack([_default_scale(*map(float, levels), o) for levels, o in zip(trace.sigma, odds, strict=True)])


def _default_scale(sigma, sigma_next, odds):
    config = PRESETS["default"]
    gain = log_snr_gain(sigma, sigma_next)
    lam0 = config.lam0 * (config.late_boost if sigma < config.boost_sigma else 1.0)
    scale = lam0 * odds
    return scale.clamp(max=config.push_cap / gain) if gain else scale


def test_exclusive_mode_and_tuple_output(sd_pair):
    _, pipe = sd_pair
    images, nsfw, trace = pipe(**CALL, negative_concepts=["cat", "dog"], dng={"mode": "exclusive"},
                               return_dict=False, return_trace=True)
    p = trace.p
    torch.testing.assert_close(trace.scale, default_scale(trace, p / (1 - p.sum(-1, keepdim=True))))
    assert images.shape[0] == 2 and nsfw is None


@pytest.mark.parametrize("method", ["dng", "np", "sld"])
def test_sdxl_runs_every_method(sdxl_pair, method):
    _, pipe = sdxl_pair
    out = pipe(**CALL, negative_concepts=["red", "cat"], negative_guidance=method, generator=_seed(),
               return_trace=True)
    assert np.isfinite(out.images).all() and out.trace.scale.shape == (3, 2, 2)


NOTE = "DNG reads its posterior from the noise each step adds"


def _notes(caplog):
    return [r for r in caplog.records if r.name == "dng.pipelines.common" and r.message.startswith(NOTE)]


def test_untracked_scheduler_samples_with_its_sibling_and_leaves_the_pipeline_as_it_is(sd_parent, caplog):
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(sd_parent))
    scheduler, config = pipe.scheduler, dict(pipe.scheduler.config)
    components = dict(pipe.components)
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = stochastic(sd_parent.scheduler)
    expected = parent(**CALL, generator=_seed()).images
    with caplog.at_level(logging.INFO):
        out = pipe(**CALL, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed(), return_trace=True)
        guided = pipe(**CALL, negative_prompt="red", generator=_seed(), return_trace=True)
    # DNG ran, on the sibling: its noise levels and evidence, and the parent's image on that sibling at lam0 0.
    np.testing.assert_array_equal(out.images, expected)
    assert torch.isfinite(guided.trace.llr[:-1]).all() and (guided.trace.scale > 0).all()
    assert pipe.scheduler is scheduler and type(scheduler).__name__ == "PNDMScheduler"
    assert dict(pipe.scheduler.config) == config and pipe.components == components
    [note] = _notes(caplog)
    assert note.levelno == logging.WARNING
    assert "PNDMScheduler adds none" in note.message and "with EulerAncestralDiscreteScheduler" in note.message
    assert "pipe.scheduler is left as it is" in note.message


def test_a_singlestep_sde_solver_of_order_2_samples_dng_with_its_multistep_sibling(sd_parent, caplog):
    """DNG tracks a singlestep stage as one update, clearly worse than on the multistep sibling: the pipeline prefers
    the sibling for DNG (with a note that says why), and leaves NP and order 1 as they are."""
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = DPMSolverSinglestepScheduler.from_config(sd_parent.scheduler.config,
                                                                 algorithm_type="sde-dpmsolver++", solver_order=2)
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(parent))
    multistep = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    multistep.scheduler = stochastic(parent.scheduler)
    assert type(multistep.scheduler) is DPMSolverMultistepScheduler
    expected = multistep(**CALL, generator=_seed()).images
    with caplog.at_level(logging.INFO):
        out = pipe(**CALL, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed())
        pipe(**CALL, negative_prompt="red", negative_guidance="np", generator=_seed())
    np.testing.assert_array_equal(out.images, expected)
    [note] = [r for r in caplog.records if r.name == "dng.pipelines.common" and "one update per stage" in r.message]
    assert "DPMSolverSinglestepScheduler at solver_order 2" in note.message
    assert "with DPMSolverMultistepScheduler, its stochastic sibling" in note.message
    assert "assign another stochastic scheduler" in note.message and pipe.scheduler is parent.scheduler
    order1 = DPMSolverSinglestepScheduler.from_config(parent.scheduler.config, solver_order=1)
    assert sampler_for(order1, DynamicNegativeGuidance(), 0.0) == (NamedSampler(order1, 0.0), None)


@pytest.mark.parametrize("make,eta,said", [
    (DDIMScheduler.from_config, 1.0, "eta 1 (DDPM-like)"),
    (TCDScheduler.from_config, 0.3, "gamma 0.3, TCD's default"),
])
def test_eta_schedulers_get_their_noise_where_the_call_gives_none(sd_parent, make, eta, said, caplog):
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = make(sd_parent.scheduler.config)
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(parent))
    expected = parent(**CALL, eta=eta, generator=_seed()).images
    with caplog.at_level(logging.INFO):
        out = pipe(**CALL, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed(), return_trace=True)
        given = pipe(**CALL, negative_prompt="red", eta=eta, dng={"lam0": 0.0}, generator=_seed())
        plain = pipe(**CALL, negative_prompt="red", negative_guidance="np", generator=_seed())
    np.testing.assert_array_equal(out.images, expected)
    np.testing.assert_array_equal(given.images, expected)
    assert torch.isfinite(out.trace.llr).any() and pipe.scheduler is parent.scheduler
    [note] = _notes(caplog)  # the call that gave eta itself, and NP, change nothing
    assert f"{type(parent.scheduler).__name__} at eta 0 adds none" in note.message and said in note.message
    # NP samples at the call's eta 0, as the parent does.
    np.testing.assert_allclose(plain.images, parent(**CALL, eta=0.0, negative_prompt=["red"] * 2,
                                                    generator=_seed()).images, atol=1e-5)


def test_a_scheduler_without_a_stochastic_sibling_is_refused_before_any_model_runs(sd_parent, monkeypatch):
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(sd_parent))
    pipe.scheduler = DDPMScheduler.from_config(sd_parent.scheduler.config, variance_type="learned")
    _no_model_may_run(pipe, monkeypatch)
    with pytest.raises(ConfigError, match="DDPMScheduler cannot be used with posterior tracking"):
        pipe(**CALL, negative_prompt="red")


def test_a_calibration_is_applied_for_the_calls_concepts(sd_pair):
    _, pipe = sd_pair
    calibration = ModelCalibration(("red", "cat"), (0.02, 0.3), temperature=0.25, offset=0.5, p_max=0.9)
    out = pipe(**CALL, negative_concepts=["red", "dog"], dng=calibration, generator=_seed(), return_trace=True)
    # "dog" is not calibrated: it keeps the default preset's prior.
    torch.testing.assert_close(out.trace.p[0], torch.tensor([[0.02, 0.1]] * 2))
    config = PRESETS["default"].replace(prior=(0.02, 0.1), temperature=0.25, offset=0.5, p_max=0.9)
    assert guidance_rule(None, calibration, 7.5, ["red", "dog"]).config == config
    explicit = pipe(**CALL, negative_concepts=["red", "dog"], dng=config, generator=_seed(), return_trace=True)
    np.testing.assert_array_equal(out.images, explicit.images)
    torch.testing.assert_close(out.trace.llr, explicit.trace.llr, rtol=0, atol=0, equal_nan=True)
    # The calibrated temperature scales the evidence: at lam0 0 the chains are the same, and so is the raw ratio.
    idle = dict(lam0=0.0, prior=(0.02, 0.1), offset=0.0, p_max=0.9)
    tempered, raw = (pipe(**CALL, negative_concepts=["red", "dog"], dng=DNGConfig(**idle, temperature=temperature),
                          generator=_seed(), return_trace=True).trace.llr for temperature in (0.25, 1.0))
    torch.testing.assert_close(tempered[:-1], 0.25 * raw[:-1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dng_scale=3.0), r"dng_scale was replaced by one argument: dng=DNGConfig\(lam0=3\.0\)"),
    (dict(dng_preset="paper-sd", dng_prior=0.02), r"dng_preset, dng_prior were replaced by one argument: "
                                                  r"dng=DNGConfig\.preset\('paper-sd', prior=0\.02\)"),
    (dict(dng_preset="paper-sd"), r"dng='paper-sd'"),
    (dict(dng_mode="exclusive", dng_stochastic=True), r"dng=DNGConfig\(mode='exclusive'\).*dng_stochastic was "
                                                      r"removed: .*leaving pipe\.scheduler as it is; drop it"),
])
@pytest.mark.parametrize("negative", [dict(negative_prompt="red"), {}])
def test_the_former_dng_arguments_name_their_replacement(sd_pair, kwargs, match, negative, monkeypatch):
    _, pipe = sd_pair
    _no_model_may_run(pipe, monkeypatch)
    with pytest.raises(ConfigError, match=match):
        pipe(**CALL, **negative, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(negative_concepts=[]), "empty"),
    (dict(negative_prompt=["red", "cat", "dog"]), "list of 2 strings"),
    (dict(negative_concepts=["red", ["cat"]]), "list of 2 strings"),
    (dict(negative_prompt="red", negative_concepts=["cat"]), "not both"),
    (dict(negative_prompt="red", dng={"prior": 1.5}), "prior"),
    (dict(negative_prompt="red", dng={"prior": (0.1, 0.2)}), "2 priors given for 1 negative concepts"),
    (dict(negative_prompt="red", dng={"p_min": 0.5, "p_max": 0.4}), "p_min"),
    (dict(negative_prompt="red", dng={"lam0": -1.0}), "lam0"),
    (dict(negative_prompt="red", dng={"scale": 2.0}), "unknown DNG setting 'scale'; the settings are lam0"),
    (dict(negative_prompt="red", dng={"temperature": float("nan")}), "temperature"),
    (dict(negative_prompt="red", dng={"mode": "both"}), "mode"),
    (dict(negative_prompt="red", dng="paper"), "unknown DNG preset 'paper'"),
    (dict(negative_prompt="red", dng=2.0), "dng= takes a preset name"),
    (dict(negative_prompt="red", negative_guidance="cfg"), "negative_guidance"),
    (dict(negative_prompt="red", negative_guidance="np", dng={"lam0": 2.0}),
     r"dng= sets DNG, which negative_guidance='np' does not use"),
    (dict(negative_prompt="red", negative_guidance="sld", dng="paper-sd"), "negative_guidance='sld' does not use"),
    (dict(negative_prompt="red", negative_guidance=NegativePrompt(2.0)),
     r"negative_guidance takes a method name.*dng=NegativePrompt\(\.\.\.\)"),
    (dict(negative_prompt="red", negative_guidance="dng", dng=NegativePrompt(2.0)),
     r"dng=NegativePrompt\(\.\.\.\) is the rule itself; drop negative_guidance='dng'"),
    (dict(dng="paper-sd"), "dng needs a negative concept"),
    (dict(negative_guidance="np"), "negative_guidance needs a negative concept"),
    (dict(negative_prompt="red", guidance_rescale=0.7), "guidance_rescale"),
    (dict(negative_prompt="red", timesteps=[999, 500]), "timesteps"),
    (dict(negative_prompt="red", callback_steps=2), "callback_steps"),
    (dict(return_trace=True), "return_trace"),
    (dict(negative_prompt="red", height=20), r"multiples of 8, got 20 x 16; e\.g\. 24 x 16"),
    (dict(negative_prompt="red", width=-8), "positive multiples of 8"),
    (dict(negative_prompt="red", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(negative_prompt="red", callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(negative_prompt="red", negative_guidance="np", callback_on_step_end_tensor_inputs=["dng_p"]),
     "asks for 'dng_p', which this call cannot give: NegativePrompt has no posterior"),
    (dict(negative_prompt="red", dng=SafeLatentDiffusion("max"), callback_on_step_end_tensor_inputs=["dng_p"]),
     "SafeLatentDiffusion has no posterior"),
    (dict(callback_on_step_end_tensor_inputs=["latents", "dng_applied_scale"]),
     "callback_on_step_end_tensor_inputs 'dng_applied_scale' needs a negative concept"),
])
@pytest.mark.parametrize("pair", ["sd_pair", "sdxl_pair"])
def test_bad_inputs(pair, request, kwargs, match, monkeypatch):
    _, pipe = request.getfixturevalue(pair)
    _no_model_may_run(pipe, monkeypatch)
    with pytest.raises(ConfigError, match=match):
        pipe(**{**CALL, **kwargs})


def _no_model_may_run(pipe, monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            monkeypatch.setattr(getattr(pipe, name), "forward", run)


def test_mismatched_negative_embeds(sd_pair):
    _, pipe = sd_pair
    embeds = pipe.encode_prompt(["red"] * 3, "cpu", 1, False)[0]
    with pytest.raises(ConfigError, match="negative_prompt_embeds"):
        pipe(**CALL, negative_prompt_embeds=embeds)


def test_negative_embeds_equal_negative_prompt(sd_pair):
    _, pipe = sd_pair
    embeds = pipe.encode_prompt(["red"] * 2, "cpu", 1, False)[0]
    by_text = pipe(**CALL, negative_prompt="red", generator=_seed()).images
    by_embeds = pipe(**CALL, negative_prompt_embeds=embeds, generator=_seed()).images
    np.testing.assert_allclose(by_text, by_embeds, atol=1e-6)


def test_from_pipe_shares_components_both_ways(sd_parent):
    pipe = StableDiffusionDNGPipeline.from_pipe(sd_parent)
    assert isinstance(pipe, StableDiffusionDNGPipeline) and pipe.unet is sd_parent.unet
    back = StableDiffusionPipeline.from_pipe(pipe)
    assert type(back) is StableDiffusionPipeline and back.text_encoder is sd_parent.text_encoder


def test_callback_sees_posterior_and_may_replace_latents(sd_pair):
    _, pipe = sd_pair
    seen = []

    def callback(p, i, t, tensors):
        seen.append({k: v.clone() for k, v in tensors.items()})
        # diffusers' callbacks return what they were given, read-only entries included; a new tensor replaces.
        return {**tensors, "latents": torch.zeros_like(tensors["latents"])} if i == 2 else tensors

    inputs = ["latents", "prompt_embeds", "dng_p", "dng_applied_scale"]
    out = pipe(**{**CALL, "output_type": "latent"}, negative_prompt="red", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=inputs, generator=_seed(), return_trace=True)
    assert [sorted(step) for step in seen] == [sorted(inputs)] * 3
    assert [step["prompt_embeds"].shape[0] for step in seen] == [6] * 3
    torch.testing.assert_close(torch.stack([step["dng_p"] for step in seen]), out.trace.p)
    torch.testing.assert_close(torch.stack([step["dng_applied_scale"] for step in seen]), out.trace.scale)
    assert torch.all(out.images == 0) and not torch.all(seen[-1]["latents"] == 0)


def test_callback_may_replace_the_conditioning_but_not_its_rows(sd_pair):
    _, pipe = sd_pair

    def unconditional_negative(p, i, t, tensors):
        embeds = tensors["prompt_embeds"].clone()
        embeds[4:] = embeds[:2]  # the negative branch becomes the unconditional one: no evidence, no push
        return {"prompt_embeds": embeds}

    out = pipe(**CALL, negative_prompt="red", callback_on_step_end=unconditional_negative,
               callback_on_step_end_tensor_inputs=["prompt_embeds"], generator=_seed(), return_trace=True)
    assert torch.all(out.trace.llr[1:-1] == 0) and torch.all(out.trace.p[2:] == out.trace.p[1])

    def cut(p, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"][-1:]}  # diffusers' SDCFGCutoffCallback, on 2 branches

    with pytest.raises(ConfigError, match="returned prompt_embeds with 1 rows; it holds every branch"):
        pipe(**CALL, negative_prompt="red", callback_on_step_end=cut,
             callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_posterior_stays_float32_under_bfloat16(tmp_path):
    pipe = _quiet(StableDiffusionDNGPipeline(**sd_components(tmp_path))).to(torch.bfloat16)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe(**{**CALL, "output_type": "latent"}, negative_prompt="red", generator=_seed(), return_trace=True)
    assert out.images.dtype == torch.bfloat16
    assert out.trace.p.dtype == torch.float32 and torch.isfinite(out.trace.llr[:-1]).all()
    assert torch.all((out.trace.p > 0) & (out.trace.p <= PRESETS["default"].p_max + 1e-6))


def _sd_command(argv):
    parser = argparse.ArgumentParser()
    sd_command.register({"top": parser.add_subparsers()})
    args = parser.parse_args(["sd", *argv])
    return args.func(args)


def test_sd_command_writes_images_trace_and_plot(sd_parent, tmp_path, capsys, caplog):
    sd_parent.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert _sd_command(["--model", str(tmp_path / "model"), "--prompt", "a cat", "--negative", "red", "--negative",
                            "dog", "--steps", "3", "--num-images", "2", "--cfg-scale", "5", "--height", "16", "--width",
                            "16", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "image_1.png", "summary.csv", "trace.csv",
                                                     "trace.png"]
    # The pipeline samples DNG with the sibling of the folder's PNDM; the command says so, once: the pipeline's
    # own note of the switch is not logged on top.
    assert not _notes(caplog)
    assert ("sampling with EulerAncestralDiscreteScheduler (the stochastic sibling of the folder's PNDMScheduler, as "
            "DNG needs)") in capsys.readouterr().out
    with open(out / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    # The summary restates the trace per image and concept, with the evidence the prompted bench reports.
    pairs = [(f"image_{i}.png", c) for i in (0, 1) for c in ("red", "dog")]
    assert [(r["image"], r["concept"]) for r in summary] == pairs
    for r in summary:
        mine = [t for t in rows if f"image_{t['image']}.png" == r["image"] and t["concept"] == r["concept"]]
        scales, ps = [float(t["scale"]) for t in mine], [float(t["p"]) for t in mine]
        assert float(r["mean_scale"]) == pytest.approx(sum(scales) / 3, rel=1e-4)
        assert float(r["max_scale"]) == pytest.approx(max(scales), rel=1e-5)
        assert float(r["final_p"]) == pytest.approx(ps[-1], rel=1e-5)
        assert r["activated"] == str(any(p >= 0.5 and s > 0 for p, s in zip(ps, scales, strict=True))).lower()
    assert len(rows) == 3 * 2 * 2 and {r["concept"] for r in rows} == {"red", "dog"}
    assert all(0 < float(r["p"]) < 1 for r in rows)
    # The command applies the library default, as the pipelines and the Python class do.
    sigmas = sorted({float(r["sigma"]) for r in rows}, reverse=True) + [0.0]
    for r in rows:
        odds = torch.tensor(float(r["p"]) / (1 - float(r["p"])))
        sigma = float(r["sigma"])
        expected = _default_scale(sigma, sigmas[sigmas.index(sigma) + 1], odds)
        assert float(r["scale"]) == pytest.approx(float(expected), rel=1e-4)


def test_summary_reads_activation_from_the_posterior():
    # Image 0 stays near the prior; image 1's p crosses 1/2 at the second step; scales as lam0 p / (1 - p), lam0 2.
    p = torch.tensor([[0.1, 0.1], [0.05, 0.6], [0.01, 0.3]])[:, :, None]
    trace = Trace(torch.tensor([999, 500, 1]), p, 2 * p / (1 - p), torch.zeros_like(p), torch.ones(3, 2))
    rows = summarize_trace(trace, ["red"], ["a.png", "b.png"])
    assert [(r["image"], r["activated"]) for r in rows] == [("a.png", False), ("b.png", True)]
    assert [(r["final_p"], r["max_p"]) for r in rows] == [pytest.approx((0.01, 0.1)), pytest.approx((0.3, 0.6))]
    assert rows[1]["max_scale"] == pytest.approx(3.0)
    assert rows[1]["mean_scale"] == pytest.approx((2 / 9 + 3 + 6 / 7) / 3)
    # lam0 0 tracks without acting: nothing activated.
    idle = Trace(trace.timesteps, p, torch.zeros_like(p), trace.llr, trace.sigma)
    assert [r["activated"] for r in summarize_trace(idle, ["red"], ["a.png", "b.png"])] == [False, False]
    # NP and SLD have no posterior: their scale is summarised, activation is left empty.
    constant = Trace(trace.timesteps, torch.full_like(p, float("nan")), torch.full_like(p, 6.5), p, trace.sigma)
    rows = summarize_trace(constant, ["red"], ["a"])
    assert [(r["mean_scale"], r["max_scale"], r["activated"], r["max_p"]) for r in rows] == [(6.5, 6.5, None, None)]


@pytest.fixture()
def sd_cli(monkeypatch):
    """`dng` with the sd command alone, so that these tests read no other command's module."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["dng.commands.sd"])
    return cli.main


def _sd_folder(tmp_path, class_name="StableDiffusionPipeline"):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(f'{{"_class_name": "{class_name}"}}')
    return tmp_path / "model"


@pytest.mark.parametrize("argv,match", [
    (["--height", "20"], r"--height must be a positive multiple of 8, got 20; e\.g\. 24"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--cfg-scale", "-2"], "--cfg-scale must be a finite number >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
    (["--negative", " "], "--negative is empty"),
    (["--dng", "lam0=nan"], "lam0 must be a finite number"),
    (["--dng", "prior=1.5"], "prior"),
    (["--dng", "tau=1"], "NAME one of lam0, prior"),
    (["--method", "np", "--dng", "prior=0.2"], "--dng applies to --method dng only, not np"),
    (["--method", "sld", "--dng-preset", "paper-sd"], "--dng-preset applies to --method dng only"),
    (["--method", "sld", "--np-scale", "3"], "--np-scale applies to --method np only"),
    (["--np-scale", "nan"], "--np-scale applies to --method np only"),
    (["--method", "np", "--np-scale", "nan"], "--np-scale must be a finite number >= 0, got nan"),
    (["--method", "np", "--sld-preset", "max"], "--sld-preset applies to --method sld only"),
    (["--device", "nonsense"], "--device nonsense is not usable here"),
    (["--out", "{file}"], "is a file; give a folder"),
    (["--out", "{file}/sub"], "is a file, not a folder"),
])
def test_sd_command_refuses_bad_options_before_loading(sd_cli, tmp_path, argv, match, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the options")

    monkeypatch.setattr(StableDiffusionDNGPipeline, "from_pretrained", load)
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    base = ["--model", str(_sd_folder(tmp_path)), "--prompt", "a cat", "--negative", "red", "--out", str(tmp_path)]
    assert sd_cli(["sd", *base, *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.count("\n") == 1, err


def test_sd_command_takes_the_former_spellings_with_a_note(capsys):
    parser = argparse.ArgumentParser()
    sd_command.register({"top": parser.add_subparsers()})
    args = parser.parse_args(["sd", "--model", "m", "--prompt", "a", "--negative", "b", "--out", "o", "--cfg", "2",
                              "--images", "3"])
    assert (args.cfg_scale, args.num_images) == (2.0, 3)
    assert capsys.readouterr().err.splitlines() == ["dng: note: --cfg is now --cfg-scale",
                                                     "dng: note: --images is now --num-images"]
    with pytest.raises(SystemExit):
        parser.parse_args(["sd", "--help"])
    usage = capsys.readouterr().out
    assert "--cfg-scale" in usage and "--num-images" in usage
    assert not re.search(r"--cfg\b(?!-)|--images", usage)


def test_sd_command_sets_dng_like_the_other_commands(tmp_path):
    parser = argparse.ArgumentParser()
    sd_command.register({"top": parser.add_subparsers()})
    args = parser.parse_args(["sd", "--model", "m", "--prompt", "a", "--negative", "b", "--negative", "c", "--out", "o",
                              "--dng-preset", "paper-sd", "--dng", "lam0=3", "--dng", "prior=0.2,0.3",
                              "--mode", "exclusive"])
    rule = sd_command._guidance(args, 7.5)
    assert rule.config == PRESETS["paper-sd"].replace(lam0=3.0, prior=(0.2, 0.3), mode="exclusive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_sd_command_refuses_cuda_on_a_cpu_build(sd_cli, tmp_path, capsys):
    base = ["--model", str(_sd_folder(tmp_path)), "--prompt", "a", "--negative", "b", "--out", str(tmp_path)]
    assert sd_cli(["sd", *base, "--device", "cuda"]) == 2
    assert "--device cuda is not usable here (Torch not compiled with CUDA enabled); use --device cpu" in \
        capsys.readouterr().err


def test_sd_command_says_why_it_leaves_a_singlestep_solver(sd_parent, tmp_path, capsys):
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = DPMSolverSinglestepScheduler.from_config(sd_parent.scheduler.config,
                                                                 algorithm_type="sde-dpmsolver++", solver_order=2)
    parent.save_pretrained(tmp_path / "model")
    assert _sd_command(["--model", str(tmp_path / "model"), "--prompt", "a cat", "--negative", "red", "--steps", "2",
                        "--height", "16", "--width", "16", "--out", str(tmp_path / "out")]) == 0
    assert ("sampling with DPMSolverMultistepScheduler (the stochastic sibling of the folder's "
            "DPMSolverSinglestepScheduler, on which DNG tracks best)") in capsys.readouterr().out


def test_sd_command_refuses_more_steps_than_the_schedule_has(sd_parent, tmp_path):
    sd_parent.save_pretrained(tmp_path / "model")
    with pytest.raises(ConfigError, match="--steps 1001 is more than the scheduler's 1000 training timesteps"):
        _sd_command(["--model", str(tmp_path / "model"), "--prompt", "a", "--negative", "b", "--steps", "1001",
                     "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing", "not a folder"),
    (lambda d: d, "no model_index.json"),
    (lambda d: (d / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}') and d,
     "KandinskyPipeline"),
])
def test_sd_command_explains_bad_model_folders(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match):
        _sd_command(["--model", str(make(tmp_path)), "--prompt", "a", "--negative", "b", "--out", str(tmp_path)])


@pytest.mark.parametrize("make, eta", [
    (lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     0.0),
    # Order 1: of order 2 or 3 the pipeline samples DNG with the multistep sibling (a test above).
    (lambda c: DPMSolverSinglestepScheduler.from_config(c, algorithm_type="sde-dpmsolver++", solver_order=1), 0.0),
    (lambda c: KDPM2AncestralDiscreteScheduler.from_config(c), 0.0),
    (lambda c: TCDScheduler.from_config(c), 0.3),
    (lambda c: LCMScheduler.from_config(c), 0.0),
    (lambda c: DDPMScheduler.from_config(c), 0.0),
])
def test_dng_at_scale_zero_is_plain_cfg_on_every_stochastic_scheduler(sd_parent, make, eta):
    parent = _quiet(StableDiffusionPipeline.from_pipe(sd_parent))
    parent.scheduler = make(sd_parent.scheduler.config)
    pipe = _quiet(StableDiffusionDNGPipeline.from_pipe(parent))
    call = {**CALL, "num_inference_steps": 4, "eta": eta}
    expected = parent(**call, generator=_seed()).images
    out = pipe(**call, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed(), return_trace=True)
    np.testing.assert_array_equal(out.images, expected)
    assert torch.isfinite(out.trace.llr).any()  # the tracker read the steps
    guided = pipe(**call, negative_prompt="red", generator=_seed(), return_trace=True)
    assert np.isfinite(guided.images).all() and (guided.trace.scale > 0).any()


@pytest.mark.parametrize("cls,parent", PIPELINES)
def test_takes_the_parents_arguments_and_forwards_them_by_keyword(cls, parent, monkeypatch):
    params = [p for p in inspect.signature(parent.__call__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    ours = list(inspect.signature(cls.__call__).parameters.values())[:len(params)]
    # Positional callers of the parent get the same call: same names, order and defaults.
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in params]
    forwarded = {}

    def keyword_only(self, **kwargs):
        forwarded.update(kwargs)

    monkeypatch.setattr(parent, "__call__", keyword_only)
    # A distinct value per argument, so that a dropped, swapped or positional argument shows.
    values = {p.name: object() for p in params[1:] if p.name not in ("negative_prompt", "negative_prompt_embeds")}
    values["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds"]  # read for DNG's names first
    values["callback_steps"] = object()  # the parent's deprecated **kwargs pass through too
    cls.__call__(cls.__new__(cls), **values)
    assert forwarded == {**values, "negative_prompt": None, "negative_prompt_embeds": None}


@pytest.mark.parametrize("pair", ["sd_pair", "sdxl_pair"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_without_cfg_the_base_is_the_prompt_branch_as_in_the_parent(pair, scale, request):
    parent, pipe = request.getfixturevalue(pair)
    call = {**CALL, "guidance_scale": scale}
    # The parent ignores its negative prompt without CFG; "np" is that negative prompt, DNG at lam0 0 adds nothing.
    expected = parent(**call, negative_prompt="red", generator=_seed()).images
    for rule in (dict(negative_guidance="np"), dict(dng={"lam0": 0.0})):
        np.testing.assert_allclose(pipe(**call, negative_prompt="red", **rule, generator=_seed()).images, expected,
                                   atol=1e-5)
    # DNG's term is against the unconditional branch, which the call still evaluates: it keeps working.
    guided = pipe(**call, negative_prompt="red", generator=_seed(), return_trace=True)
    assert (guided.trace.scale > 0).all() and np.abs(guided.images - expected).max() > 1e-3


@pytest.mark.parametrize("pair", ["sd_pair", "sdxl_pair"])
def test_interrupt_from_the_callback_stops_after_that_step_as_in_the_parent(pair, request):
    parent, pipe = request.getfixturevalue(pair)
    steps = []

    def stop_after_first(p, i, t, tensors):
        steps.append(i)
        p._interrupt = True
        return {}

    call = {**CALL, "num_inference_steps": 4, "output_type": "latent", "callback_on_step_end": stop_after_first}
    expected = parent(**call, generator=_seed()).images
    out = pipe(**call, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed(), return_trace=True)
    assert steps == [0, 0]  # one step each
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)
    assert out.trace.scale.shape[0] == len(out.trace.timesteps) == 1


@pytest.mark.parametrize("cls,parent", PIPELINES)
def test_docstring_example_runs(cls, parent, request, tmp_path, monkeypatch):
    # The example as a user runs it, with a tiny pipeline on the scheduler the real folder ships standing in for the
    # downloaded weights: SD's PNDM, SDXL's Euler.
    if cls is StableDiffusionDNGPipeline:
        pipe, made = request.getfixturevalue("sd_parent"), ("street.png", "final_p", (1, 2))
    else:
        pipe, made = request.getfixturevalue("sdxl_pair")[0], ("beach.png", "activated", (1, 1))
        pipe = _quiet(StableDiffusionXLPipeline.from_pipe(pipe))
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *args, **kwargs: _quiet(c.from_pipe(pipe))))
    monkeypatch.chdir(tmp_path)
    code = "\n".join(re.findall(r"^\s*(?:>>>|\.\.\.) ?(.*)$", cls.__call__.__doc__, flags=re.M))
    namespace = {}
    exec(code.replace("num_inference_steps=30", "num_inference_steps=3"), namespace)
    file, name, shape = made
    assert (tmp_path / file).is_file() and namespace[name].shape == shape
