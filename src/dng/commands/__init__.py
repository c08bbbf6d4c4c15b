"""Subcommands of the `dng` command; each module has `register(groups)` and imports heavy modules lazily."""
