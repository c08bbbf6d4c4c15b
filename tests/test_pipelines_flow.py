"""SD3 and Flux pipelines with DNG on tiny offline models: identities with the parent, trace, dng sd."""

import argparse
import csv
import inspect
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    LTXEulerAncestralRFScheduler,
    StableDiffusion3Pipeline,
)

from dng.commands import sd as sd_command
from dng.config import DNGConfig
from dng.errors import ConfigError
from dng.pipelines import FluxDNGPipeline, StableDiffusion3DNGPipeline
from dng.pipelines.tiny import flux_components, sd3_components
from dng.schedulers import stochastic

CALL = dict(prompt=["a cat", "a dog"], num_inference_steps=3, height=16, width=16, output_type="np")
# name -> (DNG pipeline, its parent, tiny components)
MODELS = {
    "sd3": (StableDiffusion3DNGPipeline, StableDiffusion3Pipeline, sd3_components),
    "flux-dev": (FluxDNGPipeline, FluxPipeline, flux_components),
    "flux-schnell": (FluxDNGPipeline, FluxPipeline, lambda d: flux_components(d, guidance_embeds=False)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    """(name, DNG pipeline, parent): both on the folder's own deterministic flow-matching Euler."""
    cls, parent_cls, components = MODELS[request.param]
    parent = _quiet(parent_cls(**components(tmp_path_factory.mktemp(request.param))))
    return request.param, _quiet(cls.from_pipe(parent)), parent


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def _parent_sigmas(parent, call):
    """The sigmas, final 0 included, the parent walks on its own scheduler: diffusers' FlowMatchEulerDiscreteScheduler
    shifting them itself (SD3's fixed shift, Flux-dev's shift of the resolution, Flux-schnell's none)."""
    seen = []

    def stop(pipe, i, t, tensors):
        seen.append(pipe.scheduler.sigmas.clone())
        pipe._interrupt = True
        return {}

    call = {**call, "output_type": "latent", "callback_on_step_end": stop}
    parent(**call, generator=_seed())
    assert type(parent.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    return seen[0]


def _parent_on_the_stochastic_sampler(parent, generator, call):
    """The parent's call on the stochastic sibling of its scheduler (LTX's Euler ancestral), whose step draws from
    `generator`, on the sigmas the parent walks on its own scheduler.

    LTX's scheduler takes given sigmas as they are and ignores mu, and Flux's parent always gives sigmas (unshifted):
    the parent gets the shifted ones, as the DNG call's sampler does. Given sigmas, LTX lists the final sigma's
    timestep too, at which the parent runs its transformer once more and the step returns the sample as it is.
    """
    reference = _quiet(type(parent).from_pipe(parent, scheduler=stochastic(parent.scheduler)))
    assert type(reference.scheduler).__name__ == "LTXEulerAncestralRFScheduler" and reference.scheduler.config.eta == 1
    step = reference.scheduler.step
    reference.scheduler.step = lambda *args, **kwargs: step(*args, generator=generator, **kwargs)
    sigmas = _parent_sigmas(parent, call)
    return lambda **kwargs: reference(**call, **kwargs, sigmas=sigmas)


def test_zero_scale_is_the_parent_on_the_same_stochastic_sampler(model, caplog):
    """lam0 = 0 gives the parent's own images, to the bit.

    The reference is the parent's own call (its encoding, its CFG arithmetic over its own batch of branches, its
    decoding) on the same stochastic scheduler, with one change: its scheduler.step gets the call's generator.
    diffusers' parents call step without one, so their stochastic images follow torch's global seed; our loop passes
    the user's generator, which makes a seed reproduce an image. With the same generator, the parent draws x_T and
    then each step's noise from it in the order our loop does. Comparing against our own loop without a rule instead
    would check the loop against itself.
    """
    name, pipe, parent = model
    generator = _seed()
    expected = _parent_on_the_stochastic_sampler(parent, generator, CALL)(generator=generator).images
    with caplog.at_level(logging.WARNING):
        out = pipe(**CALL, negative_prompt="red", dng=DNGConfig(lam0=0), generator=_seed(), return_trace=True)
    np.testing.assert_array_equal(out.images, expected)
    assert torch.all(out.trace.scale == 0) and torch.isfinite(out.trace.llr).any()  # the tracker read the steps
    # The pipeline chose the stochastic sampler and said so; pipe.scheduler is the folder's.
    assert "with LTXEulerAncestralRFScheduler, its stochastic sibling" in caplog.text
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not pipe.scheduler.config.stochastic_sampling


class _Walked(list):
    """(sigmas, timestep) of every step `cls.step` takes, once `spy` is set; `sampled()` keeps the last scheduler's
    (DNG's kernel check steps a copy of it first)."""

    def spy(self, monkeypatch, cls):
        step = cls.step

        def spy(scheduler, model_output, timestep, sample, **kwargs):
            self.append((scheduler, scheduler.sigmas.clone(), timestep))
            return step(scheduler, model_output, timestep, sample, **kwargs)

        monkeypatch.setattr(cls, "step", spy)
        return self

    def sampled(self):
        return [(sigmas, t) for scheduler, sigmas, t in self if scheduler is self[-1][0]]


def _walked(monkeypatch, cls):
    return _Walked().spy(monkeypatch, cls)


@pytest.mark.parametrize("call", [{}, {"num_inference_steps": 4, "height": 32}, {"sigmas": [1.0, 0.8, 0.5, 0.3]}],
                         ids=["default", "other-size", "given-sigmas"])
def test_the_sampler_walks_the_parents_shifted_sigmas(model, call, monkeypatch):
    """LTX's Euler ancestral walks the very sigmas and timesteps the parent's FlowMatchEulerDiscreteScheduler walks:
    shifted as diffusers shifts them (SD3's fixed shift, Flux-dev's shift of the resolution), given sigmas too, with
    one step each and no step at the final sigma."""
    name, pipe, parent = model
    call = {**CALL, **call, "output_type": "latent"}
    flow = _walked(monkeypatch, FlowMatchEulerDiscreteScheduler)
    parent(**call, generator=_seed())
    walked = _walked(monkeypatch, LTXEulerAncestralRFScheduler)
    out = pipe(**call, negative_prompt="red", generator=_seed(), return_trace=True)
    flow, walked = flow.sampled(), walked.sampled()
    steps = len(call.get("sigmas") or range(call["num_inference_steps"]))
    assert len(walked) == len(flow) == steps == len(out.trace.p)
    sigmas = flow[0][0]
    if "sigmas" in call:  # shifted up by SD3's shift 3 and Flux-dev's mu; Flux-schnell's are the given ones
        given = torch.tensor(call["sigmas"])
        if name == "flux-schnell":
            assert torch.equal(sigmas[:-1], given)
        else:
            assert (sigmas[1:-1] > given[1:] + 0.05).all()
    for (ours, t), (theirs, parent_t) in zip(walked, flow, strict=True):
        assert torch.equal(ours, sigmas) and torch.equal(theirs, sigmas) and t == parent_t
    # The trace's noise levels are the walked sigmas' s / (1 - s).
    torch.testing.assert_close(out.trace.sigma[:, 0], (sigmas / (1 - sigmas))[:-1].double(), rtol=1e-6, atol=0)


def test_a_scheduler_the_user_assigns_is_the_sampler(model, monkeypatch):
    """pipe.scheduler set by the user is sampled with as it is: LTX's Euler ancestral (at its own eta), on the shifted
    sigmas, or FlowMatchEulerDiscreteScheduler with stochastic_sampling=True, which re-noises each step."""
    name, pipe, parent = model
    call = {**CALL, "output_type": "latent"}
    sigmas = _parent_sigmas(parent, call)
    ltx = _quiet(type(pipe).from_pipe(pipe, scheduler=LTXEulerAncestralRFScheduler.from_config(
        parent.scheduler.config, eta=0.5)))
    walked = _walked(monkeypatch, LTXEulerAncestralRFScheduler)
    out = ltx(**call, negative_prompt="red", generator=_seed(), return_trace=True)
    walked = walked.sampled()
    assert len(walked) == len(out.trace.p) == 3 and all(torch.equal(s, sigmas) for s, _ in walked)
    assert ltx.scheduler.config.eta == 0.5 and torch.isfinite(out.trace.llr[:-1]).all()
    renoising = FlowMatchEulerDiscreteScheduler.from_config(parent.scheduler.config, stochastic_sampling=True)
    flow = _quiet(type(pipe).from_pipe(pipe, scheduler=renoising))
    walked = _walked(monkeypatch, FlowMatchEulerDiscreteScheduler)
    again = flow(**call, negative_prompt="red", generator=_seed(), return_trace=True)
    walked = walked.sampled()
    assert len(walked) == 3 and all(torch.equal(s, sigmas) for s, _ in walked)
    assert torch.isfinite(again.trace.llr[:-1]).all() and not torch.equal(again.images, out.images)
    assert flow.scheduler is renoising and ltx.scheduler.config.eta == 0.5


def test_a_negative_concept_gives_a_finite_trace(model):
    _, pipe, _ = model
    out = pipe(**CALL, negative_prompt="red", generator=_seed(), return_trace=True)
    steps = CALL["num_inference_steps"]
    assert out.trace.p.shape == out.trace.scale.shape == (steps, 2, 1) and np.isfinite(out.images).all()
    assert torch.all((out.trace.p > 0) & (out.trace.p < 1)) and torch.isfinite(out.trace.scale).all()
    assert (out.trace.scale > 0).all()
    # Every step but the last adds noise, and so carries evidence; the last lands on t = 0.
    assert torch.isfinite(out.trace.llr[:-1]).all() and torch.isnan(out.trace.llr[-1]).all()
    # The noise levels t / (1 - t) fall along the chain, from pure noise (t = 1) to the sample.
    assert torch.equal(out.trace.sigma[1:, 0], out.trace.sigma[:-1, 1]) and out.trace.sigma[0, 0] == float("inf")
    assert torch.all(out.trace.sigma[:, 1] < out.trace.sigma[:, 0]) and out.trace.sigma[-1, 1] == 0


def test_several_concepts_each_with_its_posterior(model):
    _, pipe, _ = model
    out = pipe(**CALL, negative_concepts=["red", ["cat", "dog"]], num_images_per_prompt=2, generator=_seed(),
               return_trace=True)
    assert len(out.images) == 4 and out.trace.p.shape == (3, 4, 2)
    assert torch.isfinite(out.trace.p).all() and not torch.equal(out.trace.p[..., 0], out.trace.p[..., 1])


def test_the_same_generator_gives_the_same_image(model):
    _, pipe, _ = model
    call = dict(CALL, negative_prompt="red")
    first, again = (pipe(**call, generator=_seed(7)).images for _ in range(2))
    np.testing.assert_array_equal(first, again)
    # The step noise is the generator's: another seed gives another image.
    assert np.abs(pipe(**call, generator=_seed(8)).images - first).max() > 1e-3


def test_np_is_diffusers_negative_prompt(model):
    """SD3's negative prompt and Flux's true CFG are NP against the empty prompt at the base's CFG scale - 1."""
    name, pipe, parent = model
    cfg = {} if name == "sd3" else {"true_cfg_scale": 4.0}
    generator = _seed()
    reference = _parent_on_the_stochastic_sampler(parent, generator, {**CALL, **cfg})
    expected = reference(negative_prompt="red", generator=generator).images
    sibling = _quiet(type(pipe).from_pipe(pipe, scheduler=stochastic(pipe.scheduler)))
    out = sibling(**CALL, **cfg, negative_prompt="red", negative_guidance="np", generator=_seed())
    np.testing.assert_allclose(out.images, expected, atol=1e-5)


def test_flux_branches_share_the_distilled_guidance(model, monkeypatch):
    """Flux: [empty prompt, prompt, concept] in one transformer call, every row at the same distilled guidance."""
    name, pipe, _ = model
    if name == "sd3":
        pytest.skip("Flux's guidance embedding")
    calls = []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe(**CALL, negative_prompt="red", guidance_scale=2.5, generator=_seed())
    assert len(calls) == 3 and all(c["hidden_states"].shape[0] == 3 * 2 for c in calls)
    guidance = calls[0]["guidance"]
    if name == "flux-dev":
        assert torch.equal(guidance, torch.full((6,), 2.5))
    else:
        assert guidance is None  # Flux-schnell embeds no guidance, as in the parent
    with torch.no_grad():
        empty, _, _ = pipe.encode_prompt(["", ""], prompt_2=None)
    assert torch.equal(calls[0]["encoder_hidden_states"][:2], empty)


def test_callback_sees_the_posterior_and_interrupt_stops_as_in_the_parent(model):
    _, pipe, parent = model
    seen = []

    def stop_after_first(p, i, t, tensors):
        seen.append((i, sorted(tensors)))
        p._interrupt = True
        return {}

    call = dict(CALL, num_inference_steps=4, output_type="latent", callback_on_step_end=stop_after_first)
    generator = _seed()
    expected = _parent_on_the_stochastic_sampler(parent, generator, call)(generator=generator).images
    out = pipe(**call, negative_prompt="red", dng={"lam0": 0.0}, generator=_seed(), return_trace=True,
               callback_on_step_end_tensor_inputs=["latents", "dng_p"])
    assert seen == [(0, ["latents"]), (0, ["dng_p", "latents"])]
    torch.testing.assert_close(out.images, expected, atol=0, rtol=0)
    assert out.trace.scale.shape[0] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(negative_prompt="red", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(negative_prompt="red", height=18), r"multiples of 4, got 18 x 16; e\.g\. 20 x 16"),
    (dict(negative_prompt="red", ip_adapter_image_embeds=[torch.zeros(1)]), "ip_adapter_image_embeds is not"),
    (dict(negative_concepts=["red"], negative_prompt_2="blue"), "negative_prompt_2 is another text encoder's text"),
    (dict(negative_prompt="red", num_inference_steps=0), "num_inference_steps must be a whole number >= 1"),
    (dict(dng="paper-sd"), "dng needs a negative concept"),
])
def test_bad_inputs_are_refused_before_any_model_runs(model, kwargs, match, monkeypatch):
    _, pipe, _ = model

    def run(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            monkeypatch.setattr(getattr(pipe, name), "forward", run)
    with pytest.raises(ConfigError, match=match):
        pipe(**{**CALL, **kwargs})


def test_latents_are_taken_in_the_denoisers_layout(model):
    name, pipe, _ = model
    # Flux packs 2x2 patches of the 4-channel 8x8 latents into 16 tokens of 16 channels; SD3 takes them as they are.
    shape = (2, 16, 16) if name.startswith("flux") else (2, 4, 8, 8)
    latents = torch.randn(shape)
    out = pipe(**{**CALL, "output_type": "latent"}, negative_prompt="red", latents=latents, generator=_seed())
    assert out.images.shape == shape
    with pytest.raises(ConfigError, match=re.escape(f"expected {shape}")):
        pipe(**CALL, negative_prompt="red", latents=latents[:, :1], generator=_seed())


@pytest.mark.parametrize("cls,parent", [(StableDiffusion3DNGPipeline, StableDiffusion3Pipeline),
                                        (FluxDNGPipeline, FluxPipeline)])
def test_takes_the_parents_arguments_and_forwards_them_by_keyword(cls, parent, monkeypatch):
    params = [p for p in inspect.signature(parent.__call__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    ours = list(inspect.signature(cls.__call__).parameters.values())[:len(params)]
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in params]
    forwarded = {}
    monkeypatch.setattr(parent, "__call__", lambda self, **kwargs: forwarded.update(kwargs))
    values = {p.name: object() for p in params[1:] if p.name not in ("negative_prompt", "negative_prompt_embeds")}
    values["callback_on_step_end_tensor_inputs"] = ["latents"]
    cls.__call__(cls.__new__(cls), **values)
    assert forwarded == {**values, "negative_prompt": None, "negative_prompt_embeds": None}


def _sd_command(argv):
    parser = argparse.ArgumentParser()
    sd_command.register({"top": parser.add_subparsers()})
    args = parser.parse_args(["sd", *argv])
    return args.func(args)


def test_sd_command_writes_images_trace_and_summary(model, tmp_path, capsys):
    name, _, parent = model
    parent.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    extra = ["--distilled-guidance", "2.5"] if name == "flux-dev" else []
    assert _sd_command(["--model", str(tmp_path / "model"), "--prompt", "a cat", "--negative", "red", "--negative",
                        "dog", "--steps", "3", "--num-images", "2", "--height", "16", "--width", "16", "--out",
                        str(out), *extra]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "image_1.png", "summary.csv", "trace.csv",
                                                     "trace.png"]
    assert ("sampling with LTXEulerAncestralRFScheduler (the stochastic sibling of the folder's "
            "FlowMatchEulerDiscreteScheduler, as DNG needs)") in capsys.readouterr().out
    with open(out / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2 and all(0 < float(r["p"]) < 1 for r in rows)
    assert [(r["image"], r["concept"]) for r in summary] == [(f"image_{i}.png", c) for i in (0, 1)
                                                             for c in ("red", "dog")]


def test_sd_command_refuses_flux_guidance_for_other_models(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ConfigError, match="--distilled-guidance is Flux's embedded guidance; .* StableDiffusion3Pipe"):
        _sd_command(["--model", str(tmp_path / "model"), "--prompt", "a", "--negative", "b", "--out",
                     str(tmp_path / "out"), "--distilled-guidance", "3"])


def test_docstring_example_runs(model, monkeypatch, tmp_path):
    # The example as a user runs it, with the tiny pipeline standing in for the downloaded weights.
    name, pipe, parent = model
    if name == "flux-schnell":
        pytest.skip("the example is Flux-dev's")
    cls = type(pipe)

    def load(c, *args, **kwargs):
        tiny = _quiet(c.from_pipe(parent))
        tiny.default_sample_size = 8  # Flux's default 1024 px is a 4096-patch image: 16 px here
        return tiny

    monkeypatch.setattr(cls, "from_pretrained", classmethod(load))
    monkeypatch.chdir(tmp_path)
    code = "\n".join(re.findall(r"^\s*(?:>>>|\.\.\.) ?(.*)$", cls.__call__.__doc__, flags=re.M))
    namespace = {}
    exec(code.replace("num_inference_steps=28", "num_inference_steps=3"), namespace)
    assert len(list(tmp_path.glob("*.png"))) == 1 and namespace["out"].trace.p.shape == (3, 1, 1 + (name == "sd3"))
