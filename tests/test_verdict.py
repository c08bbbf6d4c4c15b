"""The model's own verdict, checked against the exact Gaussian mixture and by hand."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from dng.errors import ConfigError
from dng.gmm import GaussianMixture
from dng.verdict import (
    DRAWS,
    MIDPOINT,
    DiffusionPath,
    FlowPath,
    log_ratios,
    path_of,
    probabilities,
    verdict,
    weighting,
)

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = (0.4, 0.3, 0.2, 0.1)


@pytest.fixture(scope="module")
def bed():
    """Four overlapping classes in 16 dimensions: log-ratios of a few nats, a fifth of the samples ambiguous."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    means = 0.35 * torch.randn(4, 16, generator=g, dtype=torch.float64) / math.sqrt(2)
    gmm = GaussianMixture(means, [0.5] * 4, WEIGHTS, scheduler.alphas_cumprod)
    x0, _ = gmm.sample(200, generator=g)
    exact = gmm.log_joint(x0) - gmm.weights.log() - gmm.log_density(x0)[:, None]
    return gmm, DiffusionPath(scheduler.alphas_cumprod), x0, exact


def estimate(bed, draws, midpoint=math.inf, seed=1, model=None, path=None):
    gmm, vp, x0, _ = bed
    # Batches of 10: each has its own stratified noise levels, so the 200 errors are nearly independent.
    return log_ratios(model or gmm.branch_model(range(4)), x0, path or vp, 4, midpoint=midpoint, draws=draws,
                      batch_size=10, generator=torch.Generator().manual_seed(seed), progress=False)


def test_likelihood_weighting_gives_the_exact_log_likelihood_ratio(bed):
    # With exact branches the likelihood weighting estimates log p(x0|c) - log p(x0) without bias; its spread halves
    # with four times the draws. A missing 1/2, a wrong noise level or unshared noise fails by far more than this.
    exact = bed[3]
    err = estimate(bed, DRAWS) - exact
    more = estimate(bed, 4 * DRAWS, seed=2) - exact
    # Measured over seeds: sd 0.40-0.47 at DRAWS, 0.18-0.22 at 4 DRAWS; means within 0.06 of 0.
    assert abs(float(err.mean())) < 0.15 and float(err.std()) < 0.6, (err.mean(), err.std())
    assert abs(float(more.mean())) < 0.08 and float(more.std()) < 0.65 * float(err.std()), (more.mean(), more.std())


def test_default_weighting_gives_the_exact_log_ratio_of_the_noisy_copies(bed):
    # sigmoid(midpoint - lam) estimates int (-dw/dlam) G(lam) + [w G] over the ends, G(lam) the expected exact
    # log-ratio of the copies of x0 noised to lam (Kingma & Gao 2023): computed here from the mixture's closed form.
    gmm, path, x0, _ = bed
    g = torch.Generator().manual_seed(3)

    def expected(lam):
        a, s = path.scales(lam)
        eps = torch.randn((32,) + x0.shape, generator=g, dtype=torch.float64)
        z = (a * x0 + s * torch.cat([eps, -eps])).flatten(0, 1)
        joint = gmm.log_joint(z, path.timestep(lam))
        return (joint - gmm.weights.log() - joint.logsumexp(-1, keepdim=True)).unflatten(0, (64, -1)).mean(0)

    lams = np.linspace(path.lam_min, path.lam_max, 100)
    w = weighting(lams, MIDPOINT)
    grid = torch.stack([expected(float(lam)) for lam in lams]).numpy()
    target = w[-1] * grid[-1] - w[0] * grid[0] + np.trapezoid((w * (1 - w))[:, None, None] * grid, lams, axis=0)
    err = estimate(bed, DRAWS, MIDPOINT) - torch.from_numpy(target)
    # Measured: mean error 0.001-0.01, sd 0.13.
    assert abs(float(err.mean())) < 0.05 and float(err.std()) < 0.2, (err.mean(), err.std())
    # ... and not the clean log-ratio, which the noise blurs: the default is a different, duller question here.
    assert float((estimate(bed, DRAWS, MIDPOINT) - bed[3]).abs().mean()) > 1


def test_exhaustive_verdict_finds_the_class_shares_and_the_exact_posterior(bed):
    gmm, _, x0, exact = bed
    result = probabilities(estimate(bed, DRAWS), exhaustive=True)
    shares = torch.bincount(gmm.posterior(x0).argmax(-1), minlength=4) / len(x0)
    torch.testing.assert_close(result.priors, shares.double(), atol=0.05, rtol=0)
    assert float((result.p - gmm.posterior(x0)).abs().mean()) < 0.03
    # Told the true priors, the exact log-ratios give the exact posterior.
    torch.testing.assert_close(probabilities(exact, WEIGHTS, exhaustive=True).p, gmm.posterior(x0))


def test_independent_concepts_take_their_priors_by_hand():
    log_ratio = torch.tensor([[math.log(4.0), math.log(0.5)], [math.log(20.0), 0.0]], dtype=torch.float64)
    result = probabilities(log_ratio, priors=[0.1, 0.3])
    torch.testing.assert_close(result.p, torch.tensor([[0.4, 0.15], [1.0, 0.3]], dtype=torch.float64))
    with pytest.raises(ConfigError, match="needs each concept's prior"):
        probabilities(log_ratio)
    with pytest.raises(ConfigError, match="one per concept"):
        probabilities(log_ratio, priors=[0.1])
    with pytest.raises(ConfigError, match="at least 2"):
        probabilities(log_ratio[:, :1], exhaustive=True)


def test_v_prediction_and_flow_velocity_read_as_epsilon_by_hand():
    # lam = log(0.36 / 0.64): alpha 0.6, sigma 0.8; eps = sigma x + alpha v = 0.8 * 1 + 0.6 * 2.
    vp = DiffusionPath(DDPMScheduler().alphas_cumprod, "v_prediction")
    lam = math.log(0.36 / 0.64)
    assert vp.scales(lam) == pytest.approx((0.6, 0.8))
    assert float(vp.to_eps(torch.tensor(2.0), torch.tensor(1.0), lam)) == pytest.approx(2.0)
    # s = 0.25 (lam = 2 log 3): x0 = x - s v = 0.5, eps = v + x0 = 2.5 = x + (1 - s) v.
    flow = FlowPath()
    lam = 2 * math.log(3)
    assert flow.scales(lam) == pytest.approx((0.75, 0.25)) and flow.timestep(lam) == pytest.approx(250)
    assert float(flow.to_eps(torch.tensor(2.0), torch.tensor(1.0), lam)) == pytest.approx(2.5)
    # A training timestep's own noise level calls it at that timestep.
    eps_path = DiffusionPath(DDPMScheduler().alphas_cumprod)
    abar = DDPMScheduler().alphas_cumprod[417].double()
    assert eps_path.timestep(float(torch.log(abar / (1 - abar)))) == pytest.approx(417)


def test_v_and_flow_models_give_the_epsilon_models_verdict(bed):
    gmm, vp, _, _ = bed
    eps_model = gmm.branch_model(range(4))

    def v_model(x, t):  # v = alpha eps - sigma x0 = (eps - sigma x) / alpha
        alpha, sigma = vp.scales(_lam_of(vp, float(t)))
        return (eps_model(x, t) - sigma * x) / alpha

    # The flow path over the same log-SNRs draws the same noise levels and noise: the copies are the DDPM ones
    # rescaled by (1 - s) / alpha.
    flow = FlowPath(1000, s_min=1 / (1 + math.exp(vp.lam_max / 2)), s_max=1 / (1 + math.exp(vp.lam_min / 2)))
    assert (flow.lam_min, flow.lam_max) == pytest.approx((vp.lam_min, vp.lam_max))

    def flow_model(x, t):  # v = eps - x0 = (eps - x) / (1 - s)
        s = float(t) / 1000
        lam = FlowPath.log_snr(s)
        alpha = vp.scales(lam)[0]
        eps = eps_model(x * alpha / (1 - s), torch.tensor(vp.timestep(lam)))
        return (eps - x) / (1 - s)

    reference = estimate(bed, 8)
    v_path = DiffusionPath(gmm.path.abar, "v_prediction")
    # Equal up to the float32 rounding of the branch errors.
    torch.testing.assert_close(estimate(bed, 8, model=v_model, path=v_path), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(estimate(bed, 8, model=flow_model, path=flow), reference, rtol=1e-5, atol=1e-5)


def _lam_of(path, t):
    """The log-SNR the path calls at timestep t (the inverse of `timestep`)."""
    return -2 * math.log(float(np.interp(t, np.arange(len(path.ratio)), path.ratio)))


def test_path_of_reads_the_scheduler():
    flow = path_of(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(flow, FlowPath) and flow.timestep(0.0) == pytest.approx(500)
    vp = path_of(EulerAncestralDiscreteScheduler(prediction_type="v_prediction"))
    assert isinstance(vp, DiffusionPath) and vp.prediction_type == "v_prediction"
    torch.testing.assert_close(torch.from_numpy(vp.ratio) ** 2,
                               ((1 - DDPMScheduler().alphas_cumprod) / DDPMScheduler().alphas_cumprod).double())
    with pytest.raises(ConfigError, match="not supported"):
        path_of(DDPMScheduler(prediction_type="sample"))


def test_bad_input_is_refused_with_what_to_change(bed):
    gmm, path, x0, _ = bed
    model = gmm.branch_model(range(4))
    with pytest.raises(ConfigError, match="even"):
        log_ratios(model, x0, path, 4, draws=7)
    with pytest.raises(ConfigError, match="finite batch"):
        log_ratios(model, torch.full((2, 16), float("nan")), path, 4)
    with pytest.raises(ConfigError, match="decreasing"):
        DiffusionPath(torch.linspace(0.1, 0.9, 10))
    with pytest.raises(ConfigError, match="s_min < s_max"):
        FlowPath(s_min=0.5, s_max=0.2)


def test_verdict_is_log_ratios_then_probabilities(bed):
    gmm, path, x0, _ = bed
    g = torch.Generator().manual_seed(5)
    result = verdict(gmm.branch_model(range(4)), x0[:20], path, 4, exhaustive=True, draws=4, generator=g,
                     progress=False)
    again = log_ratios(gmm.branch_model(range(4)), x0[:20], path, 4, draws=4,
                       generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(result.log_ratio, again)
    torch.testing.assert_close(result.p.sum(1), torch.ones(20, dtype=torch.float64))


def test_the_verdict_builds_no_autograd_graph(bed):
    """A network's parameters require gradients; the verdict only reads the model, so it must not record a graph
    through its calls (memory and time a calibration of a real model cannot spare)."""
    gmm, path, x0, _ = bed
    shift = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
    branches = gmm.branch_model(range(4))

    def model(x, t):
        return branches(x, t) + shift

    out = log_ratios(model, x0[:10], path, 4, draws=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert not out.requires_grad
