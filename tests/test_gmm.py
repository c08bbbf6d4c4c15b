"""The mixture's closed forms against a naive reference: densities built component by component, scores by autograd."""

import math

import torch
from diffusers import DDPMScheduler

from dng.gmm import GaussianMixture


def naive_log_components(gmm, x, t):
    """log w_k + log N(x; sqrt(abar) m_k, (abar s_k^2 + 1 - abar) I), one component at a time."""
    abar = gmm.abar[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    columns = []
    for k in range(gmm.num_classes):
        var = abar * gmm.stds[k] ** 2 + 1 - abar
        sq = ((x - abar.sqrt() * gmm.means[k]) ** 2).sum(-1)
        columns.append(gmm.weights[k].log() - 0.5 * (sq / var + gmm.dim * torch.log(2 * math.pi * var)))
    return torch.stack(columns, -1)


def mixture():
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.2, 0.5, 0.3, 1.1], [0.1, 0.4, 0.3, 0.2], DDPMScheduler().alphas_cumprod)


def test_log_joint_and_posterior_match_the_naive_density():
    gmm = mixture()
    x = 2 * torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (-1, 0, 10, 500, 999):
        naive = naive_log_components(gmm, x, t)
        torch.testing.assert_close(gmm.log_joint(x, t), naive, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(gmm.posterior(x, t), naive.softmax(-1), rtol=1e-10, atol=1e-12)


def test_eps_is_minus_sigma_times_the_score():
    gmm = mixture()
    x = 2 * torch.randn(64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (0, 10, 500, 999):
        sigma = (1 - gmm.abar[t]).sqrt()
        xg = x.clone().requires_grad_()
        (score,) = torch.autograd.grad(naive_log_components(gmm, xg, t).logsumexp(-1).sum(), xg)
        torch.testing.assert_close(gmm.eps(x, t), -sigma * score, rtol=1e-9, atol=1e-9)
        for k in (0, 2):
            xg = x.clone().requires_grad_()
            (score,) = torch.autograd.grad(naive_log_components(gmm, xg, t)[:, k].sum(), xg)
            torch.testing.assert_close(gmm.eps(x, t, [k, 0])[0], -sigma * score, rtol=1e-9, atol=1e-9)
