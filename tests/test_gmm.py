"""The mixture's closed forms against naive references: densities built component by component, scores by autograd,
the velocity by Monte Carlo over (x_0, eps), the kernel ratio by Bayes."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dng.gmm import GaussianMixture, RectifiedFlow, VariancePreserving

ABAR = DDPMScheduler().alphas_cumprod.double()


def vp(t):
    """(a, b) of x_t = a x_0 + b eps on the DDPM schedule; t < 0 is the clean data."""
    abar = ABAR[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    return abar.sqrt(), (1 - abar).sqrt()


def flow(t):
    """(a, b) of x_t = (1 - s) x_0 + s eps at s = t / 1000."""
    s = torch.tensor(t / 1000, dtype=torch.float64)
    return 1 - s, s


def naive_log_components(gmm, x, a, b):
    """log w_k + log N(x; a m_k, (a^2 s_k^2 + b^2) I), one component at a time."""
    columns = []
    for k in range(gmm.num_classes):
        var = a**2 * gmm.stds[k] ** 2 + b**2
        sq = ((x - a * gmm.means[k]) ** 2).sum(-1)
        columns.append(gmm.weights[k].log() - 0.5 * (sq / var + gmm.dim * torch.log(2 * math.pi * var)))
    return torch.stack(columns, -1)


def mixture(path):
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.2, 0.5, 0.3, 1.1], [0.1, 0.4, 0.3, 0.2], path)


def points(seed, n=64):
    return 2 * torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("path, ab, times", [(ABAR, vp, (-1, 0, 10, 500, 999)),
                                             (RectifiedFlow(), flow, (0, 1, 300, 999, 1000))])
def test_log_joint_and_posterior_match_bayes_on_the_component_densities(path, ab, times):
    gmm = mixture(path)
    x = points(1)
    for t in times:
        naive = naive_log_components(gmm, x, *ab(t))
        torch.testing.assert_close(gmm.log_joint(x, t), naive, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(gmm.posterior(x, t), naive.softmax(-1), rtol=1e-10, atol=1e-12)


def _score(gmm, x, a, b, k=None):
    xg = x.clone().requires_grad_()
    log = naive_log_components(gmm, xg, a, b)
    (score,) = torch.autograd.grad((log.logsumexp(-1) if k is None else log[:, k]).sum(), xg)
    return score


def test_eps_is_minus_sigma_times_the_score():
    gmm = mixture(VariancePreserving(ABAR))
    x = points(2)
    for t in (0, 10, 500, 999):
        a, b = vp(t)
        torch.testing.assert_close(gmm.predict(x, t), -b * _score(gmm, x, a, b), rtol=1e-9, atol=1e-9)
        for k in (0, 2):
            torch.testing.assert_close(gmm.predict(x, t, [k, 0])[0], -b * _score(gmm, x, a, b, k), rtol=1e-9,
                                       atol=1e-9)


def test_velocity_is_the_score_identity():
    """E[eps - x_0 | x_t] = -(x_t + s score) / (1 - s) on x_t = (1 - s) x_0 + s eps (Tweedie: E[eps | x_t] =
    -s score, and x_0 = (x_t - s eps) / (1 - s)), for the mixture and for each class."""
    gmm = mixture(RectifiedFlow())
    x = points(3)
    for t in (1, 300, 700, 990):
        a, s = flow(t)
        torch.testing.assert_close(gmm.predict(x, t), -(x + s * _score(gmm, x, a, s)) / a, rtol=1e-9, atol=1e-9)
        for k in (0, 3):
            torch.testing.assert_close(gmm.predict(x, t, [k, 1])[0], -(x + s * _score(gmm, x, a, s, k)) / a,
                                       rtol=1e-9, atol=1e-9)


def test_velocity_at_the_ends_of_the_path():
    """At s = 1 x_t is the noise itself, so v = x_t - E[x_0]; at s = 0 eps is independent of x_0 = x_t, v = -x_t.
    The score identity is singular at s = 1."""
    gmm = mixture(RectifiedFlow())
    x = points(4)
    torch.testing.assert_close(gmm.predict(x, 1000), x - gmm.weights @ gmm.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.predict(x, 1000, [2])[0], x - gmm.means[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.predict(x, 0), -x, rtol=1e-12, atol=1e-12)


def test_velocity_is_the_conditional_mean_of_eps_minus_x0_by_monte_carlo():
    """The residual (eps - x_0) - v(x_t) of pairs drawn from the mixture is orthogonal to functions of x_t, as a
    conditional mean's must be; the velocity of a nearby time is not."""
    gmm = GaussianMixture([[-1.5], [1.0]], [0.3, 0.6], [0.3, 0.7], RectifiedFlow())
    g = torch.Generator().manual_seed(5)
    x0, _ = gmm.sample(400_000, generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = 0.5
    xt = (1 - s) * x0 + s * eps

    def worst_z(v):
        residual = (eps - x0 - v)[:, 0]
        tests = torch.stack([torch.ones_like(residual), xt[:, 0], torch.tanh(2 * xt[:, 0])])
        products = residual * tests
        return float((products.mean(-1).abs() / (products.std(-1) / len(residual) ** 0.5)).max())

    assert worst_z(gmm.predict(xt, 500)) < 4.5
    assert worst_z(gmm.predict(xt, 450)) > 20


@pytest.mark.parametrize("path, steps", [(ABAR, [(999, 800), (500, 480), (40, 0), (10, -1)]),
                                         (RectifiedFlow(), [(1000, 900), (500, 480), (40, 0)])])
def test_kernel_llr_is_the_ratio_of_exact_posteriors(path, steps):
    """c and x_t are independent given x_prev, so q(x_prev | x_t, c) / q(x_prev | x_t) = p(c | x_prev) / p(c | x_t)
    for any pair of points."""
    gmm = mixture(path)
    x, x_prev = points(6), points(7)
    for t, t_prev in steps:
        expected = gmm.log_joint(x_prev, t_prev).log_softmax(-1) - gmm.log_joint(x, t).log_softmax(-1)
        torch.testing.assert_close(gmm.kernel_llr(x_prev, x, t, t_prev, [0, 2]), expected[:, [0, 2]], rtol=1e-9,
                                   atol=1e-9)
