"""The error types for bad input: their messages say what to change."""


class ConfigError(ValueError):
    """Invalid arguments, configuration or files given by the user."""


class NonFiniteError(ConfigError):
    """A model output, a tracked posterior or a sample that is NaN or infinite: it names where, and the likely
    cause (NaN weights, a scale too large for the model's range)."""


class KernelMismatchError(ConfigError):
    """dng's reverse kernel no longer reproduces the scheduler's step (a diffusers version dng was not tested with):
    sampling with it would bias the tracked posterior."""
