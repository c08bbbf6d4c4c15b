"""Subcommands of the `dng` command; each module has `register(groups)` and imports heavy modules lazily."""


def add_dtype_argument(parser) -> None:
    """--dtype of the sampling commands (`dng.vision.generate.DTYPES`)."""
    parser.add_argument("--dtype", default="float32",
                        help="the UNet's arithmetic: float32 (default) or bfloat16 (autocast; about 2x faster on CPUs "
                             "with AMX or AVX512-BF16, slower on others; outputs and tracking stay float32)")
