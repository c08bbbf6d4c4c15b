"""The tracker is exact Bayes: with the mixture's exact kernels it reproduces the exact posterior."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dng.errors import ConfigError
from dng.gmm import GaussianMixture, default_mixture_config
from dng.guidance import NegativePrompt
from dng.posterior import PosteriorTracker, gaussian_llr
from dng.sampler import sample


@pytest.fixture(scope="module")
def mixture():
    scheduler = DDPMScheduler(clip_sample=False)
    cfg = default_mixture_config()
    return GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod), scheduler


@pytest.mark.parametrize("guided", [False, True])
def test_tracker_with_exact_kernels_equals_exact_posterior(mixture, guided):
    gmm, scheduler = mixture
    classes = [0, 1]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(256, gmm.dim, generator=g, dtype=torch.float64)
    scheduler.set_timesteps(40)
    t0 = scheduler.timesteps[0]
    tracker = PosteriorTracker(0.5, p_min=1e-300, p_max=1 - 1e-16, dtype=torch.float64)
    tracker.start(len(noise), len(classes))
    # Start from the exact posterior at x_T: from then on only the kernels inform the tracker.
    tracker.log_p = gmm.posterior(noise, t0)[:, classes].log()
    worst, state = [], {"x": noise}

    def check(i, t, x_prev, info):
        prev_t = scheduler.previous_timestep(t)
        tracker.update(gmm.kernel_llr(x_prev, state["x"], int(t), int(prev_t), classes))
        exact = gmm.posterior(x_prev, int(prev_t))[:, classes]
        worst.append(float((tracker.p - exact).abs().max()))
        state["x"] = x_prev

    guidance = NegativePrompt(1.0) if guided else None
    sample(gmm.branch_model([0] if guided else []), scheduler, guidance, noise=noise, num_inference_steps=40,
           num_negatives=1 if guided else 0, generator=g, callback=check, progress=False)
    assert len(worst) == 40
    assert max(worst) <= 1e-5


def test_gaussian_llr_matches_the_plain_formula_and_is_stable_in_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    mu_u = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mu_n = mu_u + 0.01 * torch.randn((2,) + x.shape, generator=g, dtype=torch.float64)
    std, temperature, offset = 0.1, 0.7, 0.003
    plain = -temperature * (((x - mu_n) ** 2).flatten(2).sum(-1) - ((x - mu_u) ** 2).flatten(1).sum(-1))
    expected = ((plain + offset) / (2 * std**2)).T
    torch.testing.assert_close(gaussian_llr(x, mu_u, mu_u - mu_n, std, temperature, offset).double(), expected,
                               rtol=1e-5, atol=1e-4)
    # Large latents: both squared norms are ~1e6 and nearly cancel; float32 must still get their difference.
    x = 3 * torch.randn(2, 4, 64, 64, generator=g)
    mu_u = x + 0.5 * torch.randn(x.shape, generator=g)
    mu_n = mu_u + 1e-3 * torch.randn(x.shape, generator=g)
    reference = -(((x.double() - mu_n.double()) ** 2).flatten(1).sum(-1) - ((x.double() - mu_u.double()) ** 2)
                  .flatten(1).sum(-1)) / (2 * std**2)
    naive = -(((x - mu_n) ** 2).flatten(1).sum(-1) - ((x - mu_u) ** 2).flatten(1).sum(-1)) / (2 * std**2)
    ours = gaussian_llr(x, mu_u, (mu_u - mu_n)[None], std)[:, 0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-3)
    assert (naive.double() - reference).abs().max() > 100 * (ours.double() - reference).abs().max()


def test_update_clamps_and_never_yields_nan():
    tracker = PosteriorTracker(0.2, p_min=1e-4, p_max=0.9)
    tracker.start(4, 1)
    tracker.update(torch.tensor([[100.0], [-100.0], [float("nan")], [math.log(2.0)]]))
    p = tracker.p[:, 0]
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([0.9, 1e-4, 0.2, 0.4]))


def test_exclusive_concepts_keep_their_total_below_p_max():
    tracker = PosteriorTracker([0.2, 0.3], p_max=0.8, exclusive=True)
    tracker.start(1, 2)
    tracker.update(torch.tensor([[2.0, 2.0]]))
    p = tracker.p[0]
    assert float(p.sum()) == pytest.approx(0.8, rel=1e-5)
    assert float(p[1] / p[0]) == pytest.approx(1.5, rel=1e-5)
    # A huge ratio (a near-noiseless step of a poor model) must still leave a usable posterior, not p = 1.
    tracker.update(torch.tensor([[1e9, 1e8]]))
    p = tracker.p[0]
    assert torch.isfinite(p).all() and float(p.sum()) == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prior": 0.0}, "prior"),
        ({"prior": 1.5}, "prior"),
        ({"prior": float("nan")}, "prior"),
        ({"p_min": 0.5, "p_max": 0.4}, "p_min"),
        ({"p_max": 1.0}, "p_max"),
        ({"prior": [0.6, 0.5], "exclusive": True}, "summing below 1"),
    ],
)
def test_bad_tracker_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PosteriorTracker(**kwargs)


def test_prior_count_must_match_concepts():
    tracker = PosteriorTracker([0.1, 0.2])
    with pytest.raises(ConfigError, match="one per concept"):
        tracker.start(2, 3)
