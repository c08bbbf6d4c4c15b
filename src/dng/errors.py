"""The error types: bad input (ConfigError) and a numerical blow-up (NonFiniteError); their messages say what to
change."""


class ConfigError(ValueError):
    """Invalid arguments, configuration or files given by the user (the CLI exits 2)."""


class UnsupportedSchedulerError(ConfigError):
    """A scheduler whose step DNG cannot track: deterministic, or not a Gaussian kernel dng knows."""


class KernelMismatchError(ConfigError):
    """dng's reverse kernel no longer reproduces the scheduler's step (a diffusers version dng was not tested with):
    sampling with it would bias the tracked posterior."""


class NonFiniteError(RuntimeError):
    """A model output, a tracked posterior or a sample that became NaN or infinite during sampling: it names where,
    and the likely cause (NaN weights, a scale too large for the model's range). Not bad input: the CLI exits 3."""


class SampleRangeError(NonFiniteError):
    """Finite samples that left the model's range during sampling (a guidance scale too large): the CLI exits 3."""
