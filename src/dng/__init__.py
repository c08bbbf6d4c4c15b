"""Dynamic Negative Guidance for diffusion models.

The public API is importable from `dng` itself. Each name loads its module on first use, so that `import dng` and
the `dng` command do not pay for torch, diffusers and transformers until they are needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "dng.errors": ["ConfigError", "NonFiniteError"],
    "dng.config": ["DNGConfig", "PRESETS"],
    "dng.guidance": ["DynamicNegativeGuidance", "Guidance", "NegativePrompt", "SafeLatentDiffusion"],
    "dng.posterior": ["ReadPosterior", "TrackedPosterior"],
    "dng.sampler": ["STOP", "SampleOutput", "Trace", "sample"],
    "dng.schedulers": ["reverse_kernel", "stochastic"],
    "dng.pipelines": ["StableDiffusionDNGPipeline", "StableDiffusionXLDNGPipeline"],
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'dng' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
