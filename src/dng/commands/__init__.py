"""Subcommands of the `dng` command; each module has `register(groups)` and imports heavy modules lazily.

The `check_*` helpers validate options before any model loads or runs, each with a one-line ConfigError that names
the option and the fix (the CLI exits 2 on it, without a traceback).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from dng.defaults import BENCH_IMAGES, GENERATOR_BATCH, GENERATOR_SAMPLER, GENERATOR_STEPS

# The names of `dng.schedulers.SAMPLERS`, written out so that building the parser need not import diffusers.
SAMPLER_NAMES = ("ddpm", "euler-a", "dpmpp-2m-sde", "ddim")


class _Renamed(argparse.Action):
    """An old spelling of an option: takes the value for the new one, with a note on stderr naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"dng: note: {option_string} is now {self.metavar}; the old spelling will be removed", file=sys.stderr)
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)


def add_renamed(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept `old` as a hidden alias of the option `new` (same `dest`), with a deprecation note when used."""
    parser.add_argument(old, dest=dest, action=_Renamed, metavar=new, help=argparse.SUPPRESS, **kwargs)


def add_mode_argument(parser, default: str | None, what: str) -> None:
    """--mode independent|exclusive: how several negative concepts combine in DNG."""
    parser.add_argument("--mode", choices=("independent", "exclusive"), default=default,
                        help=f"how several concepts combine: independent (free text) or exclusive (classes); {what}")


def add_scheduler_argument(parser, default: str) -> None:
    parser.add_argument("--scheduler", default=default,
                        help=f"sampler: {', '.join(SAMPLER_NAMES)} (DPM++ 2M SDE Karras; DDIM with eta 1); "
                             f"default {default}")


def add_dtype_argument(parser) -> None:
    """--dtype of the sampling commands (`dng.vision.branches.DTYPES`)."""
    parser.add_argument("--dtype", default="float32",
                        help="the UNet's arithmetic: float32 (default) or bfloat16 (autocast; about 2x faster on CPUs "
                             "with AMX or AVX512-BF16, slower on others; outputs and tracking stay float32)")


def add_dng_arguments(parser, model: str = "generator", preset: str = "default") -> None:
    """--dng-preset (default `preset`), --dng NAME=VALUE and --calibration of the commands that run DNG on `model`
    ("generator" or "diffusers"; `dng_changes` reads --dng)."""
    from dng.config import CALIBRATED_PRESETS, PARAMETERS, PRESETS

    parser.add_argument("--dng-preset", default=preset,
                        help=f"DNG's named setting: {', '.join(PRESETS)} (default: {preset}; the model's calibration "
                             f"applies to {' and '.join(CALIBRATED_PRESETS)}, the published presets run as published; "
                             "strict removes about as much as NP at scale 1 with less damage, docs/RESULTS.md)")
    parser.add_argument("--dng", action="append", default=[], metavar="NAME=VALUE",
                        help="set one DNG setting over the preset (and the calibration), e.g. --dng lam0=2 --dng "
                             f"sigma_min=0.1; names: {', '.join(PARAMETERS)}")
    add_calibration_argument(parser, model)


def add_calibration_argument(parser, model: str = "generator") -> None:
    """--calibration FILE|none of the commands that run DNG: the calibration `dng calibrate` wrote for `model`
    ("generator": it replaces the one beside the generator; "diffusers": the pipeline applies it)."""
    beside = (" (default: the one beside the generator, <name>.calibration.json); it must have been made for the "
              "--generator weights" if model == "generator" else " (default: none); a file made for another model "
              "is applied with a warning")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help=f"a DNG calibration file written by `dng calibrate`, applied to our presets"
                             f"{beside}; 'none' runs uncalibrated, on the preset's own settings (for measurements)")


# Spellings of --dng names that were renamed: accepted with a note that gives the new name.
RENAMED_DNG = {"scale": "lam0"}
TEXT_SETTINGS = ("mode", "kernel_variance", "update", "endpoint")


def dng_changes(args, check: bool = True) -> dict:
    """The --dng NAME=VALUE settings as `DNGConfig` changes, each a known name with a value of its kind; with `check`,
    also checked against the preset (a command whose model's calibration applies to the preset checks them with
    it instead: `generator_dng`)."""
    import sys

    from dng.config import PARAMETERS, DNGConfig
    from dng.errors import ConfigError

    changes = {}
    for item in args.dng:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name in RENAMED_DNG:
            print(f"dng: note: --dng {name}= is now --dng {RENAMED_DNG[name]}= (lam0, not the applied scale)",
                  file=sys.stderr)
            name = RENAMED_DNG[name]
        if not sep or name not in PARAMETERS:
            raise ConfigError(f"--dng {item!r}: write NAME=VALUE with NAME one of {', '.join(PARAMETERS)}")
        if name in TEXT_SETTINGS:
            changes[name] = value.strip()
            continue
        try:
            values = [float(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"--dng {item!r}: {value!r} is not a number") from None
        changes[name] = values[0] if len(values) == 1 else tuple(values)
    if check:
        try:
            DNGConfig.preset(args.dng_preset, **changes)
        except ConfigError as err:
            raise ConfigError(f"--dng-preset / --dng: {err}") from None
    return changes


def generator_calibration_of(args):
    """The calibration of --calibration (or beside --generator) and its file, as
    `dng.vision.models.generator_calibration` reads it: once per command, errors naming the option."""
    from dng.errors import ConfigError
    from dng.vision.models import generator_calibration

    if not hasattr(args, "_calibration"):
        try:
            args._calibration = generator_calibration(args.calibration, args.generator)
        except ConfigError as err:
            option = "--calibration" if args.calibration is not None else "the generator's calibration"
            raise ConfigError(f"{option}: {err}") from None
    return args._calibration


def generator_dng(args, removed, **changes):
    """The DNG settings of a command that removes `removed` from the generator (`dng.vision.models.dng_config`:
    preset, the calibration of --calibration or beside the generator, --dng), checked as they will run (the calibrated
    prior against a --dng p_max, say) before any model loads, and where they came from."""
    from dng.errors import ConfigError
    from dng.vision.data import CLASS_NAMES
    from dng.vision.models import dng_config, dng_source

    calibration, file = generator_calibration_of(args)
    try:
        config = dng_config(calibration, removed, args.dng_preset, **{**changes, **dng_changes(args, check=False)})
    except ConfigError as err:
        names = ", ".join(CLASS_NAMES[k] for k in removed)
        raise ConfigError(f"--dng-preset / --dng (removing {names}): {err}") from None
    return config, dng_source(calibration, args.dng_preset, file)


def check_generator_dng(args, removals) -> None:
    """The DNG settings of every class a bench removes (`removals`: one list of classes per cell), as
    `generator_dng` builds them, before any model loads."""
    for removed in dict.fromkeys(tuple(r) for r in removals):
        generator_dng(args, list(removed))


def check_count(option: str, value: int | None, minimum: int = 1) -> int | None:
    """A whole-number option (--batch-size, --num-images, --jobs, ...) that must be >= `minimum`; None passes (the
    option's default applies)."""
    from dng.errors import ConfigError

    if value is not None and value < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}")
    return value


# Seeds of every command: numpy's and torch's generators take any whole number in this range.
SEED_LIMIT = 2**63


def check_seed(seed: int | None, option: str = "--seed") -> int | None:
    """A seed from 0 to 2**63 - 1; None passes (the option's default applies)."""
    from dng.errors import ConfigError

    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{option} must be a whole number from 0 to 2**63 - 1, got {seed}")
    return seed


# What the sampling commands keep in memory, per image, for `check_memory` (bytes; an estimate, not a measurement
# of every buffer): a uint8 image, the same as float32 (the samples, the classifier's input), the classifier's
# float64 features, and the temporaries of the degeneracy check (`dng.metrics.background_energy` holds about four
# float32 and ten uint8 copies of the images at once).
U8 = 28 * 28
F32 = 4 * U8
FEATURES = 8 * 128
CHECK = 4 * F32 + 10 * U8
# Precision/recall's k-NN radii sort the samples' N x N float64 distances, with about four such matrices alive.
PER_PAIR_PRECISION_RECALL = 4 * 8
# The UNet's working memory per row of a batch (one image in one branch): about 1.1 MB, measured on the shipped
# generator in float32 on a CPU (2.2 MB per image with two branches).
UNET_BYTES_PER_ROW = 1.1e6


def memory_available() -> int | None:
    """The memory this machine can give a new process (Linux's MemAvailable, else the physical memory), or None where
    the system does not say."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(option: str, count: int, per_image: float, *, batch: int = GENERATOR_BATCH, branches: int = 2,
                 per_pair: float = 0.0, batch_option: str | None = None) -> float:
    """Refuse, before any model loads, a `count` of images whose estimated memory exceeds what the machine has:
    `per_image` bytes kept per image, `per_pair` per pair of images (precision/recall), and the UNet's working memory
    for a batch of min(`batch`, `count`) images in `branches` branches. Returns the estimate in bytes."""
    from dng.errors import ConfigError

    unet = UNET_BYTES_PER_ROW * branches * min(batch, count)
    need = count * per_image + per_pair * count**2 + unet
    have = memory_available()
    if have is not None and need > have:
        parts = [f"{per_image / 1e3:.3g} kB per image kept"]
        if per_pair:
            parts.append(f"{per_pair:g} bytes per pair of images for precision/recall")
        parts.append(f"{UNET_BYTES_PER_ROW * branches / 1e6:.2g} MB per image of a batch in the UNet")
        lower = option if batch_option is None or unet < need / 2 else f"{batch_option} or {option}"
        raise ConfigError(f"{option} {count} needs about {need / 1e9:.3g} GB of memory ({', '.join(parts)}); this "
                          f"machine has {have / 1e9:.3g} GB available: lower {lower}")
    return need


def check_threads(threads: int | None) -> int | None:
    """--threads: >= 1, or None for torch's own choice."""
    from dng.errors import ConfigError

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (or left out for torch's choice), got {threads}")
    return threads


def check_generator_sampler(args) -> None:
    """--scheduler names a sampler and --steps is a step count for it on the generator's schedule."""
    from dng.sampler import check_steps
    from dng.vision.models import generator_sampler

    check_steps(args.steps, generator_sampler(args.scheduler).scheduler, "--steps")


def check_out_dir(path, option: str = "--out") -> Path:
    """An output folder: an existing folder, or one that can be created, in a place this user can write."""
    from dng.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a folder (it is created if missing)")
    _check_writable(path, option)
    return path


def check_out_file(path, option: str = "--out", suffix: str | None = None) -> Path:
    """An output file: not a folder, with `suffix` if given, in a folder this user can write (created if
    missing). An existing file is replaced."""
    from dng.errors import ConfigError

    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{option} must name a {suffix} file, got {path}")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file in it, e.g. {path / ('out' + (suffix or ''))}")
    _check_writable(path.parent, option)
    return path


def _check_writable(folder: Path, option: str) -> None:
    """Refuse `folder` unless it exists or can be made, and its nearest existing ancestor takes a new file."""
    from dng.errors import ConfigError

    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder; choose another place")
    # A real write, not os.access: root passes access() everywhere, and /sys, for one, then refuses the file.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {folder}: cannot write in {existing} ({err.strerror or err}); choose a "
                          f"writable place") from None


def add_sweep_arguments(parser, steps: int = GENERATOR_STEPS, scheduler: str = GENERATOR_SAMPLER) -> None:
    """The options the Fashion-MNIST benches share: samples, sampler, seed, models, batch, dtype, threads, --out."""
    parser.add_argument("--num-images", dest="num_samples", type=int, default=BENCH_IMAGES,
                        help="images per cell (default %(default)s)")
    add_renamed(parser, "--num-samples", "--num-images", "num_samples", type=int)
    parser.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
    add_scheduler_argument(parser, scheduler)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True,
                        help="sweep folder: cells, results.json, results.csv, summary.md, figures (resumable)")
    parser.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    parser.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    parser.add_argument("--batch-size", type=int, default=GENERATOR_BATCH,
                        help="images per sampler run and per shard (bounds memory; part of the sweep's settings, "
                             "since the UNet's arithmetic depends on the batch it runs in)")
    add_dtype_argument(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's choice; under torchrun the cores shared "
                             "among the local ranks)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def sweep_bytes_per_image(steps: int, negatives: int = 1) -> int:
    """What a bench keeps per image of a sample set: merging the shards (their images and p / scale traces, twice:
    the shards and the merged arrays), then scoring it (the images and traces, the classifier's input and features,
    the degeneracy check)."""
    trace = 2 * 4 * steps * negatives
    return 2 * (U8 + trace) + U8 + trace + F32 + FEATURES + CHECK


def check_sweep_numbers(args) -> None:
    """The whole numbers of `add_sweep_arguments` (images, batch, seed, threads): checked first, before the slow
    imports."""
    check_count("--num-images", args.num_samples, 4)
    check_count("--batch-size", args.batch_size)
    check_seed(args.seed)
    check_threads(args.threads)


def check_sweep_arguments(args, per_image: float | None = None, per_pair: float = 0.0, branches: int = 2) -> None:
    """`add_sweep_arguments`' options, checked before any model loads; the memory of --num-images images per sample
    set with `check_memory` (default per image: `sweep_bytes_per_image`)."""
    from dng.vision.branches import check_dtype

    check_sweep_numbers(args)
    check_generator_sampler(args)
    check_dtype(args.dtype)
    per_image = sweep_bytes_per_image(args.steps) if per_image is None else per_image
    check_memory("--num-images", args.num_samples, per_image, batch=args.batch_size, branches=branches,
                 per_pair=per_pair, batch_option="--batch-size")
    check_out_dir(args.out)


def start_sweep(args, cells, **memory):
    """Check the sweep options (`memory`: `check_sweep_arguments`' estimate), join torchrun's ranks if launched by it,
    set each rank's threads, and refuse ranks that were asked for different `cells`; returns the
    `dng.distributed.World`."""
    from dng.distributed import World, threads_per_rank

    check_sweep_arguments(args, **memory)
    world = World.from_env()
    threads_per_rank(world, args.threads)
    world.check_same(cells, "the cells to run")
    return world


def finish_sweep(world, out, ran: int, write_results) -> int:
    """Rank 0 rebuilds the results from the stored cells and prints the summary; the other ranks just return."""
    if not world.main:
        return 0
    files = write_results(out)
    print(files["summary"].read_text())
    print(f"ran {ran} cell(s); wrote {files['results']}, {files['csv']} and figures in {Path(out) / 'figures'}")
    return 0
