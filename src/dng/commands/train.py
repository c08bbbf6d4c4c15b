"""`dng train generator|classifier|export`: train the shipped models on CPU and export their weights."""

from __future__ import annotations

import argparse
import shlex

from dng.commands import check_seed
from dng.defaults import CLASSIFIER_EPOCHS, TRAIN_CLASSIFIER, TRAIN_GENERATOR
from dng.errors import ConfigError

# The options each command records on the model card: those that change what is trained (thread counts may change
# float rounding), not how often it checkpoints or shows progress.
GENERATOR_OPTIONS = ("out", "init", "minutes", "steps", "batch_size", "lr", "seed", "ema_decay", "label_dropout",
                     "warmup_steps", "threads")
CLASSIFIER_OPTIONS = ("out", "epochs", "batch_size", "lr", "seed", "threads")


def _common(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--out", required=True, help="run directory (checkpoint, log.csv); an existing one resumes")
    # None = the resumed run's value, or the library default for a new run.
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {defaults['batch_size']} (a resumed run keeps its own)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"default {defaults['seed']} (a resumed run keeps its own)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false", help="refuse to continue an existing checkpoint"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def register(groups: dict) -> None:
    train = groups["train"]
    gen = train.add_parser("generator", help="train the class-conditional epsilon UNet (DDPM, label dropout, EMA)")
    _common(gen, TRAIN_GENERATOR)
    gen.add_argument("--minutes", type=float, default=None, help="total wall-time budget of the run")
    gen.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run")
    gen.add_argument("--lr", type=float, default=None, help=f"default {TRAIN_GENERATOR['lr']:g}")
    gen.add_argument("--ema-decay", type=float, default=None, help=f"default {TRAIN_GENERATOR['ema_decay']:g}")
    gen.add_argument("--label-dropout", type=float, default=None,
                     help=f"share of null labels, which train eps_u (default {TRAIN_GENERATOR['label_dropout']:g})")
    gen.add_argument("--warmup-steps", type=int, default=None,
                     help=f"linear learning-rate warmup (default {TRAIN_GENERATOR['warmup_steps']})")
    gen.add_argument("--checkpoint-minutes", type=float, default=5.0)
    gen.add_argument("--init", default=None,
                     help="start a new run from exported generator weights, e.g. src/dng/weights/generator.safetensors")
    gen.set_defaults(func=run_generator)

    clf = train.add_parser("classifier", help="train the Fashion-MNIST classifier used by the metrics")
    _common(clf, TRAIN_CLASSIFIER)
    clf.add_argument("--epochs", type=int, default=CLASSIFIER_EPOCHS)
    clf.add_argument("--lr", type=float, default=None, help=f"default {TRAIN_CLASSIFIER['lr']:g}")
    clf.set_defaults(func=run_classifier)

    exp = train.add_parser("export", help="write a run's weights and model card to the package's weights/",
                           description="Writes a run's weights and model card. Existing weights are replaced only "
                                       "with --force and then kept as <name>.<UTC time>.bak; a generator calibration "
                                       "fitted to other weights than the new ones is moved aside the same way.")
    exp.add_argument("--run", required=True, help="run directory given as --out to training")
    exp.add_argument("--kind", required=True, choices=["generator", "classifier"])
    exp.add_argument("--weights-dir", default=None, help="destination (default: the package's weights/)")
    exp.add_argument(
        "--metric", action="append", default=[], metavar="NAME=VALUE", help="extra figure for the model card"
    )
    exp.add_argument("--force", action="store_true",
                     help="replace existing weights; the old weights and card are kept as <name>.<UTC time>.bak")
    exp.set_defaults(func=run_export)


def command_line(kind: str, args, options) -> str:
    """The `dng train` command that trains what this one does: the given `options` with the values in effect."""
    words = ["dng", "train", kind]
    for name in options:
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def run_generator(args) -> int:
    from dng.vision.train import train_generator

    check_seed(args.seed)
    scalars = train_generator(
        args.out,
        minutes=args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ema_decay=args.ema_decay,
        label_dropout=args.label_dropout,
        warmup_steps=args.warmup_steps,
        resume=args.resume,
        threads=args.threads,
        checkpoint_minutes=args.checkpoint_minutes,
        progress=args.progress,
        init=args.init,
        command=command_line("generator", args, GENERATOR_OPTIONS),
    )
    print(f"generator: {scalars['step']} steps, {scalars['seconds'] / 60:.1f} min; checkpoint in {args.out}")
    return 0


def run_classifier(args) -> int:
    from dng.vision.train import train_classifier

    check_seed(args.seed)
    scalars = train_classifier(
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
        threads=args.threads,
        progress=args.progress,
        command=command_line("classifier", args, CLASSIFIER_OPTIONS),
    )
    print(f"classifier: test accuracy {scalars['test_accuracy']:.4f} after {scalars['step']} steps")
    return 0


def run_export(args) -> int:
    from dng.vision.export import export

    metrics = {}
    for item in args.metric:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--metric {item!r}: write NAME=VALUE")
        metrics[name] = value
    exported = export(args.run, args.kind, weights_dir=args.weights_dir, metrics=metrics, force=args.force)
    print(f"wrote {exported.weights} and {exported.card}")
    if exported.backups:
        print(f"kept the replaced files as {', '.join(map(str, exported.backups))}")
    if exported.stale_calibration:
        print(f"moved the calibration fitted to the old weights to {exported.stale_calibration}: run `dng calibrate` "
              "to fit one to the new weights")
    return 0
