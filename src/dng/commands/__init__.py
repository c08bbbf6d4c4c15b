"""Subcommands of the `dng` command; each module has `register(groups)` and imports heavy modules lazily."""


# The names of `dng.schedulers.SAMPLERS`, written out so that building the parser need not import diffusers.
SAMPLER_NAMES = ("ddpm", "euler-a", "dpmpp-2m-sde", "ddim")


def add_scheduler_argument(parser, default: str) -> None:
    parser.add_argument("--scheduler", default=default,
                        help=f"sampler: {', '.join(SAMPLER_NAMES)} (DPM++ 2M SDE Karras; DDIM with eta 1); "
                             f"default {default}")


def add_dtype_argument(parser) -> None:
    """--dtype of the sampling commands (`dng.vision.generate.DTYPES`)."""
    parser.add_argument("--dtype", default="float32",
                        help="the UNet's arithmetic: float32 (default) or bfloat16 (autocast; about 2x faster on CPUs "
                             "with AMX or AVX512-BF16, slower on others; outputs and tracking stay float32)")


def add_dng_arguments(parser) -> None:
    """--dng-preset and --dng NAME=VALUE of the commands that run DNG (`dng_overrides` reads them)."""
    from dng.guidance import DNG_PRESETS

    parser.add_argument("--dng-preset", default="default",
                        help=f"DNG's named setting: {', '.join(DNG_PRESETS)} (default: default)")
    parser.add_argument("--dng", action="append", default=[], metavar="NAME=VALUE",
                        help="set one parameter of DNG over the preset (and the generator's calibration), e.g. "
                             f"--dng scale=2 --dng sigma_min=0.1; names: {', '.join(DNG_PARAMETERS)}")


# The DynamicNegativeGuidance parameters the command line may set (a prior may list one value per concept).
DNG_PARAMETERS = ("scale", "prior", "temperature", "offset", "p_min", "p_max", "late_boost", "boost_sigma",
                  "sigma_min", "push_cap", "offset_per_step")


def dng_overrides(args) -> dict:
    """The --dng NAME=VALUE settings as DynamicNegativeGuidance arguments, checked against the preset."""
    from dng.errors import ConfigError
    from dng.guidance import DynamicNegativeGuidance

    overrides = {}
    for item in args.dng:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in DNG_PARAMETERS:
            raise ConfigError(f"--dng {item!r}: write NAME=VALUE with NAME one of {', '.join(DNG_PARAMETERS)}")
        try:
            values = [float(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"--dng {item!r}: {value!r} is not a number") from None
        overrides[name] = values[0] if len(values) == 1 else values
    try:
        DynamicNegativeGuidance.preset(args.dng_preset, **overrides)
    except ConfigError as err:
        raise ConfigError(f"--dng-preset / --dng: {err}") from None
    return overrides
