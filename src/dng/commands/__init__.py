"""Subcommands of the `dng` command; each module has `register(groups)` and imports heavy modules lazily."""


def add_dtype_argument(parser) -> None:
    """--dtype of the sampling commands (`dng.vision.generate.DTYPES`)."""
    parser.add_argument("--dtype", default="float32",
                        help="the UNet's arithmetic: float32 (default) or bfloat16 (autocast; about 2x faster on CPUs "
                             "with AMX or AVX512-BF16, slower on others; outputs and tracking stay float32)")


def add_late_boost_arguments(parser, boost: float = 1.0, timestep: int = 500) -> None:
    """--dng-late-boost / --dng-late-timestep of the Fashion-MNIST commands (`late_settings` reads them)."""
    parser.add_argument("--dng-late-boost", type=float, default=boost,
                        help=f"multiply DNG's lam0 by this below --dng-late-timestep (default {boost:g}; 1 is one "
                             "lam0 for the whole chain, as published)")
    parser.add_argument("--dng-late-timestep", type=int, default=timestep,
                        help=f"timestep below which --dng-late-boost applies (default {timestep}, measured on the "
                             "shipped generator)")


def late_settings(args) -> dict:
    """DynamicNegativeGuidance arguments of --dng-late-boost / --dng-late-timestep; none for a boost of 1."""
    from dng.errors import ConfigError
    from dng.guidance import DynamicNegativeGuidance

    if args.dng_late_boost == 1.0:
        return {}
    late = {"late_boost": args.dng_late_boost, "late_timestep": args.dng_late_timestep}
    try:
        DynamicNegativeGuidance(**late)
    except ConfigError as err:
        raise ConfigError(f"--dng-late-boost / --dng-late-timestep: {err}") from None
    return late
