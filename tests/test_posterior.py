"""The tracker is exact Bayes: with the mixture's exact kernels it reproduces the exact posterior."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverSinglestepScheduler
from torch.distributions import MultivariateNormal

from dng.config import DNGConfig
from dng.errors import ConfigError, NonFiniteError
from dng.gmm import GaussianMixture, default_mixture_config
from dng.guidance import DynamicNegativeGuidance, NegativePrompt
from dng.kernels import BranchMoments
from dng.posterior import (
    PosteriorTracker,
    TrackedPosterior,
    endpoint_weight,
    gaussian_llr,
    mixture_llr,
    mixture_weights,
    moment_llr,
    project_simplex,
)
from dng.sampler import sample


def stats(x, mu_u, diff, gram=False):
    """The step statistics (r.d, d.d) from explicit kernel means; the std is the llr's, not the moments'."""
    return BranchMoments(mu_u, diff, 1.0, 1.0).statistics(x, gram)


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
    tracker = PosteriorTracker(DNGConfig(prior=0.5, p_min=1e-300, p_max=1 - 1e-16), dtype=torch.float64)
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
    torch.testing.assert_close(gaussian_llr(*stats(x, mu_u, mu_u - mu_n), std, temperature, offset).double(), expected,
                               rtol=1e-5, atol=1e-4)
    # Large latents: both squared norms are ~1e6 and nearly cancel; float32 must still get their difference.
    x = 3 * torch.randn(2, 4, 64, 64, generator=g)
    mu_u = x + 0.5 * torch.randn(x.shape, generator=g)
    mu_n = mu_u + 1e-3 * torch.randn(x.shape, generator=g)
    reference = -(((x.double() - mu_n.double()) ** 2).flatten(1).sum(-1) - ((x.double() - mu_u.double()) ** 2)
                  .flatten(1).sum(-1)) / (2 * std**2)
    naive = -(((x - mu_n) ** 2).flatten(1).sum(-1) - ((x - mu_u) ** 2).flatten(1).sum(-1)) / (2 * std**2)
    ours = gaussian_llr(*stats(x, mu_u, (mu_u - mu_n)[None]), std)[:, 0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-3)
    assert (naive.double() - reference).abs().max() > 100 * (ours.double() - reference).abs().max()


def test_update_clamps_and_refuses_a_nan_ratio():
    tracker = PosteriorTracker(DNGConfig(prior=0.2, p_min=1e-4, p_max=0.9))
    tracker.start(4, 1)
    tracker.update(torch.tensor([[100.0], [-100.0], [float("inf")], [math.log(2.0)]]))
    p = tracker.p[:, 0]
    torch.testing.assert_close(p, torch.tensor([0.9, 1e-4, 0.9, 0.4]))
    # A NaN ratio comes from a NaN sample or model output: it is an error, not "no information".
    with pytest.raises(NonFiniteError, match="NaN log-likelihood ratio for 1 of 4 samples"):
        tracker.update(torch.tensor([[0.0], [float("nan")], [0.0], [0.0]]))


def test_exclusive_concepts_keep_their_total_below_p_max():
    tracker = PosteriorTracker(DNGConfig(prior=[0.2, 0.3], p_max=0.8, mode="exclusive"))
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
        ({"prior": [0.6, 0.5], "mode": "exclusive"}, "summing to at most p_max"),
        ({"prior": 0.995, "p_max": 0.99}, "outside \\[p_min, p_max\\]"),
        ({"prior": 1e-7, "p_min": 1e-6}, "outside"),
    ],
)
def test_bad_tracker_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DNGConfig(**kwargs)


def test_prior_count_must_match_concepts():
    tracker = PosteriorTracker(DNGConfig(prior=[0.1, 0.2]))
    with pytest.raises(ConfigError, match="one per concept"):
        tracker.start(2, 3)


def _log_normal(x, mean, std):
    """Explicit log N(x; mean, std^2 I) in float64, normalising constant included."""
    d = x.shape[-1]
    return -((x - mean) ** 2).sum(-1) / (2 * std**2) - 0.5 * d * math.log(2 * math.pi * std**2)


def _tiny_example(seed=0, batch=5, dim=7, negatives=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    mu_u = x + 0.3 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    mu_n = mu_u + 0.2 * torch.randn(negatives, batch, dim, generator=g, dtype=torch.float64)
    p = torch.tensor([[0.1, 0.3], [0.02, 0.6], [0.4, 0.4], [1e-4, 0.2], [0.3, 0.05]], dtype=torch.float64)
    return x, mu_u, mu_n, p


def test_mixture_update_is_bayes_over_explicit_gaussians():
    """Independent: two hypotheses N(m_n, s^2) and N(m_rest, s^2) with m_rest = (m_u - p m_n) / (1 - p); exclusive:
    K + 1 hypotheses with m_rest = (m_u - sum p_i m_i) / (1 - sum p_i). Tempered likelihoods, offset on each
    negative; computed here from full log densities in float64."""
    x, mu_u, mu_n, p = _tiny_example()
    std, temperature, offset = 0.25, 1.3, 0.01
    bonus = offset / (2 * std**2)
    step = stats(x, mu_u, mu_u - mu_n)
    for k in range(2):
        pk = p[:, k, None]
        m_rest = (mu_u - pk * mu_n[k]) / (1 - pk)
        a = pk[:, 0].log() + temperature * _log_normal(x, mu_n[k], std) + bonus
        b = (1 - pk[:, 0]).log() + temperature * _log_normal(x, m_rest, std)
        expected = a - torch.logaddexp(a, b)
        got = mixture_llr(*step, std, p.log(), temperature, offset)[:, k].double() + p[:, k].log()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The closed form in the docstring: logit p' = logit p - T (1 + rho) [2 r.d + (1 - rho) |d|^2] / (2 s^2) + bonus.
    r, d = x - mu_u, mu_u - mu_n[0]
    rho = p[:, 0] / (1 - p[:, 0])
    closed = (p[:, 0] / (1 - p[:, 0])).log() - temperature * (1 + rho) * (
        2 * (r * d).sum(-1) + (1 - rho) * (d * d).sum(-1)) / (2 * std**2) + bonus
    got = mixture_llr(*step, std, p.log(), temperature, offset)[:, 0].double() + p[:, 0].log()
    torch.testing.assert_close(got, torch.nn.functional.logsigmoid(closed), rtol=0, atol=1e-5)
    # Exclusive: one categorical update.
    total = p.sum(-1, keepdim=True)
    m_rest = (mu_u - (p.T[..., None] * mu_n).sum(0)) / (1 - total)
    scores = torch.stack([p[:, k].log() + temperature * _log_normal(x, mu_n[k], std) + bonus for k in range(2)]
                         + [(1 - total[:, 0]).log() + temperature * _log_normal(x, m_rest, std)], -1)
    expected = scores[:, :2] - scores.logsumexp(-1, keepdim=True)
    gram = stats(x, mu_u, mu_u - mu_n, gram=True)
    got = mixture_llr(*gram, std, p.log(), temperature, offset, exclusive=True).double() + p.log()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_moment_update_is_bayes_against_the_moment_matched_gaussian():
    """The unconditional kernel N(m_u, s^2 I + the covariance of the hypotheses' means), built here from the explicit
    hypotheses (independent: the negative and its complement; exclusive: every negative and the rest) as a dense
    covariance, in float64: tempered log-densities, offset on each negative."""
    x, mu_u, mu_n, p = _tiny_example()
    std, temperature, offset = 0.25, 1.3, 0.01
    bonus = offset / (2 * std**2)
    eye = torch.eye(x.shape[-1], dtype=torch.float64)

    def reference(means, weights, k):
        spread = sum(w[:, None, None] * (m - mu_u)[:, :, None] * (m - mu_u)[:, None, :]
                     for m, w in zip(means, weights, strict=True))
        wide = MultivariateNormal(mu_u, std**2 * eye + spread).log_prob(x)
        return temperature * (_log_normal(x, mu_n[k], std) - wide) + bonus

    step = stats(x, mu_u, mu_u - mu_n)
    got = moment_llr(*step, std, p.log(), temperature, offset).double()
    for k in range(2):
        pk = p[:, k]
        rest = (mu_u - pk[:, None] * mu_n[k]) / (1 - pk[:, None])
        torch.testing.assert_close(got[:, k], reference([mu_n[k], rest], [pk, 1 - pk], k), rtol=0, atol=1e-4)
    total = p.sum(-1)
    rest = (mu_u - (p.T[..., None] * mu_n).sum(0)) / (1 - total[:, None])
    gram = stats(x, mu_u, mu_u - mu_n, gram=True)
    got = moment_llr(*gram, std, p.log(), temperature, offset, exclusive=True).double()
    for k in range(2):
        expected = reference([mu_n[0], mu_n[1], rest], [p[:, 0], p[:, 1], 1 - total], k)
        torch.testing.assert_close(got[:, k], expected, rtol=0, atol=1e-4)
    # At small p the unconditional kernel is the one Gaussian.
    small = torch.full((5, 2), math.log(1e-7))
    torch.testing.assert_close(moment_llr(*step, std, small, temperature, offset), gaussian_llr(*step, std, temperature,
                                                                                                offset), rtol=1e-4,
                               atol=1e-4)


def test_mixture_update_reduces_to_the_gaussian_ratio_at_small_p():
    x, mu_u, mu_n, _ = _tiny_example(seed=1)
    log_p = torch.full((5, 2), math.log(1e-7))
    step = stats(x, mu_u, mu_u - mu_n)
    ratio = gaussian_llr(*step, 0.5, 0.8, 0.002)
    torch.testing.assert_close(mixture_llr(*step, 0.5, log_p, 0.8, 0.002), ratio, rtol=1e-4, atol=1e-4)


def test_mixture_update_keeps_exclusive_total_below_p_max_and_refuses_nan():
    x, mu_u, mu_n, p = _tiny_example(seed=2)
    tracker = PosteriorTracker(DNGConfig(prior=[0.3, 0.4], p_max=0.9, mode="exclusive"))
    tracker.start(5, 2)
    # Overwhelming evidence for both negatives (tiny std), then for none, then garbage: p stays a distribution.
    for step_x, std in ((mu_n.mean(0), 1e-3), (mu_n[0], 1e-4), (mu_u + 50 * (mu_u - mu_n[1]), 1e-3),
                        (torch.full_like(x, 1e20), 1e-3)):
        tracker.update(mixture_llr(*stats(step_x, mu_u, mu_u - mu_n, gram=True), std, tracker.log_p,
                                       exclusive=True, p_max=0.9))
        p = tracker.p
        assert torch.isfinite(p).all()
        # The exclusive clamp floors at p_min and then rescales the total down to p_max.
        assert (p >= 1e-6 * 0.9 * (1 - 1e-5)).all()
        assert (p.sum(-1) <= 0.9 * (1 + 1e-5)).all()
    # A NaN sample is not evidence either way: the update refuses it rather than keep p.
    with pytest.raises(NonFiniteError):
        tracker.update(mixture_llr(*stats(torch.full_like(x, float("nan")), mu_u, mu_u - mu_n, gram=True), 0.1,
                                   tracker.log_p, exclusive=True, p_max=0.9))
    independent = PosteriorTracker(DNGConfig(prior=0.5, p_max=0.99))
    independent.start(5, 2)
    for step_x in (mu_n[0], mu_u + 50 * (mu_u - mu_n[0]), torch.full_like(x, 1e20)):
        independent.update(mixture_llr(*stats(step_x, mu_u, mu_u - mu_n), 1e-3, independent.log_p, p_max=0.99))
        assert torch.isfinite(independent.p).all() and (independent.p <= 0.99 * (1 + 1e-6)).all()
    with pytest.raises(NonFiniteError):
        infinite = torch.full_like(x, float("inf"))
        independent.update(mixture_llr(*stats(infinite, mu_u, mu_u - mu_n), 1e-3, independent.log_p, p_max=0.99))


def test_mixture_update_tracks_two_narrow_classes_better_than_the_gaussian_ratio():
    """Two classes with std small against the noise: each class kernel is almost exactly N(m_c, beta_tilde), so the
    two-hypothesis model is (nearly) the exact kernel and must beat one Gaussian for the unconditional kernel."""
    from dng.bench.gmm import GMMBench
    from dng.guidance import DynamicNegativeGuidance

    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 8, generator=g, dtype=torch.float64)
    means[1] = means[0] + 1.0 * means[1] / means[1].norm()
    config = {"means": means.tolist(), "stds": [0.02, 0.02], "weights": [0.5, 0.5], "remove": [0]}
    bench = GMMBench(config, steps=50, num_samples=500, seed=0, variance="fixed_small")
    errors = {}
    for update in ("paper", "mixture", "moment"):
        params = {"lam0": 0.0, "prior": 0.5, "temperature": 1.0, "p_max": 0.999, "update": update}
        errors[update] = bench.run("dng", params, lambda params=params: DynamicNegativeGuidance(**params))[0][
            "posterior_logit_mae"]
    # The moment-matched Gaussian is wide along the classes' gap, as the mixture is, but one Gaussian still.
    assert errors["mixture"] < errors["moment"] < 0.8 * errors["paper"], errors


def _unguided_tracking_error(steps: int, p_min: float) -> float:
    """Log-odds error (both posteriors read in [1e-6, 0.999]) along unguided chains of the default mixture, tracked
    by plain Bayes with the Gaussian kernels and the tracker's own clamp at `p_min`."""
    from dng.bench.gmm import GMMBench
    from dng.guidance import DynamicNegativeGuidance

    bench = GMMBench(default_mixture_config(), steps, num_samples=300, seed=0)
    params = {"lam0": 0.0, "prior": bench.prior, "temperature": 1.0, "p_min": p_min, "p_max": 0.999}
    row, _ = bench.run("dng", params, lambda: DynamicNegativeGuidance(**params), mae_range=(1e-6, 0.999))
    return row["posterior_logit_mae"]


def test_gaussian_kernel_tracker_converges_to_exact_bayes_as_steps_grow():
    """Its per-step error is a zero-mean curvature term of variance ~beta^2, so the error along a chain shrinks like
    1/sqrt(steps); a wrong mean, variance or sign in the update would leave an error that more steps do not remove.
    A floor of 1e-6 on the tracked p sets its own floor (a reflected walk for chains far from the class)."""
    coarse, fine = _unguided_tracking_error(50, 1e-30), _unguided_tracking_error(500, 1e-30)
    assert fine < 0.45 * coarse, (coarse, fine)
    assert fine < _unguided_tracking_error(500, 1e-6), fine


@pytest.mark.parametrize("order", [2, 3])
def test_a_singlestep_stage_updates_the_p_of_its_first_sample(order):
    """Every step of a singlestep stage starts from the stage's first sample: p after it is p there plus that step's
    llr, whatever the stage's earlier steps did to p (they guided their own steps only)."""
    scheduler = DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++", solver_order=order,
                                             lower_order_final=False)
    cfg = default_mixture_config()
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod, dtype=torch.float32)
    rule = DynamicNegativeGuidance(prior=0.3, p_min=1e-30, p_max=1 - 1e-6, late_boost=1.0)
    out = sample(gmm.branch_model([0]), scheduler, rule, noise=torch.randn(64, gmm.dim), num_inference_steps=12,
                 num_negatives=1, generator=torch.Generator().manual_seed(0), progress=False, return_trace=True)
    log_p, llr = out.trace.p.log().double(), out.trace.llr.double()
    assert [int(o) for o in scheduler.order_list[:order]] == list(range(1, order + 1))
    start = 0
    for i in range(11):  # the last step, onto clean data, adds no noise and is not tracked
        if scheduler.order_list[i] == 1:
            start = i
        # log p at the sample after step i: the stage's first p plus step i's llr, clamped.
        expected = (log_p[start] + llr[i]).clamp(math.log(rule.config.p_min), math.log(rule.config.p_max))
        torch.testing.assert_close(log_p[i + 1], expected, rtol=0, atol=1e-4)


def _simplex_grid(k: int, n: int) -> torch.Tensor:
    """Every point of the simplex in steps of 1/n, [points, k]."""
    import itertools

    rows = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return torch.tensor([[*c, n - sum(c)] for c in rows], dtype=torch.float64) / n


def test_mixture_weights_recover_the_weights_of_an_exact_mixture():
    gen = torch.Generator().manual_seed(0)
    eps_k = torch.randn(5, 4, 3, 7, generator=gen, dtype=torch.float64)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.2, 0.0], [1, 0, 0, 0, 0], [0.2] * 5, [0, 0.5, 0.5, 0, 0]], dtype=torch.float64)
    eps_u = torch.einsum("bk,kbij->bij", p, eps_k)
    assert torch.allclose(mixture_weights(eps_u, eps_k, ridge=1e-10, iters=3000), p, atol=1e-6)
    # Branches that agree carry no information: the weights stay uniform rather than follow rounding.
    same = eps_k[:1].expand(5, -1, -1, -1)
    assert torch.allclose(mixture_weights(same[0], same), torch.full((4, 5), 0.2, dtype=torch.float64))


def test_mixture_weights_minimise_the_ridge_objective_against_a_grid_search():
    gen = torch.Generator().manual_seed(1)
    eps_k = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
    eps_u = torch.randn(2, 6, generator=gen, dtype=torch.float64)  # not a mixture of the branches
    ridge = 0.05
    p = mixture_weights(eps_u, eps_k, ridge=ridge, iters=2000)
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=torch.float64)) and (p >= 0).all()
    grid = _simplex_grid(3, 400)

    def objective(w, target, branches):
        centred = branches - branches.mean(0)
        gram_mean = (centred @ centred.T).diagonal().mean()
        return ((target - w @ branches) ** 2).sum(-1) + ridge * gram_mean * ((w - 1 / 3) ** 2).sum(-1)

    for b in range(2):
        best = objective(grid, eps_u[b], eps_k[:, b]).min()
        found = objective(p[b][None], eps_u[b], eps_k[:, b])[0]
        assert best - 1e-3 * best <= found <= best + 1e-9  # below the grid's resolution, never above its best


def test_project_simplex_by_hand():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [-1.0, -1.0, 5.0], [0.5, 0.5, 0.5], [0.6, 0.6, -3.0]])
    expected = torch.tensor([[0.2, 0.3, 0.5], [1, 0, 0], [0, 0, 1], [1 / 3] * 3, [0.5, 0.5, 0.0]])
    assert torch.allclose(project_simplex(v), expected)


def test_endpoint_weight_integrates_the_snr_against_the_gap_change():
    """The weight of (B - A) in the integral of e^{2 lambda} (A + (B - A) u / h) over the step, by quadrature; half
    the SNR's integral for small steps, more of it (the SNR grows over the step) for large ones."""
    for sigma, sigma_next in [(2.0, 1.9), (1.9, 1.25), (5.0, 0.5)]:
        lo, hi = -math.log(sigma), -math.log(sigma_next)
        lam = torch.linspace(lo, hi, 200001, dtype=torch.float64)
        quadrature = torch.trapezoid(torch.exp(2 * lam) * (lam - lo) / (hi - lo), lam)
        assert math.isclose(endpoint_weight(sigma, sigma_next), float(quadrature), rel_tol=1e-6)
    snr = (1 / 0.999**2 - 1) / 2
    assert math.isclose(endpoint_weight(1.0, 0.999), snr / 2, rel_tol=2e-3)
    assert endpoint_weight(1.9, 1.25) > 0.55 * (1 / 1.25**2 - 1 / 1.9**2) / 2
    assert endpoint_weight(math.inf, 1.0) == endpoint_weight(1.0, 0.0) == endpoint_weight(1.0, 1.0) == 0.0


class _StubKernel:
    """Hands the tracker prepared moments, one per step."""

    def __init__(self, moments):
        self.queue = list(moments)

    def branch_moments(self, t, x, outs):
        return self.queue.pop(0)


def test_endpoint_reading_holds_a_steps_llr_until_the_gap_at_its_end_is_read():
    """p after step 1, as step 2 reads it: the prior plus step 1's llr minus the endpoint weight times
    (B - A) + 2 scale (C - A), the gaps normalised so that |d|^2 / (2 s^2) = |gap|^2 (1/sigma'^2 - 1/sigma^2) / 2;
    the llr step 1 returned (the trace's) holds the correction too."""
    g = torch.Generator().manual_seed(0)
    batch, dim, std1, std2 = 5, 7, 0.6, 0.4
    d1, d2 = 0.1 * torch.randn(1, batch, dim, generator=g), 0.1 * torch.randn(1, batch, dim, generator=g)
    mean_u = torch.randn(batch, dim, generator=g)
    x_prev = mean_u + std1 * torch.randn(batch, dim, generator=g)
    first = BranchMoments(mean_u, d1, std1, std1, (2.0, 1.2))
    second = BranchMoments(mean_u, d2, std2, std2, (1.2, 0.7))
    config = DNGConfig(prior=0.3, p_min=1e-30, p_max=1 - 1e-6)
    tracker = TrackedPosterior(endpoint=True)
    tracker.start(config, _StubKernel([first, second]), batch, 1)
    x, eps = torch.zeros(batch, dim), torch.zeros(1, batch, dim)
    tracker.before_step(0, x, eps[0], eps)
    scale = torch.rand(batch, 1, generator=g)
    tracker.pushed(scale)
    llr = tracker.after_step(x_prev)
    raw = gaussian_llr(*first.statistics(x_prev), std1)
    torch.testing.assert_close(llr, raw)
    torch.testing.assert_close(tracker.read(x, 0), torch.full((batch, 1), 0.3))  # held, not yet added
    tracker.before_step(1, x, eps[0], eps)

    def gap(d, std, sigma, sigma_next):
        return d[0] / (std * math.sqrt(1 / sigma_next**2 - 1 / sigma**2))

    a_gap, b_gap = gap(d1, std1, 2.0, 1.2), gap(d2, std2, 1.2, 0.7)
    a, b, c = (a_gap**2).sum(-1), (b_gap**2).sum(-1), (a_gap * b_gap).sum(-1)
    corrected = raw[:, 0] - endpoint_weight(2.0, 1.2) * ((b - a) + 2 * scale[:, 0] * (c - a))
    assert (math.log(0.3) + corrected < -1e-3).all()  # inside the clamp
    assert (corrected - raw[:, 0]).abs().min() > 1e-3  # the correction is not negligible here
    torch.testing.assert_close(tracker.tracker.log_p[:, 0], math.log(0.3) + corrected)
    torch.testing.assert_close(llr[:, 0], corrected)


def test_endpoint_reading_tracks_dpm_solver_on_karras_sigmas_closer_to_the_exact_posterior():
    """DPM++ 2M SDE Karras, 25 steps, the default mixture: read at both ends of each step, the tracked posterior's
    log-odds error along the chain and the leak are smaller than with the start-of-step reading (docs/GMM.md,
    "The Karras spacing"); the trace replays the tracker (p after a step = clamp(p before + the step's llr))."""
    from dng.bench.gmm import GMMBench

    bench = GMMBench(default_mixture_config(), 25, 1000, seed=0, scheduler="dpmpp-2m-sde")
    rule = {"prior": bench.prior, "mode": "exclusive"}
    rows = {}
    for endpoint in (False, True):
        rows[endpoint], trace = bench.run("dng", rule, lambda endpoint=endpoint: DynamicNegativeGuidance(
            **rule, posterior=TrackedPosterior(endpoint=endpoint)))
    assert rows[True]["posterior_logit_mae"] < 0.9 * rows[False]["posterior_logit_mae"], rows
    assert rows[True]["forbidden_rate"] < 0.7 * rows[False]["forbidden_rate"], rows
    log_p, llr = trace.p.log().double(), trace.llr.double()
    tracked = ~llr[:-1].isnan().any(-1).any(-1)
    expected = (log_p[:-1] + llr[:-1]).clamp(math.log(1e-6), math.log(0.95))
    torch.testing.assert_close(log_p[1:][tracked], expected[tracked], rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheduler, setting, reading", [("euler-a", "on", True), ("dpmpp-2m-sde", "off", False)])
def test_the_configurations_endpoint_chooses_the_reading_the_posterior_was_not_told(scheduler, setting, reading):
    """DNGConfig(endpoint="on"/"off") is TrackedPosterior(endpoint=True/False) on a kernel whose default is the other
    reading; "kernel" keeps the kernel's default; an explicit TrackedPosterior(endpoint=...) wins."""
    from dng.bench.gmm import GMMBench

    bench = GMMBench(default_mixture_config(), 10, 200, seed=0, scheduler=scheduler)
    rule = {"prior": bench.prior, "mode": "exclusive"}

    def run(**kwargs):
        posterior = kwargs.pop("posterior", None)
        return bench.run("dng", rule, lambda: DynamicNegativeGuidance(
            DNGConfig(**rule, **kwargs), **({} if posterior is None else {"posterior": posterior})))[1].llr

    told = run(posterior=TrackedPosterior(endpoint=reading))
    torch.testing.assert_close(run(endpoint=setting), told, equal_nan=True)
    kernel = run()
    assert not torch.allclose(kernel.nan_to_num(), told.nan_to_num())
    torch.testing.assert_close(run(endpoint="kernel"), kernel, equal_nan=True)
    other = "off" if setting == "on" else "on"
    torch.testing.assert_close(run(endpoint=other, posterior=TrackedPosterior(endpoint=reading)), told,
                               equal_nan=True)
    with pytest.raises(ConfigError, match="endpoint must be one of kernel, on, off"):
        DNGConfig(endpoint="both")
