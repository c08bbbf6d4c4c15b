"""verify_kernel passes on every supported configuration, leaves the scheduler as it was, and catches a changed step."""

import copy

import diffusers
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers.utils.torch_utils import randn_tensor
from test_kernels import CASES, _same

from dng.errors import KernelMismatchError
from dng.kernels import verify_kernel
from dng.schedulers import reverse_kernel

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (4, 2, 8, 8)


def _verify(scheduler, eta=0.0, **kwargs):
    verify_kernel(scheduler, lambda s: reverse_kernel(s, eta), eta, SHAPE, **kwargs)


@pytest.mark.parametrize("scheduler,kwargs,steps,set_kwargs", CASES)
def test_verify_passes_and_leaves_the_scheduler_and_global_rng_as_they_were(scheduler, kwargs, steps, set_kwargs):
    scheduler = copy.deepcopy(scheduler)  # CASES' instances are shared with test_kernels, which steps them
    scheduler.set_timesteps(steps, **set_kwargs)
    state, rng = copy.deepcopy(vars(scheduler)), torch.get_rng_state()
    _verify(scheduler, kwargs.get("eta", 0.0))
    assert _same(vars(scheduler), state)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_nan_the_step_itself_gives_is_agreement():
    """Exponential sigmas with a sigma_min final repeat the last sigma: diffusers' own last step is NaN there."""
    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                            use_exponential_sigmas=True, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(20)
    gen = torch.Generator().manual_seed(0)
    walk, x = copy.deepcopy(scheduler), torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    for t in walk.timesteps:
        x = walk.step(torch.randn(SHAPE, generator=gen), t, x, generator=gen).prev_sample
    assert x.isnan().all()
    _verify(scheduler, steps=20, device=torch.device("cpu"))


def _mismatch(scheduler, step):
    scheduler.set_timesteps(10)
    with pytest.raises(KernelMismatchError) as err:
        _verify(scheduler)
    message = str(err.value)
    assert type(scheduler).__name__ in message and diffusers.__version__ in message
    assert f"at step {step}" in message and 'pip install "diffusers==0.42.*"' in message


def test_a_changed_mean_is_caught(monkeypatch):
    """Euler a's step reading its model output 1% larger: same noise, shifted mean."""
    step = EulerAncestralDiscreteScheduler.step
    monkeypatch.setattr(EulerAncestralDiscreteScheduler, "step",
                        lambda self, out, *args, **kwargs: step(self, 1.01 * out, *args, **kwargs))
    _mismatch(EulerAncestralDiscreteScheduler(), 0)


def test_a_changed_noise_std_is_caught(monkeypatch):
    """DDPM's step adding its noise with a 1% larger std, as if the variance it computes inline had changed (the
    kernel shares `_get_variance` itself, so a change there would follow into both)."""
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: 1.01 * randn_tensor(*args, **kwargs))
    _mismatch(DDPMScheduler(clip_sample=False), 0)
