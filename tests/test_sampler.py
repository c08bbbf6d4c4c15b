"""The one sampling loop: identities, the mixture's ground truth, a pinned regression and bad input."""

import copy
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LTXEulerAncestralRFScheduler,
)

from dng.bench.gmm import GMMBench
from dng.config import DNGConfig
from dng.errors import ConfigError, NonFiniteError, SampleRangeError
from dng.gmm import default_mixture_config
from dng.guidance import DynamicNegativeGuidance, NegativePrompt, SafeLatentDiffusion
from dng.posterior import log_snr_gain
from dng.sampler import STOP, sample


def dummy_model(n_branches):
    """A smooth deterministic epsilon model whose branches differ by a constant shift."""

    def model(x, t):
        shift = torch.arange(n_branches, dtype=x.dtype).repeat_interleave(x.shape[0] // n_branches)
        return 0.3 * torch.tanh(x) + 0.05 * shift.view(-1, *([1] * (x.dim() - 1))) * (t / 1000)

    return model


def run(guidance, scheduler=None, n_neg=1, steps=10, cfg=None, **kw):
    """The dummy model does not denoise, so the sample's range check is off."""
    scheduler = scheduler or DDPMScheduler()
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    n_branches = 1 + n_neg + (cfg is not None)
    return sample(dummy_model(n_branches), scheduler, guidance, noise=noise, num_inference_steps=steps,
                  num_negatives=n_neg if guidance else 0, cfg_scale=cfg, generator=torch.Generator().manual_seed(1),
                  progress=False, **{"max_rms": None, **kw})


def test_full_loop_regression_is_pinned():
    out = run(DynamicNegativeGuidance(lam0=2.0, prior=0.3, temperature=1.2, late_boost=1.0, push_cap=0.0),
              return_trace=True)
    # Pinned from this implementation (torch 2.13 CPU); a change here means the loop's numbers changed.
    assert float(out.samples.sum()) == pytest.approx(PINNED["sum"], abs=1e-3)
    assert float(out.samples.abs().mean()) == pytest.approx(PINNED["abs_mean"], abs=1e-5)
    assert float(out.trace.p[-1].mean()) == pytest.approx(PINNED["p_final"], abs=1e-5)


PINNED = {"sum": 8.156938552856445, "abs_mean": 0.6739828586578369, "p_final": 0.14857405424118042}


def test_frozen_posterior_is_exactly_negative_prompting():
    lam0, prior = 3.0, 0.2
    frozen = run(DynamicNegativeGuidance(lam0=lam0, prior=prior, temperature=0.0, offset=0.0, late_boost=1.0,
                                         push_cap=0.0),
                 return_trace=True)
    np_out = run(NegativePrompt(lam0 * prior / (1 - prior)))
    torch.testing.assert_close(frozen.samples, np_out.samples)
    assert torch.all(frozen.trace.p == frozen.trace.p[0, 0, 0])


def test_zero_scale_is_the_unguided_sampler():
    unguided = run(None, n_neg=0, cfg=4.0)
    zero = run(DynamicNegativeGuidance(lam0=0.0), cfg=4.0)
    torch.testing.assert_close(zero.samples, unguided.samples)


def test_trace_shapes_and_ranges():
    out = run(DynamicNegativeGuidance(lam0=1.0, prior=[0.1, 0.2], p_min=1e-3, p_max=0.9), n_neg=2,
              steps=8, return_trace=True)
    tr = out.trace
    assert tr.p.shape == tr.scale.shape == tr.llr.shape == (8, 3, 2)
    assert tr.timesteps.shape == (8,)
    assert ((tr.p >= 1e-3 - 1e-7) & (tr.p <= 0.9 + 1e-7)).all()
    config = DNGConfig()  # the default lam0 schedule and push cap, read from the trace's noise levels
    lam0 = torch.tensor([config.lam0_at(float(s)) for s in tr.sigma[:, 0]])[:, None, None]
    cap = torch.tensor([config.push_cap / g if (g := log_snr_gain(*map(float, s))) else math.inf for s in tr.sigma])
    torch.testing.assert_close(tr.scale, torch.minimum(lam0 * tr.p / (1 - tr.p), cap[:, None, None].float()))
    assert torch.isnan(tr.llr[-1]).all() and torch.isfinite(tr.llr[:-1]).all()
    np_trace = run(NegativePrompt(2.0), steps=4, return_trace=True).trace
    assert torch.isnan(np_trace.p).all() and (np_trace.scale == 2.0).all()


@pytest.mark.parametrize("scheduler,eta", [
    (EulerAncestralDiscreteScheduler(), 0.0), (DDIMScheduler(clip_sample=False), 1.0)])
def test_other_stochastic_schedulers_run_with_dng(scheduler, eta):
    out = run(DynamicNegativeGuidance(lam0=1.0), scheduler=scheduler, eta=eta, return_trace=True)
    assert torch.isfinite(out.samples).all() and torch.isfinite(out.trace.p).all()


def test_half_precision_model_keeps_the_posterior_in_float32():
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).half()
    model = dummy_model(2)
    out = sample(lambda x, t: model(x.float(), t).half(), DDPMScheduler(clip_sample=False),
                 DynamicNegativeGuidance(lam0=1.0), noise=noise, num_inference_steps=5, num_negatives=1,
                 progress=False, return_trace=True)
    assert out.samples.dtype == torch.float16
    assert torch.isfinite(out.trace.llr[:-1]).all()


def test_callback_sees_every_step():
    seen = []
    run(SafeLatentDiffusion.preset("medium"), steps=6, callback=lambda i, t, x, info: seen.append((i, info["scale"])))
    assert [i for i, _ in seen] == list(range(6))


def test_deterministic_scheduler_is_refused_for_dng_but_fine_for_np():
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler"):
        run(DynamicNegativeGuidance(), scheduler=EulerDiscreteScheduler())
    with pytest.raises(ConfigError, match="eta"):
        run(DynamicNegativeGuidance(), scheduler=DDIMScheduler(), eta=0.0)
    assert torch.isfinite(run(NegativePrompt(1.0), scheduler=EulerDiscreteScheduler()).samples).all()


def test_bad_loop_input_is_refused():
    with pytest.raises(ConfigError, match="expected"):
        sample(lambda x, t: x[:1], DDPMScheduler(), NegativePrompt(), noise=torch.randn(2, 3), num_negatives=1,
               progress=False)
    with pytest.raises(ConfigError, match="num_negatives"):
        run(NegativePrompt(), n_neg=0)
    with pytest.raises(ConfigError, match="no guidance"):
        sample(dummy_model(2), DDPMScheduler(), None, noise=torch.randn(2, 3), num_negatives=1, progress=False)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        run(NegativePrompt(), steps=0)


def test_dynamic_shifting_takes_mu_through_set_timesteps_kwargs():
    flow = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, use_dynamic_shifting=True)
    with pytest.raises(ConfigError, match=r"set_timesteps_kwargs=\{'mu'"):
        run(DynamicNegativeGuidance(), scheduler=copy.deepcopy(flow))
    samples = run(DynamicNegativeGuidance(), scheduler=copy.deepcopy(flow), set_timesteps_kwargs={"mu": 0.8}).samples
    assert torch.isfinite(samples).all()
    # mu reaches the scheduler: another shift is another chain.
    other = run(DynamicNegativeGuidance(), scheduler=copy.deepcopy(flow), set_timesteps_kwargs={"mu": 2.0}).samples
    assert not torch.allclose(samples, other)


def test_ltx_given_sigmas_steps_once_per_sigma_pair():
    """LTX's Euler ancestral given its sigmas (ComfyUI-style, final 0 included) lists the final sigma's timestep too,
    where its step returns the sample as it is: the loop steps only the pairs, and ends where diffusers' loop ends."""
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    calls = []
    model = dummy_model(2)

    def counted(x, t):
        calls.append(float(t))
        return model(x, t)

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(counted, LTXEulerAncestralRFScheduler(), DynamicNegativeGuidance(), noise=noise,
                 num_inference_steps=4, num_negatives=1, generator=torch.Generator().manual_seed(1), progress=False,
                 return_trace=True, max_rms=None, set_timesteps_kwargs={"sigmas": sigmas})
    assert calls == pytest.approx([1000.0, 800.0, 500.0, 200.0]) and len(out.trace.p) == 4
    assert torch.isfinite(out.trace.llr[:-1]).all()
    # diffusers' own loop over every listed timestep, with the same noise, ends on the same sample.
    ltx = LTXEulerAncestralRFScheduler()
    ltx.set_timesteps(sigmas=sigmas)
    generator, x = torch.Generator().manual_seed(1), noise
    assert len(ltx.timesteps) == 5
    for t in ltx.timesteps:
        eps = model(x.repeat(2, 1, 1, 1), t)[: len(x)]  # the unconditional branch, the step DNG at lam0 = 0 gives
        x = ltx.step(eps, t, x, generator=generator).prev_sample
    zero = sample(model, LTXEulerAncestralRFScheduler(), DynamicNegativeGuidance(lam0=0.0), noise=noise,
                  num_inference_steps=4, num_negatives=1, generator=torch.Generator().manual_seed(1), progress=False,
                  max_rms=None, set_timesteps_kwargs={"sigmas": sigmas}).samples
    torch.testing.assert_close(zero, x, atol=0, rtol=0)
    # Two steps: the kernel check before the first step walks the two as well, not the listed third.
    two = sample(model, LTXEulerAncestralRFScheduler(), DynamicNegativeGuidance(), noise=noise, num_inference_steps=2,
                 num_negatives=1, progress=False, max_rms=None, return_trace=True,
                 set_timesteps_kwargs={"sigmas": torch.tensor([1.0, 0.5, 0.0])})
    assert len(two.trace.p) == 2


@pytest.mark.parametrize("scheduler", [DDPMScheduler(num_train_timesteps=20), EulerAncestralDiscreteScheduler(20)])
def test_more_steps_than_training_timesteps_are_refused(scheduler):
    # DDPM's own refusal is a diffusers ValueError; Euler ancestral would silently repeat timesteps.
    with pytest.raises(ConfigError, match="more than the scheduler's 20 training timesteps"):
        run(None, scheduler=scheduler, n_neg=0, steps=21)
    assert run(None, scheduler=scheduler, n_neg=0, steps=20).samples.shape == (3, 2, 4, 4)


def test_cfg_scale_zero_is_the_unconditional_sampler():
    unconditional = run(None, n_neg=0)
    assert torch.equal(run(None, n_neg=0, cfg=0.0).samples, unconditional.samples)
    assert not torch.allclose(run(None, n_neg=0, cfg=1.0).samples, unconditional.samples)
    # With a negative too: the positive branch sits between u and the negative, so the model keys on position.
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))

    def model(shifts):
        return lambda x, t: torch.tanh(x) + torch.tensor(shifts).repeat_interleave(len(noise))[:, None]

    def guided(shifts, cfg):
        return sample(model(shifts), DDPMScheduler(), NegativePrompt(2.0), noise=noise, num_inference_steps=5,
                      num_negatives=1, cfg_scale=cfg, generator=torch.Generator().manual_seed(1),
                      progress=False).samples

    assert torch.equal(guided([0.0, 0.5, 0.2], 0.0), guided([0.0, 0.2], None))


@pytest.mark.parametrize("cfg", [float("nan"), float("inf")])
def test_non_finite_cfg_scale_is_refused(cfg):
    with pytest.raises(ConfigError, match="cfg_scale must be finite"):
        run(None, n_neg=0, cfg=cfg)


def nan_at(step, branch, n_branches):
    """dummy_model whose `branch` returns NaN for sample 1 from the `step`-th call on."""
    model, calls = dummy_model(n_branches), []

    def broken(x, t):
        out = model(x, t)
        calls.append(t)
        if len(calls) > step:
            out.unflatten(0, (n_branches, -1))[branch, 1] = float("nan")
        return out

    return broken


@pytest.mark.parametrize("step, branch, name", [(0, 0, "unconditional"), (3, 1, "positive"), (5, 3, "negative 2")])
def test_nan_model_output_is_an_error_naming_the_step_and_branch(step, branch, name):
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    rule = DynamicNegativeGuidance(prior=0.2, mode="exclusive")
    with pytest.raises(NonFiniteError, match=rf"step {step + 1} of 8 .* in the {name} branch for 1 of 3 samples"):
        sample(nan_at(step, branch, 4), DDPMScheduler(), rule, noise=noise, num_inference_steps=8,
               num_negatives=2, cfg_scale=2.0, progress=False)


def test_non_finite_noise_and_overflowing_samples_are_errors():
    noise = torch.randn(3, 2)
    noise[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="noise"):
        sample(dummy_model(1), DDPMScheduler(), noise=noise, num_inference_steps=2, progress=False)
    # Every output finite (their float32 sum overflows), but the step's arithmetic does not stay finite.
    huge = lambda x, t: torch.full_like(x, 3e38)  # noqa: E731
    with pytest.raises(NonFiniteError, match="3 of 3 samples are NaN or inf after the last step"):
        sample(huge, DDPMScheduler(clip_sample=False), noise=torch.randn(3, 2), num_inference_steps=2,
               progress=False)


@pytest.fixture(scope="module")
def bench():
    return GMMBench(default_mixture_config(), steps=50, num_samples=1500, seed=0, variance="fixed_small")


def _row(bench, method):
    rows = {}
    for m, params, factory in bench.configs([method]):
        rows[params.get("scale", params.get("preset"))] = bench.run(m, params, factory)[0]
    return rows


def test_dng_beats_np_on_the_exact_mixture(bench):
    dng = next(iter(_row(bench, "dng").values()))
    none = next(iter(_row(bench, "none").values()))
    np1 = _row(bench, "np")[1.0]
    assert dng["forbidden_rate"] < none["forbidden_rate"] / 4
    assert dng["class_kl"] < 0.02 < np1["class_kl"]
    assert dng["sliced_w2"] < np1["sliced_w2"] / 5
    assert dng["posterior_logit_mae"] < 0.5


def test_dng_with_exact_posterior_matches_the_target(bench):
    oracle = next(iter(_row(bench, "dng-oracle").values()))
    target = next(iter(_row(bench, "target").values()))
    assert oracle["forbidden_rate"] <= target["forbidden_rate"] + 0.005
    assert oracle["class_kl"] < 0.01
    assert oracle["sliced_w2"] < 2.5 * target["sliced_w2"]


@pytest.mark.parametrize("update", ["mixture", "moment"])
@pytest.mark.parametrize("mode", ["exclusive", "independent"])
def test_mixture_and_moment_updates_run_the_loop_within_the_clamp(mode, update):
    out = run(DynamicNegativeGuidance(lam0=2.0, prior=[0.3, 0.4], p_max=0.9, mode=mode, update=update), n_neg=2,
              steps=10, return_trace=True)
    p = out.trace.p
    # The last step adds no noise: its llr is NaN by design (no evidence), every other one is finite.
    assert torch.isfinite(out.samples).all() and torch.isfinite(p).all() and torch.isfinite(out.trace.llr[:-1]).all()
    assert (p <= 0.9 * (1 + 1e-5)).all()
    if mode == "exclusive":
        assert (p.sum(-1) <= 0.9 * (1 + 1e-5)).all()
    # The update differs from the published one once p is not small.
    paper = run(DynamicNegativeGuidance(lam0=2.0, prior=[0.3, 0.4], p_max=0.9, mode=mode), n_neg=2, steps=10,
                return_trace=True)
    assert not torch.allclose(paper.trace.p[-1], p[-1])


def test_bench_sampler_with_the_exact_posterior_is_within_noise_of_the_target():
    # Why the bench samples with fixed_large: with the exact posterior its 100-step chain lands near exact target
    # samples, where fixed_small's under-disperse (a higher mean target log-density than the target's own samples,
    # whose mean is minus the entropy), so what is left to measure is the guidance.
    gap = {}
    for variance in ("fixed_large", "fixed_small"):
        bench = GMMBench(default_mixture_config(), steps=100, num_samples=1500, seed=0, variance=variance)
        rows = {m: bench.run(m, p, f)[0] for m, p, f in bench.configs(["dng-oracle", "target"])}
        assert rows["dng-oracle"]["forbidden_rate"] <= rows["target"]["forbidden_rate"] + 0.003
        assert rows["dng-oracle"]["sliced_w2"] < 1.1 * rows["target"]["sliced_w2"]
        gap[variance] = rows["dng-oracle"]["target_log_density"] - rows["target"]["target_log_density"]
    assert abs(gap["fixed_large"]) < 3 < 5 < gap["fixed_small"]


def test_bench_refuses_an_unknown_sampler_variance():
    with pytest.raises(ConfigError, match="fixed_large, fixed_small"):
        GMMBench(default_mixture_config(), steps=10, num_samples=10, seed=0, variance="learned")


def test_late_boost_cuts_the_leak_of_the_constant_rule_without_hurting_the_kept_classes():
    """The default lam0 schedule (1, then 6 below t = 200) against the published one-lam0 rule at the old default
    temperature: on the default mixture at 100 steps it leaks 0.25 % against 1.15 % (4000 samples)."""
    bench = GMMBench(default_mixture_config(), steps=100, num_samples=2000, seed=0)
    rows = {}
    for name, params in {"boost": {}, "constant": {"temperature": 1.2, "late_boost": 1.0}}.items():
        params = {"prior": bench.prior, "mode": "exclusive", **params}
        rows[name] = bench.run("dng", params, lambda params=params: DynamicNegativeGuidance(**params))[0]
    boost, constant = rows["boost"], rows["constant"]
    assert boost["forbidden_rate"] < 0.5 * constant["forbidden_rate"], (boost, constant)
    assert boost["class_kl"] <= constant["class_kl"] and boost["sliced_w2"] < 1.1 * constant["sliced_w2"]


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("steps", [10, 40])
def test_offset_is_a_drift_per_unit_of_log_snr_whatever_the_step_count(scheduler_cls, steps):
    """With no evidence (temperature 0), log p moves by offset * (log-SNR gained), step by step and in total."""
    rate, prior = -0.05, 0.1
    out = run(DynamicNegativeGuidance(lam0=0.0, prior=prior, temperature=0.0, offset=rate),
              scheduler=scheduler_cls(), steps=steps, return_trace=True)
    sigma = out.trace.sigma[:, 0]
    expected = math.log(prior) + rate * 2 * torch.log(sigma[0] / sigma)
    torch.testing.assert_close(out.trace.p[:, 0, 0].double().log(), expected, rtol=0, atol=1e-5)


def _mixture_run(rule, scheduler=None, **kw):
    """The exact mixture's model (data RMS about 0.6) on Euler ancestral, 10 steps."""
    from diffusers import EulerAncestralDiscreteScheduler

    bench = GMMBench(default_mixture_config(), steps=10, num_samples=4, seed=0)
    model = bench.gmm.branch_model([0] if rule is not None else [])
    noise = torch.randn(4, bench.gmm.dim, generator=torch.Generator().manual_seed(0))
    return sample(model, scheduler or EulerAncestralDiscreteScheduler(), rule, noise=noise, num_inference_steps=10,
                  num_negatives=1 if rule is not None else 0, generator=torch.Generator().manual_seed(1),
                  progress=False, **kw)


@pytest.mark.parametrize("rule", [NegativePrompt(1e6), DynamicNegativeGuidance(lam0=1e30)])
def test_a_huge_scale_is_an_error_with_its_step_not_samples(rule):
    """Finite samples far out of the model's range were returned as results; now the step and cause are named."""
    with pytest.raises(SampleRangeError, match=r"left the model's range at step \d+ of 10 .* guidance scale too large"):
        _mixture_run(rule)
    try:  # asked for, the range is not checked (the mixture's model may still overflow later)
        _mixture_run(rule, max_rms=None)
    except NonFiniteError as err:
        assert not isinstance(err, SampleRangeError)
    _mixture_run(NegativePrompt(1.0))  # usual scales stay in range


class _Declared:
    """A model that says how many branches it evaluates and the shape of one sample."""

    def __init__(self, n, shape=(2, 4, 4)):
        self.num_branches, self.sample_shape, self.model = n, shape, dummy_model(n)

    def __call__(self, x, t):
        return self.model(x, t)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model=_Declared(2), cfg_scale=2.0, num_negatives=1), "evaluates 2 branches per call but this sample"),
    (dict(model=_Declared(2), num_negatives=2), "needs 3"),
    (dict(model=_Declared(3, (1, 4, 4)), num_negatives=2), r"noise has samples of shape \(2, 4, 4\); the model"),
    (dict(model=dummy_model(2), num_negatives=1.5), "num_negatives must be a whole number, got 1.5"),
    (dict(model=dummy_model(2), num_negatives=1, noise=torch.randn(6)), r"noise must be \[batch, ...\]"),
    (dict(model=dummy_model(2), num_negatives=1, noise=torch.ones(2, 3, dtype=torch.long)), "floating-point"),
    (dict(model=lambda x, t: {"eps": x}, num_negatives=1), "the model returned dict; return a tensor"),
])
def test_mis_wired_models_and_inputs_are_refused_before_any_step(kwargs, message):
    calls = []
    model = kwargs.pop("model")
    kwargs = {"noise": torch.randn(3, 2, 4, 4), **kwargs}

    def counted(x, t):
        calls.append(1)
        return model(x, t)

    counted.num_branches, counted.sample_shape = (getattr(model, k, None) for k in ("num_branches", "sample_shape"))
    with pytest.raises(ConfigError, match=message):
        sample(counted, DDPMScheduler(), DynamicNegativeGuidance(), num_inference_steps=2, progress=False, **kwargs)
    assert calls in ([], [1])  # at most the call whose output is refused


def test_tuples_and_diffusers_outputs_are_read_as_their_first_tensor():
    from diffusers.models.unets.unet_2d import UNet2DOutput

    plain = run(NegativePrompt(1.0)).samples
    for wrap in (lambda out: (out,), lambda out: UNet2DOutput(sample=out)):
        model = dummy_model(2)
        out = sample(lambda x, t, m=model, w=wrap: w(m(x, t)), DDPMScheduler(), NegativePrompt(1.0),
                     noise=torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), num_inference_steps=10,
                     num_negatives=1, generator=torch.Generator().manual_seed(1), progress=False, max_rms=None)
        torch.testing.assert_close(out.samples, plain)


def test_a_callback_that_returns_its_dict_does_not_stop_the_loop():
    """diffusers' callbacks return a dict of tensors; only dng.sampler.STOP stops."""
    seen = []
    out = run(NegativePrompt(1.0), callback=lambda i, t, x, info: seen.append(i) or {"latents": x})
    assert seen == list(range(10)) and torch.equal(out.samples, run(NegativePrompt(1.0)).samples)
    seen.clear()
    run(NegativePrompt(1.0), callback=lambda i, t, x, info: seen.append(i) or (STOP if i == 3 else torch.ones(2)))
    assert seen == [0, 1, 2, 3]
