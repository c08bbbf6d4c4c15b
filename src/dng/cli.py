"""The `dng` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from dng.errors import ConfigError, NonFiniteError

# Each module defines register(groups) where groups maps "top", "bench" and "train" to subparser sets.
COMMAND_MODULES = [
    "dng.commands.bench_gmm",
    "dng.commands.train",
    "dng.commands.sd",
    "dng.commands.class_removal",
    "dng.commands.prompted",
    "dng.commands.sample",
    "dng.commands.demo",
    "dng.commands.calibrate",
]


def build_parser() -> argparse.ArgumentParser:
    from dng import __version__

    parser = argparse.ArgumentParser(prog="dng", description="Dynamic Negative Guidance for diffusion models.")
    parser.add_argument("--version", action="version", version=f"dng {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = top.add_parser("bench", help="run a benchmark").add_subparsers(dest="bench", required=True)
    train = top.add_parser("train", help="train a shipped model").add_subparsers(dest="model", required=True)
    groups = {"top": top, "bench": bench, "train": train}
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(groups)
    return parser


# Third-party notices that tell a dng user nothing they can act on, by the logger that emits them and a piece of
# their text; silenced here, for the command only (a Python user of dng keeps their libraries' logs as they are).
QUIET = {
    # transformers falls back to the PIL image processors, which the pipelines do not use.
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # Without accelerate, diffusers loads the weights the plain way: slower, same weights.
    "diffusers.models.modeling_utils": ("because `accelerate` was not found",),
    # ... and says so again for the pipeline, plus, for float16 on the CPU, that the pipeline cannot run there,
    # which the installed torch contradicts (dng sd runs it).
    "diffusers.pipelines.pipeline_utils": ("because `accelerate` was not found", "cannot run with `cpu` device"),
}


class _Quiet(logging.Filter):
    """Drops the records of one logger whose message holds one of `texts`."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_third_party() -> None:
    """Silence the `QUIET` notices (once per process, before the libraries are imported)."""
    for name, texts in QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet(texts))


def _draws_figures(args) -> bool:
    """Whether the command writes figures, which need matplotlib (the `plots` extra); bench gmm only with --plot."""
    if args.command == "bench" and args.bench == "gmm":
        return args.plot
    return args.command in ("demo", "sd", "bench")


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        if _draws_figures(args) and importlib.util.find_spec("matplotlib") is None:
            raise ConfigError(f"dng {args.command} writes figures with matplotlib, which is not installed: "
                              f"pip install 'dng[plots]'")
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"dng: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"dng: numerical error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("dng: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
