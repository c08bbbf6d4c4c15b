"""`dng train generator|classifier|export`: train the shipped models on CPU and export their weights."""

from __future__ import annotations

import argparse

from dng.errors import ConfigError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory (checkpoint, log.csv); an existing one resumes")
    # None = the resumed run's value, or the library default for a new run.
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (a resumed run keeps its own)")
    parser.add_argument("--seed", type=int, default=None, help="default 0 (a resumed run keeps its own)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false", help="refuse to continue an existing checkpoint"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def register(groups: dict) -> None:
    train = groups["train"]
    gen = train.add_parser("generator", help="train the class-conditional epsilon UNet (DDPM, label dropout, EMA)")
    _common(gen)
    gen.add_argument("--minutes", type=float, default=None, help="total wall-time budget of the run")
    gen.add_argument("--steps", type=int, default=None, help="total optimizer steps of the run")
    gen.add_argument("--lr", type=float, default=None, help="default 5e-4")
    gen.add_argument("--ema-decay", type=float, default=None, help="default 0.999")
    gen.add_argument("--label-dropout", type=float, default=None,
                     help="share of null labels, which train eps_u (default 0.15)")
    gen.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warmup (default 100)")
    gen.add_argument("--checkpoint-minutes", type=float, default=5.0)
    gen.add_argument("--init", default=None,
                     help="start a new run from exported generator weights, e.g. src/dng/weights/generator.safetensors")
    gen.set_defaults(func=run_generator)

    clf = train.add_parser("classifier", help="train the Fashion-MNIST classifier used by the metrics")
    _common(clf)
    clf.add_argument("--epochs", type=int, default=8)
    clf.add_argument("--lr", type=float, default=None, help="default 2e-3")
    clf.set_defaults(func=run_classifier)

    exp = train.add_parser("export", help="write a run's weights and model card to the package's weights/")
    exp.add_argument("--run", required=True, help="run directory given as --out to training")
    exp.add_argument("--kind", required=True, choices=["generator", "classifier"])
    exp.add_argument("--weights-dir", default=None, help="destination (default: the package's weights/)")
    exp.add_argument(
        "--metric", action="append", default=[], metavar="NAME=VALUE", help="extra figure for the model card"
    )
    exp.set_defaults(func=run_export)


def run_generator(args) -> int:
    from dng.vision.train import train_generator

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
    )
    print(f"generator: {scalars['step']} steps, {scalars['seconds'] / 60:.1f} min; checkpoint in {args.out}")
    return 0


def run_classifier(args) -> int:
    from dng.vision.train import train_classifier

    scalars = train_classifier(
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
        threads=args.threads,
        progress=args.progress,
    )
    print(f"classifier: test accuracy {scalars['test_accuracy']:.4f} after {scalars['step']} steps")
    return 0


def run_export(args) -> int:
    from dng.vision.train import export

    metrics = {}
    for item in args.metric:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--metric {item!r}: write NAME=VALUE")
        metrics[name] = value
    path = export(args.run, args.kind, weights_dir=args.weights_dir, metrics=metrics)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
