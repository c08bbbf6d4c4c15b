"""Each kernel reproduces its scheduler's own step: mean + std * z with the step's noise z."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from dng.errors import ConfigError
from dng.kernels import reverse_kernel

SHAPE = (3, 2, 4, 4)


def _schedulers():
    yield "ddpm-small", DDPMScheduler(variance_type="fixed_small", clip_sample=False), {}
    yield "ddpm-large", DDPMScheduler(variance_type="fixed_large", clip_sample=False), {}
    yield "ddpm-small-log", DDPMScheduler(variance_type="fixed_small_log"), {}
    yield "ddpm-clip", DDPMScheduler(clip_sample=True, clip_sample_range=0.5), {}
    yield "ddpm-threshold", DDPMScheduler(thresholding=True, sample_max_value=0.8), {}
    yield "ddpm-v", DDPMScheduler(prediction_type="v_prediction", clip_sample=False), {}
    yield "ddim-eta1", DDIMScheduler(clip_sample=False), {"eta": 1.0}
    yield "ddim-eta03-clip", DDIMScheduler(clip_sample=True), {"eta": 0.3}
    yield "ddim-v-trailing", DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"), {"eta": 0.7}
    yield "euler-a", EulerAncestralDiscreteScheduler(), {}
    yield "euler-a-v", EulerAncestralDiscreteScheduler(prediction_type="v_prediction"), {}


@pytest.mark.parametrize("name,scheduler,kwargs", list(_schedulers()), ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_reproduces_scheduler_step(name, scheduler, kwargs):
    scheduler.set_timesteps(20)
    kernel = reverse_kernel(scheduler, kwargs.get("eta", 0.0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    checked_noise = 0
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)  # Euler's step index starts here, as in a real loop
        out = torch.randn(SHAPE, generator=gen)
        mean, std, _ = kernel(t, x, out)
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        prev = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(seed), **kwargs).prev_sample
        z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        torch.testing.assert_close(mean + std * z, prev, rtol=1e-5, atol=1e-5)
        checked_noise += std > 0
        x = prev
    assert checked_noise >= len(scheduler.timesteps) - 1


@pytest.mark.parametrize("name,scheduler,kwargs", list(_schedulers()), ids=lambda v: v if isinstance(v, str) else "")
def test_branch_moments_reproduce_the_step_of_every_branch(name, scheduler, kwargs):
    """mean_u + std z and mean_u - diff_i + std z are the scheduler's own steps from out_u and out_n_i."""
    scheduler.set_timesteps(20)
    kernel = reverse_kernel(scheduler, kwargs.get("eta", 0.0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        outs = torch.randn((3,) + SHAPE, generator=gen)
        moments = kernel.branch_moments(t, x, outs)
        mean_u, diff, std = moments.mean_u, moments.diff, moments.std
        assert (std, moments.forward_std) == kernel(t, x, outs[0])[1:]
        index = scheduler.step_index if hasattr(scheduler, "_step_index") else None
        steps = []
        for out in outs:
            if index is not None:
                scheduler._step_index = index  # each branch steps from the same x_t
            steps.append(scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7), **kwargs).prev_sample)
        z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7), dtype=outs.dtype)
        torch.testing.assert_close(mean_u + std * z, steps[0], rtol=1e-5, atol=1e-5)
        for i in range(2):
            torch.testing.assert_close(mean_u - diff[i] + std * z, steps[1 + i], rtol=1e-5, atol=1e-5)
        # The tracker's statistics at a drawn x_prev, whichever way the kernel computes them, against float64 means.
        x_prev = steps[0] + 0.1 * torch.randn(SHAPE, generator=gen)
        r, d = (x_prev - mean_u).double().flatten(1), diff.double().flatten(2)
        rd, dd = moments.statistics(x_prev, gram=True)
        torch.testing.assert_close(rd.double(), torch.einsum("kbd,bd->bk", d, r), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dd.double(), torch.einsum("kbd,jbd->bkj", d, d), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moments.statistics(x_prev)[1], torch.diagonal(dd, dim1=-2, dim2=-1))
        x = steps[0]


def test_affine_difference_is_exact_where_means_cancel():
    """The affine path gets mean_u - mean_n from the outputs' difference, not from two nearly equal means."""
    scheduler = DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    kernel, t = reverse_kernel(scheduler), scheduler.timesteps[10]
    x = 50 * torch.randn(SHAPE)
    out_u = torch.randn(SHAPE)
    outs = torch.stack([out_u, out_u + 1e-4 * torch.randn(SHAPE)])
    exact, _, _ = kernel(t, x.double(), outs.double())
    moments = kernel.branch_moments(t, x, outs)
    means, _, _ = kernel(t, x, outs)
    error = (moments.diff[0].double() - (exact[0] - exact[1])).abs().max()
    assert error < 1e-6 * (exact[0] - exact[1]).abs().max()
    assert ((means[0] - means[1]).double() - (exact[0] - exact[1])).abs().max() > 100 * error
    # The statistics the tracker reads stay exact too: |d|^2 to float32 precision, where the means' difference
    # would have lost it.
    x_prev = exact[0].float() + 0.01 * torch.randn(SHAPE)
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


@pytest.mark.parametrize(
    "scheduler,eta",
    [
        (DDIMScheduler(), 0.0),
        (EulerDiscreteScheduler(), 0.0),
        (DPMSolverMultistepScheduler(), 0.0),
        (DDPMScheduler(variance_type="learned_range"), 0.0),
    ],
    ids=["ddim-eta0", "euler", "dpm-multistep", "ddpm-learned"],
)
def test_deterministic_or_unknown_schedulers_are_refused(scheduler, eta):
    with pytest.raises(ConfigError) as err:
        reverse_kernel(scheduler, eta)
    message = str(err.value)
    assert type(scheduler).__name__ in message
    assert "EulerAncestralDiscreteScheduler" in message


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
