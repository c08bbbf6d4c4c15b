"""Guidance rules against hand computations and diffusers' own SLD."""

import math

import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_safe.pipeline_stable_diffusion_safe import (
    StableDiffusionPipelineSafe,
)

from dng.errors import ConfigError
from dng.guidance import (
    DNG_PRESETS,
    SLD_PRESETS,
    DynamicNegativeGuidance,
    NegativePrompt,
    SafeLatentDiffusion,
    Step,
)

STEP = Step(0, torch.tensor(500), torch.zeros(2, 3))


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
    dng = DynamicNegativeGuidance(scale=2.0, prior=0.2)
    dng.start(2, 1)
    eps_u, eps_n, _ = _branches()
    eps, scale, p = dng.combine(eps_u, eps_n, STEP)
    torch.testing.assert_close(scale, torch.full((2, 1), 2.0 * 0.2 / 0.8))
    torch.testing.assert_close(eps, eps_u - 0.5 * (eps_n[0] - eps_u))
    torch.testing.assert_close(p, torch.full((2, 1), 0.2))


@pytest.mark.parametrize("sigma, lam0", [(80.0, 2.0), (0.5, 2.0), (0.49, 12.0), (0.05, 12.0), (0.0499, 0.0)])
def test_dng_lam0_follows_the_noise_level(sigma, lam0):
    """scale above boost_sigma, scale * late_boost below it, nothing below sigma_min; the timestep plays no part."""
    dng = DynamicNegativeGuidance(scale=2.0, prior=0.2, late_boost=6.0, boost_sigma=0.5, sigma_min=0.05)
    dng.start(2, 1)
    eps_u, eps_n, _ = _branches()
    eps, scale, _ = dng.combine(eps_u, eps_n, Step(0, torch.tensor(999), eps_u, sigma))
    torch.testing.assert_close(scale, torch.full((2, 1), lam0 * 0.2 / 0.8))
    torch.testing.assert_close(eps, eps_u - lam0 * 0.25 * (eps_n[0] - eps_u))


def test_late_boost_one_is_the_published_constant_rule():
    dng = DynamicNegativeGuidance(scale=3.0, late_boost=1.0)
    assert {dng.lam0(sigma) for sigma in (80.0, 1.0, 0.1, 0.0)} == {3.0}


def test_presets_are_the_one_source_of_the_defaults():
    default = DynamicNegativeGuidance()
    for key, value in DNG_PRESETS["default"].items():
        got = default.tracker.priors[0] if key == "prior" else getattr(default.tracker, key, None)
        assert getattr(default, key, got) == value, key
    cifar = DynamicNegativeGuidance.preset("paper-cifar10", p_max=0.9)
    assert (cifar.scale, cifar.temperature, cifar.offset_per_step, cifar.tracker.p_max) == (5.0, 0.2, 2e-4, 0.9)
    with pytest.raises(ConfigError, match="paper-sd"):
        DynamicNegativeGuidance.preset("paper")


def test_several_negatives_exclusive_and_independent_by_hand():
    p = torch.tensor([[0.2, 0.3]])
    exclusive = DynamicNegativeGuidance(scale=1.5, prior=[0.2, 0.3], mode="exclusive")
    independent = DynamicNegativeGuidance(scale=1.5, prior=[0.2, 0.3], mode="independent")
    torch.testing.assert_close(exclusive.scales(p, 1.5), torch.tensor([[1.5 * 0.2 / 0.5, 1.5 * 0.3 / 0.5]]))
    torch.testing.assert_close(independent.scales(p, 1.5), torch.tensor([[1.5 * 0.2 / 0.8, 1.5 * 0.3 / 0.7]]))
    independent.start(2, 2)
    eps_u, eps_n, _ = _branches(k=2)
    eps, scale, _ = independent.combine(eps_u, eps_n, STEP)
    expected = eps_u - 1.5 * 0.2 / 0.8 * (eps_n[0] - eps_u) - 1.5 * 0.3 / 0.7 * (eps_n[1] - eps_u)
    torch.testing.assert_close(eps, expected)


def test_one_exclusive_prior_is_checked_for_every_class_it_serves():
    rule = DynamicNegativeGuidance(prior=0.3, mode="exclusive")
    rule.check(3)  # 0.9 <= p_max 0.95
    # Five classes at 0.3 each sum to 1.5: the clamp would cap them at p_max without a word.
    with pytest.raises(ConfigError, match=r"5 priors sum to 1.5: lower them, e.g. 0.19 each, or raise p_max"):
        rule.check(5)
    with pytest.raises(ConfigError, match="5 priors sum to 1.5"):
        rule.start(2, 5)
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


def test_oracle_posterior_replaces_tracking():
    dng = DynamicNegativeGuidance(scale=1.0, posterior=lambda x, t: torch.full((x.shape[0], 1), 0.5))
    assert not dng.tracks_posterior
    dng.start(2, 1)
    _, scale, p = dng.combine(*_branches()[:2], STEP)
    torch.testing.assert_close(scale, torch.ones(2, 1))


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
    sld.start(2, 1)
    for i in range(steps):
        eps, _, _ = sld.combine(eps_u[i], eps_n[i][None], Step(i, torch.tensor(0), eps_u[i]), eps_p[i], 7.5)
        torch.testing.assert_close(eps, expected[i])
    # Without a positive branch the unconditional prediction is the text branch and w = 1.
    expected = _diffusers_sld(eps_u, eps_u, eps_n, 1.0, steps, SLD_PRESETS[name])
    sld.start(2, 1)
    for i in range(steps):
        eps, _, _ = sld.combine(eps_u[i], eps_n[i][None], Step(i, torch.tensor(0), eps_u[i]))
        torch.testing.assert_close(eps, expected[i])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: NegativePrompt(-1.0), "scale"),
        (lambda: NegativePrompt(float("nan")), "scale"),
        (lambda: DynamicNegativeGuidance(scale=float("inf")), "scale"),
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
        (lambda: SafeLatentDiffusion(momentum_beta=2.0), "momentum_beta"),
        (lambda: SafeLatentDiffusion(threshold=float("nan")), "threshold must be finite"),
    ],
)
def test_bad_guidance_settings_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_push_cap_bounds_scale_times_the_steps_log_snr_gain():
    dng = DynamicNegativeGuidance(scale=2.0, prior=0.5, late_boost=1.0, push_cap=4.0)
    dng.start(2, 1)
    eps_u, eps_n, _ = _branches()
    small = Step(0, torch.tensor(0), eps_u, 1.0, 0.9)  # gain 2 log(1/0.9) = 0.21: the cap (19) does not bind
    big = Step(0, torch.tensor(0), eps_u, 1.0, 0.5)  # gain 1.39: the cap 2.89 is above the scale 2
    huge = Step(0, torch.tensor(0), eps_u, 1.0, 0.1)  # gain 4.61: cap 0.87
    assert float(dng.combine(eps_u, eps_n, small)[1][0, 0]) == pytest.approx(2.0)
    assert float(dng.combine(eps_u, eps_n, big)[1][0, 0]) == pytest.approx(2.0)
    assert float(dng.combine(eps_u, eps_n, huge)[1][0, 0]) == pytest.approx(4.0 / (2 * math.log(10)))
    onto_clean = Step(0, torch.tensor(0), eps_u, 0.1, 0.0)  # no finite gain: not capped
    assert float(dng.combine(eps_u, eps_n, onto_clean)[1][0, 0]) == pytest.approx(2.0)
