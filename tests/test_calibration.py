"""Calibration of DNG's prior, temperature and offset, checked on the exact Gaussian mixture."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from dng import calibration
from dng.config import DNGConfig
from dng.errors import ConfigError
from dng.gmm import GaussianMixture, default_mixture_config
from dng.guidance import DynamicNegativeGuidance
from dng.sampler import sample

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 50


def tracked_unguided_chain(n, steps, seed=0, classes=(0,)):
    """Unguided samples of the default mixture with the raw llr of `classes`, and whether each ends in them."""
    cfg = default_mixture_config()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod, torch.float32)
    rule = DynamicNegativeGuidance(lam0=0.0, prior=0.5, temperature=1.0, offset=0.0, p_min=1e-30, p_max=1 - 1e-6)
    g = torch.Generator().manual_seed(seed)
    out = sample(gmm.branch_model(list(classes)), scheduler, rule, noise=torch.randn(n, gmm.dim, generator=g),
                 num_inference_steps=steps, num_negatives=len(classes), generator=g, progress=False,
                 return_trace=True)
    outcome = gmm.log_joint(out.samples).argmax(-1)[:, None] == torch.tensor(classes)
    gains = calibration.log_snr_gains(out.trace.sigma)
    if len(classes) == 1:
        return out.trace.llr[:, :, 0], outcome[:, 0], gains
    return out.trace.llr, outcome, gains


def test_log_snr_gains_by_hand():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    abar = scheduler.alphas_cumprod
    log_snr = [math.log(abar[t] / (1 - abar[t])) for t in scheduler.timesteps]
    rule = DynamicNegativeGuidance(lam0=0.0)
    out = sample(lambda x, t: torch.zeros_like(x), scheduler, rule, noise=torch.zeros(1, 4), num_inference_steps=10,
                 num_negatives=1, progress=False, return_trace=True)
    gains = calibration.log_snr_gains(out.trace.sigma)
    torch.testing.assert_close(gains[:-1], torch.tensor(log_snr[1:]) - torch.tensor(log_snr[:-1]),
                               rtol=1e-5, atol=1e-5, check_dtype=False)
    assert gains[-1] == 0  # the last step lands on clean data: no finite gain, no offset (as the tracker adds it)


def bernoulli_nll(prior, temperature, offset, llr, gains, outcome, p_max=0.999):
    keep = ~llr.isnan().any(1)
    log_p, log_max = math.log(prior), math.log(p_max)
    total = torch.zeros((), dtype=torch.float64)
    for s in torch.nonzero(keep)[:, 0]:
        log_p = (log_p + temperature * llr[s].double() + offset * gains[s]).clamp(math.log(1e-6), log_max)
        total += -(outcome * log_p + (~outcome) * torch.log1p(-log_p.exp())).mean()
    return float(total / keep.sum())


@pytest.fixture(scope="module")
def chain(one_thread):
    return tracked_unguided_chain(3000, STEPS)


def test_calibration_recovers_bayes_on_the_exact_mixture(chain):
    # With the true prior (0.1), temperature 1 and no offset the tracker is near-exact Bayes here (docs/GMM.md):
    # the fit must find the prior, and a likelihood no worse than Bayes' yet not far better (nothing to correct).
    llr, outcome, gains = chain
    fitted = calibration.fit(llr, gains, outcome, p_max=0.999)
    bayes = bernoulli_nll(0.1, 1.0, 0.0, llr, gains, outcome)
    assert 0.07 < fitted.priors[0] < 0.14, fitted
    assert 0.6 < fitted.temperature < 1.4, fitted
    assert 0.95 * bayes < fitted.nll <= bayes + 1e-9, (fitted, bayes)
    assert fitted.nll == pytest.approx(bernoulli_nll(fitted.priors[0], fitted.temperature, fitted.offset, llr,
                                                     gains, outcome), rel=1e-6)
    assert fitted.nll < 0.8 * fitted.baseline_nll and fitted.auc[0.9][0] > 0.99


def test_calibration_finds_a_damped_tracker(chain):
    # The same chain with the evidence exaggerated 4x (as a model whose branches disagree too much would give):
    # the fit must undo it.
    llr, outcome, gains = chain
    honest = calibration.fit(llr, gains, outcome, p_max=0.999)
    loud = calibration.fit(4 * llr, gains, outcome, p_max=0.999)
    assert loud.temperature == pytest.approx(honest.temperature / 4, rel=0.15)
    assert math.isclose(loud.priors[0], honest.priors[0], rel_tol=0.2)


def test_calibration_fits_several_concepts_with_their_own_priors():
    llr, outcome, gains = tracked_unguided_chain(1000, STEPS, classes=(0, 1, 2))
    fitted = calibration.fit(llr, gains, outcome, p_max=0.999)
    # The offset (a drift per unit of log-SNR) trades off against the priors a little: 0.06-0.09 at 1000 samples.
    assert len(fitted.priors) == 3 and all(0.05 < p < 0.14 for p in fitted.priors), fitted
    assert 0.6 < fitted.temperature < 1.4 and fitted.nll < 0.8 * fitted.baseline_nll
    alone = calibration.fit(llr[:, :, 1], gains, outcome[:, 1], p_max=0.999)
    assert alone.priors[0] == pytest.approx(fitted.priors[1], rel=0.25)


def test_a_fit_made_at_50_steps_predicts_at_25_and_100(chain):
    """The offset is per unit of log-SNR, so a fit carries over to other step counts: its likelihood on their chains
    stays within a few percent of their own refit (the temperature drifts a little with the step size)."""
    llr50, outcome50, gains50 = chain
    fit50 = calibration.fit(llr50, gains50, outcome50, p_max=0.999)
    for steps in (25, 100):
        llr, outcome, gains = tracked_unguided_chain(2000, steps, seed=1)
        own = calibration.fit(llr, gains, outcome, p_max=0.999)
        carried = bernoulli_nll(fit50.priors[0], fit50.temperature, fit50.offset, llr, gains, outcome)
        scored = calibration.evaluate(fit50.priors, fit50.temperature, fit50.offset, llr, gains, outcome, p_max=0.999)
        assert scored["nll"] == pytest.approx(carried, rel=1e-9)
        assert scored["baseline_nll"] == pytest.approx(own.baseline_nll, rel=1e-9)
        assert carried < 1.05 * own.nll and carried < 0.8 * own.baseline_nll, (steps, carried, own)


def test_calibration_refuses_too_few_outcomes():
    with pytest.raises(ConfigError, match="at least 5 of each"):
        calibration.fit(torch.zeros(3, 10), torch.ones(3), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ConfigError, match="need llr \\[steps, samples"):
        calibration.fit(torch.zeros(3, 10), torch.ones(4), torch.arange(10) < 5)
    with pytest.raises(ConfigError, match="2 priors for 3 concepts"):
        calibration.evaluate([0.1, 0.2], 1.0, 0.0, torch.zeros(3, 10, 3), torch.ones(3), torch.zeros(10, 3))


@pytest.mark.parametrize("exclusive", [False, True])
def test_the_fit_replays_the_trackers_own_updates(exclusive):
    """The fitted trajectory is what DNG's tracker computes from the same llr with the fitted settings, in either
    mode: the same clamp, the same offset per unit of log-SNR."""
    from dng.posterior import PosteriorTracker

    g = torch.Generator().manual_seed(0)
    llr = 3 * torch.randn(12, 40, 3, generator=g, dtype=torch.float64) + 0.5
    gains = torch.rand(12, generator=g, dtype=torch.float64)
    log_prior = torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64).log()
    fitted = calibration.trajectory(log_prior, 0.7, 0.2, llr, gains, 1e-6, 0.95, exclusive)
    tracker = PosteriorTracker(DNGConfig(prior=[0.3, 0.2, 0.4], mode="exclusive" if exclusive else "independent"),
                               dtype=torch.float64)
    tracker.start(40, 3)
    for s in range(12):
        tracker.update(0.7 * llr[s] + 0.2 * gains[s])
        torch.testing.assert_close(fitted[s], tracker.log_p)
    if exclusive:
        assert (fitted.exp().sum(-1) <= 0.95 + 1e-9).all()  # the cap that the independent clamp does not apply
    else:
        assert (fitted.exp().sum(-1) > 0.95).any()


def test_roc_auc_by_hand():
    t = torch.tensor
    assert calibration.roc_auc(t([0.1, 0.4, 0.35, 0.8]), t([False, True, False, True])) == 1.0
    assert calibration.roc_auc(t([0.2, 0.6, 0.4]), t([True, False, False])) == 0.0
    assert calibration.roc_auc(t([0.5, 0.5, 0.9]), t([True, False, False])) == 0.25  # a tie counts half
    assert math.isnan(calibration.roc_auc(t([0.5, 0.7]), t([True, True])))
    # Soft labels: pairs weigh y_i (1 - y_j); here 0.75 * 0.75 won against 0.25 * 0.25 lost.
    assert calibration.roc_auc(t([0.1, 0.9]), t([0.25, 0.75])) == pytest.approx(0.9)
    assert calibration.roc_auc(t([0.1, 0.4, 0.35, 0.8]), t([0.0, 1.0, 0.0, 1.0])) == 1.0


def test_labels_in_0_1_given_as_floats_fit_as_the_hard_labels(chain):
    llr, outcome, gains = chain
    hard = calibration.fit(llr, gains, outcome, p_max=0.999)
    assert calibration.fit(llr, gains, outcome.double(), p_max=0.999) == hard


def test_soft_labels_set_the_prior_by_hand():
    # No evidence (llr 0): the best constant p is the mean label, which soft labels count by their probability.
    # 30 of 100 samples are positives; as soft labels 0.5 they count as 15.
    llr, gains = torch.zeros(6, 100), torch.full((6,), 0.5)
    hard = torch.arange(100) < 30
    assert calibration.fit(llr, gains, hard).priors[0] == pytest.approx(0.3, abs=1e-4)
    soft = calibration.fit(llr, gains, 0.5 * hard.double())
    assert soft.priors[0] == pytest.approx(0.15, abs=1e-4) and soft.offset == pytest.approx(0, abs=1e-4)
    assert soft.positives == [15.0] and soft.baseline_nll == pytest.approx(-(0.15 * math.log(0.15)
                                                                            + 0.85 * math.log(0.85)))
    with pytest.raises(ConfigError, match="probabilities in \\[0, 1\\]"):
        calibration.fit(llr, gains, torch.full((100,), 1.5))


def test_self_calibration_on_the_exact_mixture_matches_the_labelled_fit():
    """The model's own verdict labels the chains nearly as the exact labels do (it reads the samples through noise,
    which blurs the near classes 0-2 a little), so the fits agree; the verdict finds the classes' shares itself (the
    ten classes partition the mixture)."""
    cfg = default_mixture_config()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod, torch.float32)
    g = torch.Generator().manual_seed(0)
    names = [f"class {k}" for k in range(10)]
    made = calibration.self_calibrate(gmm.branch_model(range(10)), scheduler, torch.randn(600, gmm.dim, generator=g),
                                      names, exhaustive=True, num_inference_steps=STEPS, generator=g, progress=False)
    labels = gmm.log_joint(made.samples).argmax(-1)[:, None] == torch.arange(10)
    assert float((made.verdict.p - labels.double()).abs().mean()) < 0.01
    assert float((made.verdict.p.argmax(-1) == labels.double().argmax(-1)).double().mean()) > 0.99
    labelled = calibration.fit(made.trace.llr, calibration.log_snr_gains(made.trace.sigma), labels)
    assert made.fit.temperature == pytest.approx(labelled.temperature, abs=0.05)
    assert made.fit.priors == pytest.approx(labelled.priors, abs=0.005)
    assert made.calibration == calibration.ModelCalibration(tuple(names), tuple(made.fit.priors),
                                                            made.fit.temperature, made.fit.offset, 0.95)
    with pytest.raises(ConfigError, match="distinct names"):
        calibration.self_calibrate(gmm.branch_model([0]), scheduler, torch.randn(4, gmm.dim), ["a", "a"])


@pytest.mark.parametrize("singlestep", [False, True])
def test_a_trace_replays_the_tracker_except_on_singlestep_solvers_which_calibration_refuses(singlestep):
    """`fit` replays the trace as the tracker ran (p after a step = clamp(p before + its llr)): so it does on DPM++ 2M
    SDE, whose llr the endpoint reading corrects in place a step later. A singlestep stage restarts from the p held
    at its first sample, which no step-by-step replay follows: self_calibrate refuses such a sampler before sampling."""
    cfg = default_mixture_config()
    base = DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config
    kind = DPMSolverSinglestepScheduler if singlestep else DPMSolverMultistepScheduler
    scheduler = kind.from_config(base, algorithm_type="sde-dpmsolver++", solver_order=2)
    gmm = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], scheduler.alphas_cumprod, torch.float32)
    rule = calibration.tracking_only()
    g = torch.Generator().manual_seed(0)
    out = sample(gmm.branch_model([0]), scheduler, rule, noise=torch.randn(200, gmm.dim, generator=g),
                 num_inference_steps=12, num_negatives=1, generator=g, progress=False, return_trace=True)
    trace, c = out.trace, rule.config
    replayed = calibration.trajectory(torch.tensor([c.prior], dtype=torch.float64).log(), 1.0, 0.0,
                                      trace.llr.double().nan_to_num(0.0), calibration.log_snr_gains(trace.sigma),
                                      c.p_min, c.p_max)
    gap = float((replayed[:-1].exp() - trace.p[1:].double()).abs().max())  # trace.p[s]: p read at step s
    if not singlestep:
        assert gap < 1e-5
        return
    assert gap > 0.1
    with pytest.raises(ConfigError, match="restarts from its first sample"):
        calibration.self_calibrate(lambda *a: pytest.fail("sampled before refusing"), scheduler,
                                   torch.randn(4, gmm.dim), ["a"])
