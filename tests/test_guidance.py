"""Guidance rules against hand computations and diffusers' own SLD."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.deprecated.stable_diffusion_safe.pipeline_stable_diffusion_safe import (
    StableDiffusionPipelineSafe,
)

from dng.config import PRESETS, DNGConfig
from dng.errors import ConfigError
from dng.guidance import (
    SLD_PRESETS,
    DynamicNegativeGuidance,
    NegativePrompt,
    SafeLatentDiffusion,
    Step,
)
from dng.posterior import ReadPosterior

STEP = Step(0, torch.tensor(500), torch.zeros(2, 3))
NAN = float("nan")


def _started(rule, negatives=1, batch=2):
    """The rule started on a 10-step DDPM chain, and the Step of its first step."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    rule.start(scheduler, sample_shape=(batch, 3), num_negatives=negatives)
    return Step(0, scheduler.timesteps[0], torch.zeros(batch, 3))


def _branches(k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, generator=g), torch.randn(k, 2, 3, generator=g), torch.randn(2, 3, generator=g)


def test_negative_prompt_by_hand():
    eps_u = torch.tensor([[1.0, 2.0]])
    eps_n = torch.tensor([[[2.0, 0.0]]])
    eps, scale, p = NegativePrompt(3.0).combine(eps_u, eps_n, STEP)
    torch.testing.assert_close(eps, torch.tensor([[-2.0, 8.0]]))
    assert scale.tolist() == [[3.0]] and p is None


def test_positive_branch_is_cfg_and_negative_term_stays_against_uncond():
    eps_u, eps_n, eps_p = _branches()
    eps, _, _ = NegativePrompt(2.0).combine(eps_u, eps_n, STEP, eps_p, cfg_scale=7.5)
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_p - eps_u) - 2.0 * (eps_n[0] - eps_u))


def test_dng_scale_is_lam0_p_over_one_minus_p():
    dng = DynamicNegativeGuidance(lam0=2.0, prior=0.2)
    step = _started(dng)
    eps_u, eps_n, _ = _branches()
    eps, scale, p = dng.combine(eps_u, eps_n, step)
    torch.testing.assert_close(scale, torch.full((2, 1), 2.0 * 0.2 / 0.8))
    torch.testing.assert_close(eps, eps_u - 0.5 * (eps_n[0] - eps_u))
    torch.testing.assert_close(p, torch.full((2, 1), 0.2))


@pytest.mark.parametrize("sigma, lam0", [(80.0, 2.0), (0.5, 2.0), (0.49, 12.0), (0.05, 12.0), (0.0499, 0.0)])
def test_dng_lam0_follows_the_noise_level(sigma, lam0):
    """lam0 above boost_sigma, lam0 * late_boost below it, nothing below sigma_min; the timestep plays no part."""
    dng = DynamicNegativeGuidance(lam0=2.0, prior=0.2, late_boost=6.0, boost_sigma=0.5, sigma_min=0.05)
    scale = dng.applied_scale(torch.full((2, 1), 0.2), sigma, NAN)
    torch.testing.assert_close(scale, torch.full((2, 1), lam0 * 0.2 / 0.8))


def test_dng_reads_the_noise_level_from_its_schedulers_kernel():
    """combine applies the scale of the step's own sigma: below boost_sigma at the last DDPM step, above it first."""
    dng = DynamicNegativeGuidance(lam0=2.0, prior=0.2, late_boost=6.0, boost_sigma=0.5, push_cap=0.0)
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    dng.start(scheduler, sample_shape=(2, 3), num_negatives=1)
    eps_u, eps_n, _ = _branches()
    first = dng.combine(eps_u, eps_n, Step(0, scheduler.timesteps[0], eps_u))
    last = dng.combine(eps_u, eps_n, Step(9, scheduler.timesteps[-1], eps_u))
    assert dng.after_step(eps_u)["sigma"][0] < 0.5  # the last step's own noise level
    torch.testing.assert_close(first[1], torch.full((2, 1), 2.0 * 0.25))
    torch.testing.assert_close(last[1], torch.full((2, 1), 12.0 * 0.25))
    torch.testing.assert_close(last[0], eps_u - 3.0 * (eps_n[0] - eps_u))


def test_late_boost_one_is_the_published_constant_rule():
    config = DNGConfig(3.0, late_boost=1.0)
    assert {config.lam0_at(sigma) for sigma in (80.0, 1.0, 0.1, 0.0)} == {3.0}


def test_presets_are_the_one_source_of_the_defaults():
    assert DynamicNegativeGuidance().config == PRESETS["default"] == DNGConfig()
    assert DynamicNegativeGuidance("paper-sd").config == PRESETS["paper-sd"]
    cifar = DynamicNegativeGuidance.preset("paper-cifar10", p_max=0.9).config
    assert (cifar.lam0, cifar.temperature, cifar.offset_per_step, cifar.p_max) == (5.0, 0.2, 2e-4, 0.9)
    with pytest.raises(ConfigError, match="paper-sd"):
        DynamicNegativeGuidance.preset("paper")
    with pytest.raises(ConfigError, match="unknown DNG setting 'scale'; the settings are lam0, prior"):
        DynamicNegativeGuidance(scale=2.0)


def test_config_is_keyword_only_after_the_papers_four_and_round_trips_through_json(tmp_path):
    config = DNGConfig(2.0, (0.05, 0.1), 0.5, 0.2, mode="exclusive", push_cap=0.0)
    assert (config.lam0, config.prior, config.temperature, config.offset) == (2.0, (0.05, 0.1), 0.5, 0.2)
    with pytest.raises(TypeError):
        DNGConfig(2.0, 0.1, 1.0, 0.0, 1e-6)  # p_min is keyword-only
    assert DNGConfig.load(config.save(tmp_path / "dng.json")) == config
    assert DNGConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="is not a DNG configuration"):
        (tmp_path / "other.json").write_text("{}")
        DNGConfig.load(tmp_path / "other.json")
    assert config.describe() == "lam0=2, prior=[0.05,0.1], temperature=0.5, offset=0.2, mode=exclusive, push_cap=0"


def test_several_negatives_exclusive_and_independent_by_hand():
    p = torch.tensor([[0.2, 0.3]])
    exclusive = DynamicNegativeGuidance(lam0=1.5, prior=[0.2, 0.3], mode="exclusive", late_boost=1.0)
    independent = DynamicNegativeGuidance(lam0=1.5, prior=[0.2, 0.3], mode="independent", late_boost=1.0)
    torch.testing.assert_close(exclusive.applied_scale(p, 1.0, NAN),
                               torch.tensor([[1.5 * 0.2 / 0.5, 1.5 * 0.3 / 0.5]]))
    torch.testing.assert_close(independent.applied_scale(p, 1.0, NAN),
                               torch.tensor([[1.5 * 0.2 / 0.8, 1.5 * 0.3 / 0.7]]))
    step = _started(independent, 2)
    eps_u, eps_n, _ = _branches(k=2)
    eps, scale, _ = independent.combine(eps_u, eps_n, step)
    expected = eps_u - 1.5 * 0.2 / 0.8 * (eps_n[0] - eps_u) - 1.5 * 0.3 / 0.7 * (eps_n[1] - eps_u)
    torch.testing.assert_close(eps, expected)


def test_one_exclusive_prior_is_checked_for_every_class_it_serves():
    rule = DynamicNegativeGuidance(prior=0.3, mode="exclusive")
    rule.check(3)  # 0.9 <= p_max 0.95
    # Five classes at 0.3 each sum to 1.5: the clamp would cap them at p_max without a word.
    with pytest.raises(ConfigError, match=r"5 priors sum to 1.5: lower them, e.g. 0.19 each, or raise p_max"):
        rule.check(5)
    with pytest.raises(ConfigError, match="5 priors sum to 1.5"):
        _started(rule, 5)
    DynamicNegativeGuidance(prior=0.3, mode="independent").check(5)  # independent priors need no sum


@pytest.mark.parametrize("p_max", [0.95, 1 - 1e-12])
def test_ten_priors_of_a_tenth_are_refused_whatever_the_rounding_of_their_sum(p_max):
    # Their float sum is 0.9999999999999999, which a plain "< 1" let through: 1 - sum must be >= MIN_REST.
    for prior in ([0.1] * 10, 0.1):
        with pytest.raises(ConfigError, match="summing to at most p_max"):
            DynamicNegativeGuidance(prior=prior, p_max=p_max, mode="exclusive").check(10)
    # A sum at p_max up to rounding passes: ten of 0.095 add up to 0.95 plus a few ulps.
    DynamicNegativeGuidance(prior=[0.095] * 10, p_max=0.95, mode="exclusive").check(10)


@pytest.mark.parametrize("mode", ["independent", "exclusive"])
def test_a_prior_above_p_max_is_refused_not_clamped(mode):
    with pytest.raises(ConfigError, match=r"prior 0.97 lies outside \[p_min, p_max\] = \[1e-06, 0.95\]"):
        DynamicNegativeGuidance(prior=0.97, mode=mode)
    DynamicNegativeGuidance(prior=0.97, p_max=0.98, mode=mode)


def test_a_read_posterior_replaces_tracking():
    half = ReadPosterior(lambda x, t: torch.full((x.shape[0], 1), 0.5))
    dng = DynamicNegativeGuidance(lam0=1.0, late_boost=1.0, posterior=half)
    assert not dng.tracks and DynamicNegativeGuidance().tracks
    assert dng.with_posterior(None).tracks and dng.with_posterior(None).config == dng.config
    step = _started(dng)
    eps_u, eps_n, _ = _branches()
    _, scale, p = dng.combine(eps_u, eps_n, step)
    torch.testing.assert_close(scale, torch.ones(2, 1))
    assert dng.after_step(eps_u)["llr"] is None


def _diffusers_sld(eps_u, eps_p, eps_n, w, steps, preset):
    """The reference: diffusers' own safety-guidance step, run over several steps."""
    momentum, outs = None, []
    for i, (u, pos, neg) in enumerate(zip(eps_u, eps_p, eps_n, strict=True)):
        guidance, momentum = StableDiffusionPipelineSafe.perform_safety_guidance(
            None, True, momentum, pos - u, [pos, u, neg], i, preset["scale"], preset["warmup_steps"],
            preset["threshold"], preset["momentum_scale"], preset["momentum_beta"])
        outs.append(u + w * guidance)
    return outs


@pytest.mark.parametrize("name", list(SLD_PRESETS))
def test_sld_matches_diffusers_safe_pipeline(name):
    g = torch.Generator().manual_seed(1)
    steps = 20
    eps_u, eps_p, eps_n = (0.05 * torch.randn(steps, 2, 4, 8, 8, generator=g) for _ in range(3))
    expected = _diffusers_sld(eps_u, eps_p, eps_n, 7.5, steps, SLD_PRESETS[name])
    sld = SafeLatentDiffusion.preset(name)
    sld.start(None, sample_shape=(2, 4, 8, 8), num_negatives=1)
    for i in range(steps):
        eps, _, _ = sld.combine(eps_u[i], eps_n[i][None], Step(i, torch.tensor(0), eps_u[i]), eps_p[i], 7.5)
        torch.testing.assert_close(eps, expected[i])
    # Without a positive branch the unconditional prediction is the text branch and w = 1.
    expected = _diffusers_sld(eps_u, eps_u, eps_n, 1.0, steps, SLD_PRESETS[name])
    sld.start(None, sample_shape=(2, 4, 8, 8), num_negatives=1)
    for i in range(steps):
        eps, _, _ = sld.combine(eps_u[i], eps_n[i][None], Step(i, torch.tensor(0), eps_u[i]))
        torch.testing.assert_close(eps, expected[i])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: NegativePrompt(-1.0), "scale"),
        (lambda: NegativePrompt(float("nan")), "scale"),
        (lambda: DynamicNegativeGuidance(lam0=float("inf")), "lam0"),
        (lambda: DynamicNegativeGuidance(lam0=None), "lam0 must be a number, got NoneType"),
        (lambda: DynamicNegativeGuidance(prior=torch.tensor([0.1, 0.2])), "prior must be a single number"),
        (lambda: DynamicNegativeGuidance(object()), "takes a DNGConfig or a preset name"),
        (lambda: DynamicNegativeGuidance(prior=1.0), "prior"),
        (lambda: DynamicNegativeGuidance(p_min=0.9, p_max=0.5), "p_min"),
        (lambda: DynamicNegativeGuidance(temperature=-0.1), "temperature"),
        (lambda: DynamicNegativeGuidance(offset=float("nan")), "offset"),
        (lambda: DynamicNegativeGuidance(mode="both"), "mode"),
        (lambda: DynamicNegativeGuidance(kernel_variance="learned"), "kernel_variance"),
        (lambda: DynamicNegativeGuidance(update="exact"), "update must be one of"),
        (lambda: DynamicNegativeGuidance(update=None), "update must be one of"),
        (lambda: DynamicNegativeGuidance(late_boost=-2.0), "late_boost"),
        (lambda: DynamicNegativeGuidance(late_boost=float("nan")), "late_boost"),
        (lambda: DynamicNegativeGuidance(boost_sigma=-1), "boost_sigma"),
        (lambda: DynamicNegativeGuidance(sigma_min=float("nan")), "sigma_min"),
        (lambda: DynamicNegativeGuidance(offset_per_step=float("inf")), "offset_per_step"),
        (lambda: SafeLatentDiffusion.preset("extreme"), "preset"),
        (lambda: SafeLatentDiffusion(warmup_steps=-1), "warmup_steps"),
        (lambda: SafeLatentDiffusion(foo=1), "unknown SLD setting 'foo'"),
        (lambda: SafeLatentDiffusion(momentum_beta=2.0), "momentum_beta"),
        (lambda: SafeLatentDiffusion(threshold=float("nan")), "threshold must be finite"),
    ],
)
def test_bad_guidance_settings_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_sld_defaults_are_its_medium_preset():
    assert vars(SafeLatentDiffusion()) == vars(SafeLatentDiffusion.preset("medium"))
    assert SafeLatentDiffusion("strong", scale=500.0).scale == 500.0


def test_push_cap_bounds_scale_times_the_steps_log_snr_gain():
    dng = DynamicNegativeGuidance(lam0=2.0, prior=0.5, late_boost=1.0, push_cap=4.0)
    p = torch.full((2, 1), 0.5)
    # gain 2 log(1/0.9) = 0.21: the cap (19) does not bind; gain 1.39: the cap 2.89 is above the scale 2
    assert float(dng.applied_scale(p, 1.0, 0.9)[0, 0]) == pytest.approx(2.0)
    assert float(dng.applied_scale(p, 1.0, 0.5)[0, 0]) == pytest.approx(2.0)
    # gain 4.61: cap 0.87
    assert float(dng.applied_scale(p, 1.0, 0.1)[0, 0]) == pytest.approx(4.0 / (2 * math.log(10)))
    # no finite gain (onto clean data): not capped
    assert float(dng.applied_scale(p, 0.1, 0.0)[0, 0]) == pytest.approx(2.0)
