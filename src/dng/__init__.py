"""Dynamic Negative Guidance for diffusion models."""

__version__ = "0.1.0"
