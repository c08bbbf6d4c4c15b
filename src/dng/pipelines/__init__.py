"""Diffusers pipelines with Dynamic Negative Guidance: Stable Diffusion 1.x / 2.x, SDXL, SD3 and Flux."""

from dng.pipelines.calibrate import calibrate_pipeline
from dng.pipelines.flux import FluxDNGPipeline, FluxDNGPipelineOutput
from dng.pipelines.stable_diffusion import StableDiffusionDNGPipeline, StableDiffusionDNGPipelineOutput
from dng.pipelines.stable_diffusion_3 import StableDiffusion3DNGPipeline, StableDiffusion3DNGPipelineOutput
from dng.pipelines.stable_diffusion_xl import StableDiffusionXLDNGPipeline, StableDiffusionXLDNGPipelineOutput

__all__ = [
    "calibrate_pipeline",
    "FluxDNGPipeline",
    "FluxDNGPipelineOutput",
    "StableDiffusion3DNGPipeline",
    "StableDiffusion3DNGPipelineOutput",
    "StableDiffusionDNGPipeline",
    "StableDiffusionDNGPipelineOutput",
    "StableDiffusionXLDNGPipeline",
    "StableDiffusionXLDNGPipelineOutput",
]
