"""Diffusers pipelines with Dynamic Negative Guidance: Stable Diffusion 1.x / 2.x and SDXL."""

from dng.pipelines.stable_diffusion import StableDiffusionDNGPipeline, StableDiffusionDNGPipelineOutput
from dng.pipelines.stable_diffusion_xl import StableDiffusionXLDNGPipeline, StableDiffusionXLDNGPipelineOutput

__all__ = [
    "StableDiffusionDNGPipeline",
    "StableDiffusionDNGPipelineOutput",
    "StableDiffusionXLDNGPipeline",
    "StableDiffusionXLDNGPipelineOutput",
]
