"""The error type for bad input: its message says what to change."""


class ConfigError(ValueError):
    """Invalid arguments, configuration or files given by the user."""
