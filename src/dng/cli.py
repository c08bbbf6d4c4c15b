"""The `dng` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def _draws_figures(args) -> bool:
    """Whether the command writes figures, which need matplotlib (the `plots` extra); bench gmm only with --plot."""
    if args.command == "bench" and args.bench == "gmm":
        return args.plot
    return args.command in ("demo", "sd", "bench")


def main(argv: list[str] | None = None) -> int:
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
