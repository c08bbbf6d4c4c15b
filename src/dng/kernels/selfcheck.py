"""A cheap check, before sampling, that a reverse kernel still reproduces its scheduler's step.

The kernels read private diffusers internals: a diffusers release that changes a step would otherwise bias the
tracked posterior silently.
"""

from __future__ import annotations

import copy
import inspect

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from dng.errors import KernelMismatchError
from dng.kernels.base import stepped_timesteps

TESTED_DIFFUSERS = "0.42"
# Relative to the largest of |x_t| and |x_prev| (and at least 1): the kernel and the step sum the same O(|x|) terms,
# sometimes in a different order, so in float32 they differ by a few ulps of the largest term, which the result's own
# size may not show where terms cancel. Over every configuration of tests/test_kernels.py, whole chains, the largest
# difference was 1.1e-7 of it (one ulp). A 1e-2 relative change in a mean coefficient or in the noise std shows
# wherever that term is over 1% of the sample, as at the first, noisiest steps; the 1000x margin leaves room for other
# devices' fused arithmetic.
TOLERANCE = 1e-4


def verify_kernel(scheduler, make_kernel, eta: float, sample_shape, steps: int = 3, device=None) -> None:
    """Raise KernelMismatchError unless `make_kernel(scheduler)` reproduces the scheduler's first `steps` steps.

    Call it after `set_timesteps` and before the first step. It walks a deep copy from a probe x_T (batch 1 of
    `sample_shape[1:]`, float32, on `device`) with probe model outputs, so `scheduler` keeps its state. `eta` is what
    the sampler gives a step that takes one (DDIM's eta, TCD's gamma). Walking several steps also checks what a
    multistep solver's higher-order steps read from its history.
    """
    scheduler = copy.deepcopy(scheduler)
    kernel = make_kernel(scheduler)
    kwargs = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    shape = (1, *sample_shape[1:])
    probe = torch.Generator().manual_seed(0)  # never the global generator: the caller's seeds stay reproducible
    x = torch.randn(shape, generator=probe).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(stepped_timesteps(scheduler)[:steps]):
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # Euler-type steps start their step index here
        out = torch.randn(shape, generator=probe).to(device)
        mean, std, _ = kernel(t, x, out)
        seed = 1 + i
        prev = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(seed), **kwargs).prev_sample
        z = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), device=out.device, dtype=out.dtype)
        _compare(scheduler, i, t, x, mean + std * z, prev)
        x = prev


def _compare(scheduler, i: int, t, x, predicted, prev) -> None:
    # NaN where the step itself gives NaN (a repeated final sigma) is agreement, not drift.
    both_nan = predicted.isnan() & prev.isnan()
    error = float((predicted - prev).abs().masked_fill(both_nan, 0).max())
    scale = max(1.0, float(x.abs().max()), float(prev.nan_to_num().abs().max()))
    if error <= TOLERANCE * scale:  # False for a NaN error
        return
    name = type(scheduler).__name__
    raise KernelMismatchError(
        f"{name}.step under diffusers {diffusers.__version__} no longer matches dng's reverse kernel: at step {i} "
        f"(t={float(t):g}) they differ by {error:.3g} on a probe sample of magnitude {scale:.3g} (tolerance "
        f"{TOLERANCE:g} of it), so guidance would track a biased posterior. This dng was tested with diffusers "
        f'{TESTED_DIFFUSERS}.x: install it (pip install "diffusers=={TESTED_DIFFUSERS}.*"), or report the mismatch '
        f"to dng with {name}'s config and the diffusers version."
    )
