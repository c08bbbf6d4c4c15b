"""Each kernel reproduces its scheduler's own step: mean + std * z with the step's noise z."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LTXEulerAncestralRFScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from dng.bench.gmm import GMMBench
from dng.errors import ConfigError
from dng.gmm import default_mixture_config
from dng.guidance import DynamicNegativeGuidance
from dng.kernels import DPMSolverKernel
from dng.posterior import MIN_TRACKING_STD
from dng.sampler import sample, step_kwargs
from dng.schedulers import reverse_kernel

SHAPE = (3, 2, 4, 4)
# Tiny tensors: a second OpenMP thread only adds contention.
pytestmark = pytest.mark.usefixtures("one_thread")
SDE = "sde-dpmsolver++"


def _case(name, scheduler, eta=None, steps=20, **set_kwargs):
    """One scheduler configuration: the eta the sampler gives its step and how set_timesteps is called."""
    return pytest.param(scheduler, {} if eta is None else {"eta": eta}, steps, set_kwargs, id=name)


CASES = [
    _case("ddpm-small", DDPMScheduler(variance_type="fixed_small", clip_sample=False)),
    _case("ddpm-large", DDPMScheduler(variance_type="fixed_large", clip_sample=False)),
    _case("ddpm-small-log", DDPMScheduler(variance_type="fixed_small_log")),
    _case("ddpm-clip", DDPMScheduler(clip_sample=True, clip_sample_range=0.5)),
    _case("ddpm-threshold", DDPMScheduler(thresholding=True, sample_max_value=0.8)),
    _case("ddpm-v", DDPMScheduler(prediction_type="v_prediction", clip_sample=False)),
    _case("ddim-eta1", DDIMScheduler(clip_sample=False), eta=1.0),
    _case("ddim-eta03-clip", DDIMScheduler(clip_sample=True), eta=0.3),
    _case("ddim-v-trailing", DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"), eta=0.7),
    _case("euler-a", EulerAncestralDiscreteScheduler()),
    _case("euler-a-v", EulerAncestralDiscreteScheduler(prediction_type="v_prediction")),
    _case("kdpm2-a", KDPM2AncestralDiscreteScheduler()),
    _case("kdpm2-a-v-karras", KDPM2AncestralDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True,
                                                             beta_schedule="scaled_linear")),
    _case("dpm1-sde", DPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=1)),
    _case("dpm2m-sde", DPMSolverMultistepScheduler(algorithm_type=SDE)),
    _case("dpm2m-sde-karras", DPMSolverMultistepScheduler(algorithm_type=SDE, use_karras_sigmas=True,
                                                         beta_schedule="scaled_linear")),
    _case("dpm2m-sde-heun-exponential", DPMSolverMultistepScheduler(algorithm_type=SDE, solver_type="heun",
                                                                   use_exponential_sigmas=True)),
    # (Exponential sigmas with a sigma_min final repeat the last sigma: diffusers' own last step is NaN there.)
    _case("dpm2m-sde-heun-sigmamin", DPMSolverMultistepScheduler(algorithm_type=SDE, solver_type="heun",
                                                                final_sigmas_type="sigma_min")),
    _case("dpm2m-sde-lu-v", DPMSolverMultistepScheduler(algorithm_type=SDE, use_lu_lambdas=True,
                                                       prediction_type="v_prediction")),
    _case("dpm2m-sde-sample-trailing", DPMSolverMultistepScheduler(algorithm_type=SDE, prediction_type="sample",
                                                                  timestep_spacing="trailing")),
    _case("dpm2m-sde-threshold", DPMSolverMultistepScheduler(algorithm_type=SDE, thresholding=True,
                                                            sample_max_value=1.5)),
    _case("dpm2m-sde-flow", DPMSolverMultistepScheduler(algorithm_type=SDE, use_flow_sigmas=True, flow_shift=3.0,
                                                       prediction_type="flow_prediction")),
    _case("dpm3m-sde", DPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=3)),
    # Fewer than 15 steps: lower_order_final lowers the last two steps' orders.
    _case("dpm3m-sde-karras-short", DPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=3,
                                                               use_karras_sigmas=True), steps=8),
    _case("dpm3m-sde-euler-final-sigmamin", DPMSolverMultistepScheduler(
        algorithm_type=SDE, solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min")),
    _case("dpm2m-sde-deprecated", DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver",
                                                             final_sigmas_type="sigma_min")),
    _case("dpm2m-sde-deprecated-heun-v", DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min",
        prediction_type="v_prediction")),
    _case("dpm-single1-sde", DPMSolverSinglestepScheduler(algorithm_type=SDE, solver_order=1)),
    _case("dpm-single2-sde", DPMSolverSinglestepScheduler(algorithm_type=SDE)),
    _case("dpm-single2-sde-heun-sigmamin", DPMSolverSinglestepScheduler(
        algorithm_type=SDE, solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False)),
    _case("dpm-single3-sde-karras", DPMSolverSinglestepScheduler(algorithm_type=SDE, solver_order=3,
                                                                use_karras_sigmas=True)),
    _case("dpm-single3-sde-heun-v-threshold", DPMSolverSinglestepScheduler(
        algorithm_type=SDE, solver_order=3, solver_type="heun", prediction_type="v_prediction", thresholding=True,
        sample_max_value=1.5), steps=11),
    _case("edm-sde", EDMDPMSolverMultistepScheduler(algorithm_type=SDE)),
    _case("edm1-sde-exponential", EDMDPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=1,
                                                                sigma_schedule="exponential")),
    _case("edm-sde-heun-v-sigmamin-short", EDMDPMSolverMultistepScheduler(
        algorithm_type=SDE, solver_type="heun", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        steps=8),
    _case("edm-sde-threshold", EDMDPMSolverMultistepScheduler(algorithm_type=SDE, thresholding=True,
                                                             sample_max_value=2.0)),
    _case("tcd-gamma03", TCDScheduler(), eta=0.3),
    _case("tcd-gamma1-v", TCDScheduler(prediction_type="v_prediction"), eta=1.0),
    _case("tcd-gamma06-sample-trailing", TCDScheduler(prediction_type="sample", timestep_spacing="trailing"), eta=0.6),
    _case("lcm", LCMScheduler()),
    _case("lcm-v-clip", LCMScheduler(prediction_type="v_prediction", clip_sample=True), steps=8),
    _case("lcm-threshold", LCMScheduler(thresholding=True, sample_max_value=1.5)),
    _case("flow-stochastic", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)),
    _case("flow-stochastic-shift3-karras", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0,
                                                                          use_karras_sigmas=True)),
    _case("flow-stochastic-dynamic", FlowMatchEulerDiscreteScheduler(stochastic_sampling=True,
                                                                    use_dynamic_shifting=True), mu=0.8),
    _case("ltx-euler-a", LTXEulerAncestralRFScheduler()),
    _case("ltx-euler-a-eta05", LTXEulerAncestralRFScheduler(eta=0.5, s_noise=0.9)),
    _case("cm", CMStochasticIterativeScheduler()),
    _case("cm-noclip", CMStochasticIterativeScheduler(clip_denoised=False, s_noise=0.8)),
]


def _start(scheduler, steps, set_kwargs, gen):
    """set_timesteps, and x_T as the sampler draws it."""
    scheduler.set_timesteps(steps, **set_kwargs)
    return torch.randn(SHAPE, generator=gen) * getattr(scheduler, "init_noise_sigma", 1.0)


def _scale_input(scheduler, x, t):
    # Euler-type step indices start here, as in a real loop.
    if hasattr(scheduler, "scale_model_input"):
        scheduler.scale_model_input(x, t)


def _same(a, b) -> bool:
    """Deep equality of scheduler state (tensors, arrays, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(((a == b) | a.isnan() & b.isnan()).all())
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("scheduler,kwargs,steps,set_kwargs", CASES)
def test_kernel_reproduces_scheduler_step(scheduler, kwargs, steps, set_kwargs):
    gen = torch.Generator().manual_seed(0)
    x = _start(scheduler, steps, set_kwargs, gen)
    kernel = reverse_kernel(scheduler, kwargs.get("eta", 0.0))
    checked_noise = 0
    for t in scheduler.timesteps:
        _scale_input(scheduler, x, t)
        out = torch.randn(SHAPE, generator=gen)
        mean, std, _ = kernel(t, x, out)
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        prev = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(seed), **kwargs).prev_sample
        z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        torch.testing.assert_close(mean + std * z, prev, rtol=1e-5, atol=1e-5)
        checked_noise += std > 0
        x = prev
    # DPM2 ancestral's first stages add no noise.
    n = len(scheduler.timesteps)
    assert checked_noise >= (n // 2 if isinstance(scheduler, KDPM2AncestralDiscreteScheduler) else n - 1)


def _seeded_step(scheduler, out, t, x, kwargs):
    """The scheduler's step with the noise z of seed 7."""
    return scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7), **kwargs).prev_sample


DPM = (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler)
DPM_CASES = [case for case in CASES if isinstance(case.values[0], DPM)]
# One-step kernels have one reading; a DPM-Solver step is read here as "guided" (m_u on the stored history) and "own"
# (m_u on u's own history): both take m_u - m_n_i from each branch's own outputs.
HISTORY_CASES = [pytest.param(*case.values, None, id=case.id) for case in CASES if case not in DPM_CASES] + [
    pytest.param(*case.values, reading, id=f"{case.id}-{reading}") for case in DPM_CASES
    for reading in ("guided", "own")]


@pytest.mark.parametrize("scheduler,kwargs,steps,set_kwargs,reading", HISTORY_CASES)
def test_branch_moments_reproduce_the_step_of_every_branch(scheduler, kwargs, steps, set_kwargs, reading):
    """mean_u + std z is the scheduler's own step from out_u (with its stored past, or for "own" in u's own chain);
    diff_i is the difference of the steps that the chains of u and n_i would take, each a scheduler fed only its own
    branch's outputs at the chain's x_t of every step.

    The chain itself is guided (its stored history is no branch's); reading the moments changes no state.
    """
    gen = torch.Generator().manual_seed(1)
    x = _start(scheduler, steps, set_kwargs, gen)
    kernel = reverse_kernel(scheduler, kwargs.get("eta", 0.0))
    if reading:
        kernel = DPMSolverKernel(scheduler, reading)
    own = [copy.deepcopy(scheduler) for _ in range(3)]
    for t in scheduler.timesteps:
        for s in (scheduler, *own):
            _scale_input(s, x, t)
        outs = torch.randn((3,) + SHAPE, generator=gen)
        levels = kernel.noise_levels(t)  # the sampler's first read: it may initialise the step index
        state = copy.deepcopy(vars(scheduler))
        moments = kernel.branch_moments(t, x, outs)
        mean_u, diff, std = moments.mean_u, moments.diff, moments.std
        assert (std, moments.forward_std) == kernel(t, x, outs[0])[1:]
        assert (moments.sigma, moments.sigma_next) == levels == kernel.noise_levels(t)
        assert _same(vars(scheduler), state)
        unguided = _seeded_step(copy.deepcopy(scheduler), outs[0], t, x, kwargs)
        steps_ = [_seeded_step(s, out, t, x, kwargs) for s, out in zip(own, outs, strict=True)]
        z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7), dtype=outs.dtype)
        torch.testing.assert_close(mean_u + std * z, steps_[0] if reading == "own" else unguided, rtol=1e-5,
                                   atol=1e-5)
        for i in range(2):
            torch.testing.assert_close(mean_u - diff[i] + std * z, steps_[1 + i] if reading == "own" else
                                       unguided - (steps_[0] - steps_[1 + i]),
                                       rtol=1e-5, atol=1e-5)
        # The tracker's statistics at a drawn x_prev, whichever way the kernel computes them, against float64 means.
        x_prev = unguided + 0.1 * torch.randn(SHAPE, generator=gen)
        r, d = (x_prev - mean_u).double().flatten(1), diff.double().flatten(2)
        rd, dd = moments.statistics(x_prev, gram=True)
        # Residuals are float32 differences of O(|x|) terms: their rounding grows with the chain's magnitude.
        atol = 1e-4 + 1e-6 * float(x_prev.abs().max()) * float(d.abs().sum(-1).max())
        torch.testing.assert_close(rd.double(), torch.einsum("kbd,bd->bk", d, r), rtol=1e-4, atol=atol)
        torch.testing.assert_close(dd.double(), torch.einsum("kbd,jbd->bkj", d, d), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moments.statistics(x_prev)[1], torch.diagonal(dd, dim1=-2, dim2=-1))
        # A negative-prompt push: the chain's stored outputs are no branch's.
        x = _seeded_step(scheduler, outs[0] - 0.5 * (outs[1] - outs[0]), t, x, kwargs)


def _first_order(scheduler, start, end, x, d, noise=0.0):
    """The scheduler's own first-order update from x, its start-th sample, to its end-th noise level."""
    s = copy.deepcopy(scheduler)
    s.sigmas = s.sigmas.clone()
    s.sigmas[end - 1], s._step_index = s.sigmas[start], end - 1  # the update reads sigmas[i], sigmas[i + 1]
    return s.dpm_solver_first_order_update(d, sample=x, noise=noise)


@pytest.mark.parametrize("reading", ["data", "first"])
@pytest.mark.parametrize("scheduler,kwargs,steps,set_kwargs", DPM_CASES)
def test_first_order_readings_of_a_solver_step(scheduler, kwargs, steps, set_kwargs, reading):
    """"data": diff_i is the first-order update's difference between u's and n_i's outputs at the sample the step
    starts from (a singlestep stage's first one, where the tracker reads p: `restart`), and x_prev - mean_u is the
    guided step's push there plus the step's noise std z: mean_u + std z = x_prev - (first(D_g) - first(D_u)).
    "first": both are the first-order step from x, with its own noise."""
    gen = torch.Generator().manual_seed(2)
    x = _start(scheduler, steps, set_kwargs, gen)
    kernel = DPMSolverKernel(scheduler, reading)
    singlestep = isinstance(scheduler, DPMSolverSinglestepScheduler)
    for i, t in enumerate(scheduler.timesteps):
        outs = torch.randn((3,) + SHAPE, generator=gen)
        guided = outs[0] - 0.5 * (outs[1] - outs[0])
        moments = kernel.branch_moments(t, x, outs)
        std = kernel(t, x, outs[0])[1]
        converted = [scheduler.convert_model_output(o, sample=x) for o in (*outs, guided)]
        # Without thresholding the conversion is affine: the branches' difference converts without x, whose size
        # would otherwise drown it.
        gaps = ([converted[0] - converted[k] for k in (1, 2)] if scheduler.config.thresholding else
                [scheduler.convert_model_output(outs[0] - o, sample=torch.zeros_like(x)) for o in outs[1:]])
        restart = reading == "data" and singlestep and scheduler.order_list[i] > 1
        assert moments.restart == restart
        if not restart:
            start = (i, x, converted, gaps)
        j, x_start, d, gap = start
        first = [_first_order(scheduler, j, i + 1, x_start, dk) for dk in d]
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[j])
        assert moments.sigma == pytest.approx(float(sigma / alpha), rel=1e-6)
        expected_diff = [_first_order(scheduler, j, i + 1, torch.zeros_like(x), g) for g in gap]
        torch.testing.assert_close(moments.diff, torch.stack(expected_diff), rtol=1e-5, atol=1e-5)
        x_prev = _seeded_step(scheduler, guided, t, x, kwargs)
        z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7), dtype=outs.dtype)
        if reading == "data":
            assert moments.std == std
            expected = x_prev - (first[3] - first[0])
        else:
            expected = _first_order(scheduler, i, i + 1, x, d[0], z)
        torch.testing.assert_close(moments.mean_u + moments.std * z, expected, rtol=1e-5, atol=1e-5)
        x = x_prev


def test_multistep_branch_means_need_every_step_of_their_chain():
    """A branch's mean on its own history reads that branch's earlier outputs: other branches or a skipped step raise,
    never mix."""
    scheduler = DPMSolverMultistepScheduler(algorithm_type=SDE)
    scheduler.set_timesteps(10)
    kernel, x = DPMSolverKernel(scheduler, "guided"), torch.randn(SHAPE)
    t0, t1, t2 = scheduler.timesteps[:3]
    kernel.branch_moments(t0, x, torch.randn((2,) + SHAPE))
    x = scheduler.step(torch.randn(SHAPE), t0, x).prev_sample
    with pytest.raises(ConfigError, match="same branches"):
        kernel.branch_moments(t1, x, torch.randn((3,) + SHAPE))
    x = scheduler.step(torch.randn(SHAPE), t1, x).prev_sample
    with pytest.raises(ConfigError, match="every step"):
        kernel.branch_moments(t2, x, torch.randn((2,) + SHAPE))
    # A new chain starts at first order: the kernel reads it afresh.
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps[:3]:
        kernel.branch_moments(t, x, torch.randn((3,) + SHAPE))
        x = scheduler.step(torch.randn(SHAPE), t, x).prev_sample


def test_a_singlestep_stage_needs_its_first_step():
    """"data" reads a singlestep stage's later steps at the stage's first sample: a kernel that did not see it (or
    saw other branches there) raises."""
    scheduler = DPMSolverSinglestepScheduler(algorithm_type=SDE)
    scheduler.set_timesteps(10)
    kernel, x = reverse_kernel(scheduler), torch.randn(SHAPE)
    t0, t1 = scheduler.timesteps[:2]
    x = scheduler.step(torch.randn(SHAPE), t0, x).prev_sample
    with pytest.raises(ConfigError, match="stage's first sample"):
        kernel.branch_moments(t1, x, torch.randn((2,) + SHAPE))
    scheduler.set_timesteps(10)
    kernel.branch_moments(t0, x, torch.randn((2,) + SHAPE))
    x = scheduler.step(torch.randn(SHAPE), t0, x).prev_sample
    with pytest.raises(ConfigError, match="same branches"):
        kernel.branch_moments(t1, x, torch.randn((3,) + SHAPE))
    assert kernel.branch_moments(t1, x, torch.randn((2,) + SHAPE)).restart


def test_tracked_posterior_follows_the_exact_one_under_dpm_2m_sde():
    """The "data" reading keeps the tracked log-odds near the exact ones on the mixture and no chain blows up.

    posterior_logit_mae at 25 steps: 0.25 ("data"), 0.29 ("guided"), 0.27 ("own"), 0.33 ("first"); the readings
    whose residual holds the solver's echo of a push blow chains up: sliced W2 5x the exact rule's ("own"), 1.5x
    ("first"; 17x at 100 steps)."""
    bench = GMMBench(default_mixture_config(), 25, 2000, 0, scheduler="dpmpp-2m-sde")
    (tracked, _), (exact, _) = (bench.run(*next(bench.configs([m]))) for m in ("dng", "dng-oracle"))
    assert tracked["posterior_logit_mae"] < 0.27
    assert tracked["sliced_w2"] < 1.2 * exact["sliced_w2"]


def test_affine_difference_is_exact_where_means_cancel():
    """The affine path gets mean_u - mean_n from the outputs' difference, not from two nearly equal means."""
    scheduler = DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    kernel, t = reverse_kernel(scheduler), scheduler.timesteps[10]
    gen = torch.Generator().manual_seed(0)
    x = 50 * torch.randn(SHAPE, generator=gen)
    out_u = torch.randn(SHAPE, generator=gen)
    outs = torch.stack([out_u, out_u + 1e-4 * torch.randn(SHAPE, generator=gen)])
    exact, _, _ = kernel(t, x.double(), outs.double())
    moments = kernel.branch_moments(t, x, outs)
    means, _, _ = kernel(t, x, outs)
    error = (moments.diff[0].double() - (exact[0] - exact[1])).abs().max()
    assert error < 1e-6 * (exact[0] - exact[1]).abs().max()
    assert ((means[0] - means[1]).double() - (exact[0] - exact[1])).abs().max() > 100 * error
    # The statistics the tracker reads stay exact too: |d|^2 to float32 precision, where the means' difference
    # would have lost it.
    x_prev = exact[0].float() + 0.01 * torch.randn(SHAPE, generator=gen)
    rd, dd = moments.statistics(x_prev)
    d = (exact[0] - exact[1]).flatten(1)
    torch.testing.assert_close(dd[:, 0].double(), (d * d).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(rd[:, 0].double(), ((x_prev.double() - exact[0]).flatten(1) * d).sum(-1),
                               rtol=1e-3, atol=1e-9)


def test_kernel_accepts_stacked_branches():
    scheduler = DDPMScheduler(thresholding=True)
    scheduler.set_timesteps(10)
    kernel = reverse_kernel(scheduler)
    x = torch.randn(SHAPE)
    outs = torch.randn((3,) + SHAPE)
    t = scheduler.timesteps[2]
    stacked, _, _ = kernel(t, x, outs)
    for i in range(3):
        torch.testing.assert_close(stacked[i], kernel(t, x, outs[i])[0])


def test_kernel_upcasts_half_precision():
    scheduler = DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(10)
    mean, _, _ = reverse_kernel(scheduler)(scheduler.timesteps[0], torch.randn(SHAPE).half(), torch.randn(SHAPE).half())
    assert mean.dtype == torch.float32


def test_stored_half_precision_outputs_are_read_in_float32():
    scheduler = DPMSolverMultistepScheduler(algorithm_type=SDE)
    scheduler.set_timesteps(10)
    kernel, x = reverse_kernel(scheduler), torch.randn(SHAPE).half()
    for t in scheduler.timesteps[:2]:
        moments = kernel.branch_moments(t, x, torch.randn((2,) + SHAPE).half())
        x = scheduler.step(torch.randn(SHAPE).half(), t, x).prev_sample
    assert scheduler.model_outputs[-1].dtype == torch.float16
    # The step's mean reads the stored guided output of the step once taken.
    assert moments.mean_u.dtype == moments.diff.dtype == moments.statistics(x)[0].dtype == torch.float32


@pytest.mark.parametrize(
    "scheduler,eta,switch",
    [
        (DDIMScheduler(), 0.0, "pass eta > 0"),
        (TCDScheduler(), 0.0, "pass eta > 0"),
        (EulerDiscreteScheduler(), 0.0, "EulerAncestralDiscreteScheduler.from_config(scheduler.config)"),
        (HeunDiscreteScheduler(), 0.0, "EulerAncestralDiscreteScheduler.from_config(scheduler.config)"),
        (PNDMScheduler(), 0.0, "EulerAncestralDiscreteScheduler.from_config(scheduler.config)"),
        (KDPM2DiscreteScheduler(), 0.0, "KDPM2AncestralDiscreteScheduler.from_config(scheduler.config)"),
        (DPMSolverMultistepScheduler(), 0.0,
         "DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type='sde-dpmsolver++')"),
        (UniPCMultistepScheduler(), 0.0,
         "DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type='sde-dpmsolver++')"),
        (DEISMultistepScheduler(), 0.0,
         "DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type='sde-dpmsolver++')"),
        (DPMSolverSinglestepScheduler(), 0.0,
         "DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type='sde-dpmsolver++')"),
        (EDMDPMSolverMultistepScheduler(solver_order=3), 0.0, "algorithm_type='sde-dpmsolver++', solver_order=2"),
        (EDMDPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=3), 0.0, "solver_order=2"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
         0.0, "algorithm_type='sde-dpmsolver++'"),
        (FlowMatchEulerDiscreteScheduler(), 0.0,
         "LTXEulerAncestralRFScheduler.from_config(scheduler.config, eta=1.0)"),
        (LTXEulerAncestralRFScheduler(eta=0.0), 0.0,
         "LTXEulerAncestralRFScheduler.from_config(scheduler.config, eta=1.0)"),
        (DDPMScheduler(variance_type="learned_range"), 0.0, "EulerAncestralDiscreteScheduler"),
    ],
    ids=["ddim-eta0", "tcd-gamma0", "euler", "heun", "pndm", "kdpm2", "dpm-multistep", "unipc", "deis",
         "dpm-singlestep", "edm-dpm", "edm-sde-order3", "sde-dpmsolver-order3", "flow-euler", "ltx-eta0",
         "ddpm-learned"],
)
def test_deterministic_or_unknown_schedulers_are_refused_with_the_switch(scheduler, eta, switch):
    with pytest.raises(ConfigError) as err:
        reverse_kernel(scheduler, eta)
    message = str(err.value)
    assert type(scheduler).__name__ in message and switch in message


def test_forward_std_is_the_fixed_large_variance_of_ddpm():
    small, large = DDPMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    for s in (small, large):
        s.set_timesteps(25)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in small.timesteps[:-1]:
        _, std_small, forward_small = reverse_kernel(small)(t, x, out)
        _, std_large, forward_large = reverse_kernel(large)(t, x, out)
        assert forward_small == pytest.approx(std_large, rel=1e-6) == forward_large
        assert std_small < std_large


def test_noise_levels_agree_across_schedulers_on_one_schedule():
    """DDPM, DDIM and Euler-a read the same sigma = sqrt((1 - abar) / abar) at the same timestep."""
    config = DDPMScheduler(beta_schedule="scaled_linear", timestep_spacing="leading").config
    levels = {}
    for cls, eta in ((DDPMScheduler, 0.0), (DDIMScheduler, 1.0), (EulerAncestralDiscreteScheduler, 0.0)):
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(10)
        kernel = reverse_kernel(scheduler, eta)
        t = scheduler.timesteps[3]
        scheduler.scale_model_input(torch.zeros(1), t)
        levels[cls.__name__] = (int(t), kernel.noise_levels(t)[0])
    (t0, sigma), *others = levels.values()
    abar = float(DDPMScheduler.from_config(config).alphas_cumprod[t0])
    assert sigma == pytest.approx(((1 - abar) / abar) ** 0.5, rel=1e-5)
    for t, s in others:
        assert t == t0 and s == pytest.approx(sigma, rel=1e-4)


def _walk(scheduler, eta=0.0, steps=10, **set_kwargs):
    """(t, noise_levels, std) of every step of a chain, read before each step as the sampler reads them."""
    kernel = reverse_kernel(scheduler, eta)
    x = _start(scheduler, steps, set_kwargs, torch.Generator().manual_seed(0))
    walk = []
    for t in scheduler.timesteps:
        _scale_input(scheduler, x, t)
        walk.append((float(t), kernel.noise_levels(t), kernel(t, x, torch.zeros_like(x))[1]))
        kwargs = step_kwargs(scheduler, eta, torch.Generator().manual_seed(1))
        x = scheduler.step(torch.zeros_like(x), t, x, **kwargs).prev_sample
    return walk


# A plain dict: from_config drops a scheduler config's defaulted keys (`_use_default_values`), so each class would
# fill in its own default betas.
VP = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")


@pytest.mark.parametrize("cls,settings,eta", [
    (DDPMScheduler, {}, 0.0),
    (DDIMScheduler, {}, 1.0),
    (EulerAncestralDiscreteScheduler, {}, 0.0),
    (DPMSolverMultistepScheduler, {"algorithm_type": SDE}, 0.0),
    (DPMSolverSinglestepScheduler, {"algorithm_type": SDE}, 0.0),
    (TCDScheduler, {}, 0.3),
    (LCMScheduler, {}, 0.0),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_noise_levels_are_the_training_schedules_sigma_at_the_timestep(cls, settings, eta):
    """On one training schedule every scheduler reads sigma = sqrt((1 - abar_t) / abar_t) at its timestep t, and
    a step ends at the level the next one starts from."""
    abar = DDPMScheduler.from_config(VP).alphas_cumprod.double()
    walk = _walk(cls.from_config(VP, **settings), eta)
    for t, (sigma, _), _ in walk:
        assert sigma == pytest.approx(float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()), rel=1e-4)
    for (_, (_, after), _), (_, (before, _), _) in itertools.pairwise(walk):
        assert after == pytest.approx(before, rel=1e-4)


def _flow_sigma(t):
    return t / (1000 - t) if t < 1000 else math.inf


@pytest.mark.parametrize("scheduler,sigma_of_t", [
    (EDMDPMSolverMultistepScheduler(algorithm_type=SDE), lambda t: math.exp(4 * t)),  # t = log(sigma) / 4
    (CMStochasticIterativeScheduler(), lambda t: math.exp(t / 250)),  # t = 250 log(sigma)
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0), _flow_sigma),  # t = 1000 s
    (LTXEulerAncestralRFScheduler(), _flow_sigma),
], ids=["edm", "cm", "flow", "ltx"])
def test_noise_levels_of_other_parametrisations(scheduler, sigma_of_t):
    """EDM and consistency models are already in sigma; flow matching's x = (1 - s) x0 + s n is at s / (1 - s)."""
    walk = _walk(scheduler)
    for t, (sigma, _), _ in walk:
        assert sigma == pytest.approx(sigma_of_t(t), rel=1e-4)
    for (_, (_, after), _), (_, (before, _), _) in itertools.pairwise(walk):
        assert after == pytest.approx(before, rel=1e-4)


def test_dpm2_ancestral_pairs_tile_the_schedule():
    """The noiseless first stage ends at the midpoint, which is the next sigma; the noisy second spans the pair."""
    walk = _walk(KDPM2AncestralDiscreteScheduler(beta_schedule="scaled_linear"))
    first, second = walk[0::2], walk[1::2]
    assert all(std == 0 for *_, std in first) and all(std > 0 for *_, std in second)
    for (_, (sigma, midpoint), _), (_, (start, end), _) in zip(first[:-1], second, strict=True):
        assert start == sigma and midpoint == pytest.approx(end, rel=1e-4)
    for (_, (_, end), _), (_, (sigma, _), _) in zip(second, first[1:], strict=True):
        assert end == pytest.approx(sigma, rel=1e-6)


def _model(x, t):
    """Tiny deterministic model: branches stacked along the batch axis differ by a constant."""
    return 0.3 * x + 0.1 * torch.arange(x.shape[0]).view(-1, *[1] * (x.dim() - 1))


def _e2e(scheduler, eta, name, **set_kwargs):
    return pytest.param(scheduler, eta, set_kwargs, id=name)


E2E = [
    _e2e(KDPM2AncestralDiscreteScheduler(), 0.0, "kdpm2-a"),
    _e2e(DPMSolverMultistepScheduler(algorithm_type=SDE, use_karras_sigmas=True), 0.0, "dpm2m-sde-karras"),
    _e2e(DPMSolverMultistepScheduler(algorithm_type=SDE, solver_order=3, final_sigmas_type="sigma_min"), 0.0,
         "dpm3m-sde"),
    _e2e(DPMSolverMultistepScheduler(algorithm_type=SDE, thresholding=True), 0.0, "dpm2m-sde-threshold"),
    _e2e(DPMSolverSinglestepScheduler(algorithm_type=SDE, solver_order=3), 0.0, "dpm-single3-sde"),
    _e2e(EDMDPMSolverMultistepScheduler(algorithm_type=SDE), 0.0, "edm-sde"),
    _e2e(TCDScheduler(), 0.3, "tcd"),
    _e2e(LCMScheduler(), 0.0, "lcm"),
    _e2e(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0), 0.0, "flow"),
    _e2e(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, use_dynamic_shifting=True), 0.0, "flow-dynamic",
         mu=0.8),
    _e2e(LTXEulerAncestralRFScheduler(), 0.0, "ltx"),
    _e2e(CMStochasticIterativeScheduler(), 0.0, "cm"),
]


@pytest.mark.parametrize("scheduler,eta,set_kwargs", E2E)
def test_scale_zero_dng_samples_exactly_as_unguided(scheduler, eta, set_kwargs):
    """The tracker reads every step without touching the scheduler's history: at scale 0 the samples are the
    unguided ones bit for bit, and each noisy step's llr is finite."""
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(guidance):
        return sample(_model, copy.deepcopy(scheduler), guidance, noise=noise, num_inference_steps=8,
                      num_negatives=1 if guidance else 0, eta=eta, generator=torch.Generator().manual_seed(3),
                      progress=False, return_trace=True, set_timesteps_kwargs=set_kwargs)

    guided = run(DynamicNegativeGuidance(lam0=0.0, prior=0.1))
    assert torch.equal(guided.samples, run(None).samples)
    noisy = torch.tensor([std > MIN_TRACKING_STD for *_, std in _walk(copy.deepcopy(scheduler), eta, 8, **set_kwargs)])
    llr = guided.trace.llr
    assert noisy.sum() >= 3
    assert torch.isfinite(llr[noisy]).all() and llr[~noisy].isnan().all()
