"""`dng calibrate`: fit DNG's tracker (prior per concept, temperature, offset) to the Fashion-MNIST generator, or with
--model to a Stable Diffusion 1.x / 2.x / XL / 3 or Flux diffusers folder."""

from __future__ import annotations

import math
from pathlib import Path

from dng.commands import (
    F32,
    FEATURES,
    SAMPLER_NAMES,
    U8,
    add_mode_argument,
    add_renamed,
    check_count,
    check_generator_sampler,
    check_memory,
    check_out_file,
    check_seed,
    check_threads,
)
from dng.config import DNGConfig
from dng.defaults import GENERATOR_SAMPLER, GENERATOR_STEPS, PIPELINE_CALIBRATION, VERDICT_DRAWS

# Defaults of the two paths; those of the generator are those the shipped calibration was made with.
GENERATOR_DEFAULTS = {"num_samples": 300, "steps": GENERATOR_STEPS, "scheduler": GENERATOR_SAMPLER, "dtype": "float32",
                      "classes": "all", "labels": "classifier"}
DIFFUSERS_DEFAULTS = {"num_samples": PIPELINE_CALIBRATION["num_images"], "steps": PIPELINE_CALIBRATION["steps"],
                      "batch_size": PIPELINE_CALIBRATION["batch_size"]}
# Options of one path only: dest -> option.
DIFFUSERS_ONLY = {"prompt": "--prompt", "prompts_file": "--prompts-file", "concept": "--concept", "prior": "--prior",
                  "cfg_scale": "--cfg-scale", "batch_size": "--batch-size", "device": "--device", "height": "--height",
                  "width": "--width"}
GENERATOR_ONLY = {"classes": "--classes", "generator": "--generator", "classifier": "--classifier"}


def register(groups) -> None:
    p = groups["top"].add_parser(
        "calibrate", help="fit DNG's prior, temperature and offset to a model's own unguided chains",
        description="Samples unguided chains that track every concept at once, labels the finished samples and fits "
                    "the tracker by maximum likelihood (dng.calibration). The Fashion-MNIST generator (default): "
                    "every class, labelled by the shipped classifier (--labels classifier) or by the generator's own "
                    "verdict (--labels model); writes the fit beside the generator (or --out). A Stable Diffusion "
                    "1.x / 2.x / XL / 3 or Flux diffusers folder (--model DIR): chains from --prompt as the model "
                    "samples them (CFG; Flux: its distilled guidance), tracking each "
                    "--concept, labelled by the model's own verdict (empty prompt against the concept's text, with "
                    "each concept's --prior); writes --out. dng sample, demo, sd and the benches use the fit on every "
                    "sampler and step count, since its offset is a rate per unit of log-SNR.")
    p.add_argument("--classes", default=None, help="generator: 'all' (default) or comma-separated indices or names")
    p.add_argument("--num-images", dest="num_samples", type=int, default=None,
                   help=f"unguided chains (default {GENERATOR_DEFAULTS['num_samples']}; with --model "
                        f"{DIFFUSERS_DEFAULTS['num_samples']})")
    add_renamed(p, "--num-samples", "--num-images", "num_samples", type=int)
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {GENERATOR_DEFAULTS['steps']}; "
                                                          f"with --model {DIFFUSERS_DEFAULTS['steps']})")
    p.add_argument("--scheduler", default=None,
                   help=f"sampler: {', '.join(SAMPLER_NAMES)} (DPM++ 2M SDE Karras; DDIM with eta 1); default "
                        f"{GENERATOR_DEFAULTS['scheduler']}; with --model the folder's scheduler (its stochastic "
                        "sibling where it adds no noise)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--p-max", type=float, default=DNGConfig.p_max,
                   help=f"the tracker's upper clamp the fit assumes (default {DNGConfig.p_max:g}, DNG's)")
    add_mode_argument(p, DNGConfig.mode, "the joint fit replays the clamp of this mode: exclusive for removing "
                                         f"several classes at once, independent for one class at a time (default "
                                         f"{DNGConfig.mode}, DNG's)")
    add_renamed(p, "--exclusive", "--mode exclusive", "mode", nargs=0, const="exclusive")
    p.add_argument("--labels", choices=("classifier", "model"), default=None,
                   help="generator: who labels the finished samples: the shipped classifier (default) or the "
                        "generator's own verdict over its ten classes (exhaustive: their priors are its own), which "
                        "also prints its agreement with the classifier; --model is always labelled by the model")
    p.add_argument("--draws", type=int, default=None,
                   help=f"the verdict's noisy copies per image, each one model call of 1 + concepts branches "
                        f"(default {VERDICT_DRAWS})")
    p.add_argument("--generator", default=None, help="generator safetensors (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="classifier safetensors (default: the shipped one)")
    p.add_argument("--dtype", default=None,
                   help="generator: the UNet's arithmetic, float32 (default) or bfloat16 (autocast, also for the "
                        "verdict); --model: float32, float16 or bfloat16 (default float16 on cuda, float32 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="calibration file (default: beside the generator; needed with --model)")
    g = p.add_argument_group("Stable Diffusion and Flux (--model)")
    g.add_argument("--model", type=Path, default=None,
                   help="a local diffusers Stable Diffusion 1.x / 2.x / XL / 3 or Flux folder (with model_index.json)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt the chains are drawn from (with CFG, as users sample); repeat for several, the "
                        "images cycle through them")
    g.add_argument("--prompts-file", type=Path, default=None, help="more prompts, one per line (blank lines skipped)")
    g.add_argument("--concept", action="append", default=None, metavar="TEXT",
                   help="a negative concept to calibrate (its text, as dng sd --negative); repeat for several")
    g.add_argument("--prior", action="append", type=float, default=None, metavar="P",
                   help="each concept's share of the unconditional (empty-prompt) model's images, in (0, 1), in the "
                        "order of --concept (one value stands for all); required: the verdict's labels scale with it "
                        "(docs/CALIBRATION.md)")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="CFG scale of the chains (default: the pipeline's, 7.5 for SD, 5 for SDXL, 7 for SD3; "
                        "not for Flux)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images per pipeline call (default {DIFFUSERS_DEFAULTS['batch_size']})")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--height", type=int, default=None, help="a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="a multiple of 8 (default: the model's)")
    p.set_defaults(func=run)


def _refuse_other_path(args, options: dict, where: str) -> None:
    from dng.errors import ConfigError

    given = [option for dest, option in options.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} {where}; drop "
                          f"{'it' if len(given) == 1 else 'them'}")


def run(args) -> int:
    if args.model is not None:
        return run_diffusers(args)
    _refuse_other_path(args, DIFFUSERS_ONLY, "to --model (a diffusers folder) only")
    for dest, value in GENERATOR_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return run_generator(args)


def _check_draws(draws: int) -> None:
    from dng.errors import ConfigError

    if draws < 2 or draws % 2:
        raise ConfigError(f"--draws must be an even whole number >= 2 (pairs of +eps, -eps), got {draws}")


def run_generator(args) -> int:
    from dng.errors import ConfigError
    from dng.vision.data import CLASS_NAMES, NUM_CLASSES, parse_classes

    # The numbers first, before the slow imports.
    if args.num_samples < 10 or args.steps < 2:
        raise ConfigError(f"need --num-images >= 10 and --steps >= 2, got {args.num_samples} and {args.steps}")
    check_seed(args.seed)
    check_threads(args.threads)
    by_model = args.labels == "model"
    if args.draws is not None and not by_model:
        raise ConfigError("--draws sets the model's verdict: it applies to --labels model (or --model) only")
    if by_model:
        args.draws = VERDICT_DRAWS if args.draws is None else args.draws
        _check_draws(args.draws)
    classes = parse_classes(args.classes)
    # Kept per chain: the noise, the samples, the classifier's input; the uint8 image and features; the trace of
    # every class (p, scale, llr) and the fit's float64 copies of it; the verdict's log-ratios and p of every class.
    per_image = 3 * F32 + U8 + FEATURES + (3 * 4 + 3 * 8) * args.steps * len(classes) + 2 * 8 * NUM_CLASSES * by_model
    branches = NUM_CLASSES + 1 if by_model else 1 + len(classes)
    check_memory("--num-images", args.num_samples, per_image, branches=branches)

    import numpy as np
    import torch

    from dng import calibration
    from dng.config import check_probability
    from dng.vision.branches import check_dtype
    from dng.vision.generate import generate
    from dng.vision.images import classify, to_uint8
    from dng.vision.models import calibration_path, default_weights, load_classifier, load_generator, save_calibration
    from dng.vision.seeding import seeded_noise

    check_probability("--p-max", args.p_max)
    check_dtype(args.dtype)
    check_generator_sampler(args)
    out = check_out_file(args.out or calibration_path(args.generator))
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = load_generator(args.generator)
    classifier = _classifier(args) if by_model else load_classifier(args.classifier)
    noise = seeded_noise(args.seed, 0, args.num_samples)
    # One unguided chain tracks every class at once: each negative branch has its own llr in the trace.
    x, trace = generate(unet, noise, scheduler=args.scheduler, guidance=calibration.tracking_only(), negatives=classes,
                        steps=args.steps, seed=args.seed, progress=True, dtype=args.dtype)
    labels = None if classifier is None else classify(classifier, to_uint8(x))[0]
    extra = {}
    if by_model:
        judged = _verdict(args, unet, x)
        outcome = judged.p[:, classes]
        if labels is not None:
            extra["agreement"] = _agreement(judged, labels)
    else:
        outcome = torch.from_numpy(labels[:, None] == np.array(classes)[None])
    gains = calibration.log_snr_gains(trace.sigma)
    # A class the generator (almost) never makes has no outcomes to fit: it keeps the preset's prior.
    counts = outcome.double().sum(0)
    enough = [j for j in range(len(classes)) if 5 <= float(counts[j]) <= len(x) - 5]
    for j in sorted(set(range(len(classes))) - set(enough)):
        print(f"{CLASS_NAMES[classes[j]]}: {float(counts[j]):.3g} of {len(x)} samples, too few to fit; left out")
    if not enough:
        raise ConfigError("no class has 5 samples of each outcome; draw more --num-samples")
    # The joint fit pools the temperature and offset over the classes; it replays the clamp of the mode it is for.
    fits = {"all": calibration.fit(trace.llr[:, :, enough], gains, outcome[:, enough], p_max=args.p_max,
                                   exclusive=args.mode == "exclusive")}
    fits.update({CLASS_NAMES[classes[j]]: calibration.fit(trace.llr[:, :, [j]], gains, outcome[:, [j]],
                                                          p_max=args.p_max) for j in enough})
    _print_fits(fits, "class")
    made_from = {k: getattr(args, k) for k in ("classes", "num_samples", "steps", "scheduler", "seed", "p_max",
                                               "mode", "generator", "dtype", "labels")}
    if by_model:
        made_from.update(draws=args.draws, verdict_priors=judged.priors.tolist())
    save_calibration(out, fits, [classes[j] for j in enough], made_from,
                     generator=args.generator or default_weights("generator"), labels=args.labels, **extra)
    print(f"wrote {out}")
    return 0


def _classifier(args):
    """The classifier that --labels model is compared with: --classifier, else the shipped one if it is there."""
    from dng.errors import ConfigError
    from dng.vision.models import load_classifier

    if args.classifier is not None:
        return load_classifier(args.classifier)
    try:
        return load_classifier()
    except ConfigError:
        print("no shipped classifier: the verdict's agreement with it is not reported")
        return None


def _verdict(args, unet, x):
    """The generator's own verdict on its samples x: every class's branch against the unconditional one, exhaustive
    (the ten classes partition the generator, so their priors are its own), under --dtype."""
    import torch

    from dng.verdict import path_of, verdict
    from dng.vision.branches import ClassBranches
    from dng.vision.data import NUM_CLASSES
    from dng.vision.models import NULL_LABEL, generator_sampler

    branches = ClassBranches(unet, [NULL_LABEL, *range(NUM_CLASSES)], args.dtype)
    print(f"verdict: {args.draws} calls of {NUM_CLASSES + 1} branches per image")
    return verdict(branches, x, path_of(generator_sampler(args.scheduler).scheduler), NUM_CLASSES, exhaustive=True,
                   draws=args.draws, generator=torch.Generator().manual_seed(args.seed), progress=True)


def _agreement(judged, labels) -> dict:
    """Per class, the AUC of the verdict's p for "the classifier says it is this class", and how often their argmax
    agree; printed and returned."""
    import numpy as np

    from dng.calibration import roc_auc
    from dng.vision.data import CLASS_NAMES

    aucs = {name: roc_auc(judged.p[:, k], labels == k) for k, name in enumerate(CLASS_NAMES)}
    argmax = float((judged.p.argmax(1).numpy() == labels).mean())
    print(f"the verdict against the classifier's labels: argmax agreement {argmax:.2f}")
    print(f"{'class':<12} {'AUC':>5} {'share':>6} {'prior':>6}")
    for k, (name, auc) in enumerate(aucs.items()):
        print(f"{name:<12} {auc:5.3f} {np.mean(labels == k):6.3f} {float(judged.priors[k]):6.3f}")
    finite = [a for a in aucs.values() if not math.isnan(a)]
    print(f"{'mean':<12} {np.mean(finite) if finite else math.nan:5.3f}")
    return {"auc": aucs, "argmax": argmax}


def _print_fits(fits: dict, what: str) -> None:
    import numpy as np

    from dng import calibration

    print(f"{what:<12} {'share':>6} {'prior':>7} {'temp':>6} {'offset':>9} {'nll/base':>8}  AUC at "
          + " ".join(f"{q:.0%}" for q in calibration.REPORT_AT))
    for name, fit in fits.items():
        aucs = " ".join(f"{np.mean(a):.2f}" for a in fit.auc.values())
        print(f"{name:<12} {np.mean(fit.positives) / fit.samples:6.3f} {np.mean(fit.priors):7.3f} "
              f"{fit.temperature:6.3f} {fit.offset:9.2e} {fit.nll / fit.baseline_nll:8.3f}  {aucs}")


def _prompts(args) -> list[str]:
    from dng.errors import ConfigError

    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompts-file {args.prompts_file} cannot be read: {err}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("--model needs the prompts the chains are drawn from: --prompt TEXT (repeat) or "
                          "--prompts-file F")
    return prompts


def check_diffusers_args(args) -> None:
    """Refuse bad options of `dng calibrate --model` before anything is loaded."""
    from dng.config import check_concepts, check_probability
    from dng.errors import ConfigError

    _refuse_other_path(args, GENERATOR_ONLY, "to the Fashion-MNIST generator only, not with --model")
    if args.labels == "classifier":
        raise ConfigError("--labels classifier needs the Fashion-MNIST classifier; a --model is labelled by its own "
                          "verdict (--labels model)")
    for dest, value in DIFFUSERS_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.num_samples < 10 or args.steps < 2:
        raise ConfigError(f"need --num-images >= 10 and --steps >= 2, got {args.num_samples} and {args.steps}")
    check_count("--batch-size", args.batch_size)
    check_seed(args.seed)
    check_threads(args.threads)
    args.draws = VERDICT_DRAWS if args.draws is None else args.draws
    _check_draws(args.draws)
    check_probability("--p-max", args.p_max)
    if not args.concept:
        raise ConfigError("--model needs at least one --concept TEXT to calibrate (the negative concept's text)")
    try:
        check_concepts(args.concept)
    except ConfigError as err:
        raise ConfigError(f"--concept: {err}") from None
    if not args.prior:
        raise ConfigError("--model needs each concept's --prior P: its share of the unconditional (empty-prompt) "
                          "model's images, which the model's two branches cannot tell (docs/CALIBRATION.md); one "
                          "value stands for every concept")
    if len(args.prior) not in (1, len(args.concept)):
        raise ConfigError(f"{len(args.prior)} --prior for {len(args.concept)} --concept; give one per concept, in "
                          f"order, or one for all")
    for prior in args.prior:
        check_probability("--prior", prior)
    if args.cfg_scale is not None and (not math.isfinite(args.cfg_scale) or args.cfg_scale < 0):
        raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if args.scheduler is not None and args.scheduler not in SAMPLER_NAMES:
        raise ConfigError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(SAMPLER_NAMES)}, or "
                          "leave it out for the folder's")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.out is None:
        raise ConfigError("--model needs --out FILE, the calibration file to write")
    check_out_file(args.out)


def run_diffusers(args) -> int:
    from dng.commands.sd import CFG, PIPELINE_DTYPES, _device, _pipeline_class
    from dng.errors import ConfigError

    check_diffusers_args(args)
    prompts = _prompts(args)
    if args.dtype is not None and args.dtype not in PIPELINE_DTYPES:
        raise ConfigError(f"--dtype {args.dtype} is not one of {', '.join(PIPELINE_DTYPES)}")
    cls = _pipeline_class(args.model)  # checks the folder before loading it
    flow = cls.__name__ in ("StableDiffusion3DNGPipeline", "FluxDNGPipeline")
    if flow and args.scheduler is not None:
        raise ConfigError(f"--scheduler names a sampler of the DDPM family; {args.model} holds a flow-matching "
                          f"{cls.__name__.replace('DNG', '')}, whose chains run on its own scheduler's stochastic "
                          f"sibling: drop --scheduler")
    cfg = CFG[cls.__name__][0] == "guidance_scale"
    if not cfg and args.cfg_scale is not None:
        raise ConfigError("Flux's chains sample at its own (distilled) guidance, as dng sd does by default; "
                          "--cfg-scale (true CFG) is not taken here: drop it")
    device = _device(args.device)
    import torch

    from dng.calibration import tracking_only
    from dng.pipelines.calibrate import calibrate_pipeline
    from dng.pipelines.common import sampler_for
    from dng.sampler import check_steps
    from dng.schedulers import named_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    try:
        pipe = cls.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"could not load {args.model} as {cls.__name__}: {err}") from None
    eta = 0.0
    if args.scheduler is not None:
        chosen = named_sampler(args.scheduler, pipe.scheduler.config)
        pipe.scheduler, eta = chosen.scheduler, chosen.eta
    check_steps(args.steps, pipe.scheduler, "--steps")
    sampler, _ = sampler_for(pipe.scheduler, tracking_only(), eta)
    pipe.to(device)
    k = len(args.concept)
    base = "CFG on" if cfg else "the distilled guidance of the model on"
    print(f"{args.num_samples} chains of {args.steps} steps with {type(sampler.scheduler).__name__}, {base} "
          f"{len(prompts)} prompt(s), tracking {k} concept(s); verdict of {args.draws} draws. Model calls per image: "
          f"{args.steps} of {2 + k} branches + {args.draws} of {1 + k}")
    made = calibrate_pipeline(pipe, prompts, args.concept, priors=args.prior, num_images=args.num_samples,
                              num_inference_steps=args.steps, guidance_scale=args.cfg_scale, height=args.height,
                              width=args.width, eta=eta, generator=torch.Generator(device).manual_seed(args.seed),
                              batch_size=args.batch_size, p_max=args.p_max, exclusive=args.mode == "exclusive",
                              draws=args.draws, model_path=args.model.resolve())
    p = made.verdict.p
    print(f"{'concept':<24} {'prior':>6} {'mean p':>6} {'p > 0.5':>7}")
    for j, concept in enumerate(args.concept):
        print(f"{concept[:24]:<24} {float(made.verdict.priors[j]):6.3f} {float(p[:, j].mean()):6.3f} "
              f"{float((p[:, j] > 0.5).double().mean()):7.3f}")
    _print_fits({"all": made.fit}, "fit")
    made.settings.update(seed=args.seed, mode=args.mode, dtype=str(dtype).removeprefix("torch."), device=device,
                         sampler=type(sampler.scheduler).__name__, eta=sampler.eta)
    made.save(args.out)
    print(f"wrote {args.out}")
    return 0

