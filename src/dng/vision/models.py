"""The class-conditional epsilon UNet, the Fashion-MNIST classifier, and their safetensors files."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dng.calibration import ModelCalibration, load_calibration_file
from dng.config import CALIBRATED_PRESETS, DNGConfig
from dng.errors import ConfigError
from dng.io import write_atomic

NULL_LABEL = 10  # class index of the unconditional branch (label dropout)
KINDS = ("generator", "classifier")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

# 2.2 M parameters, 0.33 GFLOP per image: on 2 busy CPU cores this trains at ~25 images/s per thread, against
# ~14 for (32, 64, 128) channels and ~20 for two layers per block; narrow 28x28 and 14x14 levels keep it cheap.
GENERATOR_CONFIG = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
    "attention_head_dim": 32,
    "num_class_embeds": NULL_LABEL + 1,
}

# One conv at 28x28 (the costly resolution), two at 14x14, one at 7x7: 0.3 M parameters, 30 MFLOP per image.
# With one conv per stage it reached only 91.7 % after 8 epochs.
CLASSIFIER_CONFIG = {"channels": [32, 64, 128], "convs": [1, 2, 1], "features": 128, "num_classes": 10, "dropout": 0.2}


def make_generator(config: dict | None = None):
    """A diffusers UNet2DModel predicting epsilon from (x_t, t, class label or NULL_LABEL)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or GENERATOR_CONFIG))


def training_scheduler():
    """The generator's DDPM training schedule, which sampling reads too: 1000 steps, linear betas (diffusers
    defaults)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def generator_sampler(name: str = "ddpm"):
    """The sampler `name` (`dng.schedulers.SAMPLERS`) on the generator's training schedule: (scheduler, eta)."""
    from dng.schedulers import named_sampler

    return named_sampler(name, training_scheduler().config)


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """A small CNN on [-1, 1] images: `features` gives the penultimate embedding, `forward` the logits."""

    def __init__(
        self, channels=(32, 64, 128), convs=(1, 2, 1), features: int = 128, num_classes: int = 10, dropout: float = 0.2
    ):
        super().__init__()
        layers, c_in = [], 1
        for c_out, n in zip(channels, convs, strict=True):
            for _ in range(n):
                layers.append(_conv(c_in, c_out))
                c_in = c_out
            layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3
        self.body = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * 9, features),
            nn.BatchNorm1d(features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [N, features] of images [N, 1, 28, 28]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_classifier(config: dict | None = None) -> Classifier:
    """The Fashion-MNIST classifier."""
    return Classifier(**(config or CLASSIFIER_CONFIG))


def save_model(model: nn.Module, path, kind: str, config: dict, card: dict, half: bool = False) -> None:
    """Write the weights with kind, config and card as JSON metadata; atomic, optionally fp16."""
    from safetensors.torch import save

    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}: use one of {', '.join(KINDS)}")
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        tensors[name] = value.contiguous()
    meta = {"kind": kind, "config": json.dumps(config), "card": json.dumps(card)}
    write_atomic(path, save(tensors, metadata=meta))


def read_model_file(path, kind: str) -> tuple[dict, dict, dict]:
    """State dict (float32), config and card of a file written by save_model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ConfigError(f"{path} is not a readable safetensors file ({err})") from err
    if meta.get("kind") != kind:
        raise ConfigError(f"{path} holds a {meta.get('kind')!r} model, expected a {kind!r}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        config, card = json.loads(meta["config"]), json.loads(meta.get("card", "{}"))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{path} has no readable config ({err!r}): export it again with `dng train export`") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} has a config that is not a JSON object: export it again with `dng train export`")
    return state, config, card


def weights_sha256(path, kind: str) -> str:
    """sha256 of a model file's config and tensors, not of its card.

    Results keyed on it stay valid when the same weights are exported again with a new card (e.g. after a
    recalibration or a longer training history).
    """
    state, config, _ = read_model_file(path, kind)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _load(path, kind: str, make):
    state, config, _ = read_model_file(path or default_weights(kind), kind)
    try:
        model = make(config)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:  # a config the model rejects, tensors that do not fit it
        # load_state_dict's message is a heading and one line per problem: the first problem says enough.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0])[:200]
        raise ConfigError(f"{path or default_weights(kind)} holds no {kind} its config describes ({reason}): "
                          "export it again with `dng train export`") from None
    return model.eval()


def load_generator(path=None, calibration=None):
    """The UNet of a generator file (the shipped one by default), float32 in eval mode, with its DNG calibration
    as `dng_calibration` (None without one): `dng_config` applies it. `calibration` as in `generator_calibration`
    (default: the one beside the weights, `load_calibration`)."""
    unet = _load(path, "generator", make_generator)
    unet.dng_calibration = generator_calibration(calibration, path)[0]
    return unet


def load_classifier(path=None) -> Classifier:
    """The classifier of a classifier file (the shipped one by default), float32 in eval mode."""
    return _load(path, "classifier", make_classifier)


def default_weights(kind: str) -> Path:
    """Path of the shipped weights of `kind`; ConfigError if they are not there."""
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}: use one of {', '.join(KINDS)}")
    path = WEIGHTS_DIR / f"{kind}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"no shipped {kind} weights at {path}: train and export them with "
            f"`dng train {kind} --out runs/{kind}` then `dng train export --run runs/{kind} --kind {kind}`"
        )
    return path


CALIBRATION_SUFFIX = ".calibration.json"


def calibration_path(generator=None) -> Path:
    """Where the DNG calibration of a generator file lives: beside it, as <name>.calibration.json."""
    path = Path(generator) if generator else WEIGHTS_DIR / "generator.safetensors"
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def calibration_sha256(path) -> str | None:
    """The `weights_sha256` a calibration file records of the generator it was fitted to; None if it has none."""
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return entry.get("generator_sha256") if isinstance(entry, dict) else None


def save_calibration(path, fits: dict, classes: list[int], settings: dict, generator=None, labels: str = "classifier",
                     **extra) -> Path:
    """Write a calibration (fits: name -> dng.calibration.Calibration; "all" is the joint one that sampling uses).

    `settings` says what the fit was made from and must hold its p_max. The offset is a rate per unit of log-SNR,
    so one fit serves every sampler and step count. The file records the `weights_sha256` of `generator`, the
    weights it was fitted to (default: the generator file `path` is the calibration of), as `generator_sha256` and in
    its `model` record (`dng.calibration.model_record`), and is applied to those weights only; `labels` says who
    labelled the finished samples ("classifier" or "model", the generator's own verdict); `extra` entries are kept
    beside.
    """
    from dng.calibration import calibration_entry, model_record
    from dng.io import write_json
    from dng.vision.data import CLASS_NAMES

    if "p_max" not in settings or "all" not in fits:
        raise ConfigError("a calibration needs the joint fit 'all' and the p_max it was made with")
    if len(fits["all"].priors) != len(classes):
        raise ConfigError(f"the joint fit has {len(fits['all'].priors)} priors for {len(classes)} classes")
    path = Path(path)
    if generator is None:
        generator = path.with_name(path.name.removesuffix(CALIBRATION_SUFFIX) + ".safetensors")
    if not Path(generator).is_file():
        raise ConfigError(f"no generator file {generator} for the calibration {path}: name the weights it was fitted "
                          "to (--generator)")
    sha = weights_sha256(generator, "generator")
    entry = calibration_entry(fits, [CLASS_NAMES[k] for k in classes], settings,
                              model=model_record("generator", Path(generator), sha), labels=labels, **extra)
    # Read by the generator's loaders (`load_calibration`) before the model record existed; kept for them.
    return write_json(path, {"generator_sha256": sha, **entry})


def load_calibration(generator=None) -> ModelCalibration | None:
    """The generator's fitted DNG tracker (`dng calibrate`, concepts keyed by class name), or None if it has none.

    A calibration fitted to other weights (its recorded `weights_sha256` differs from the generator's, or it records
    none) is not applied: a warning says so.
    """
    weights = Path(generator) if generator else WEIGHTS_DIR / "generator.safetensors"
    path = calibration_path(weights)
    if not path.is_file():
        return None
    calibration, entry = ModelCalibration.read(path)
    recorded = entry.get("generator_sha256")
    if recorded != weights_sha256(weights, "generator"):
        fitted = "records no weights it was fitted to" if recorded is None else "was fitted to other weights"
        warnings.warn(f"{path} {fitted}, so it is not applied to {weights}: rerun `dng calibrate` for them",
                      stacklevel=2)
        return None
    return calibration


# `calibration="none"` (--calibration none): DNG runs uncalibrated, on the preset's own settings.
NO_CALIBRATION = "none"


def generator_model(generator=None) -> dict:
    """The generator as a calibration file records the model it was made for (`dng.calibration.recorded_model`)."""
    weights = Path(generator) if generator else default_weights("generator")
    return {"kind": "generator", "path": str(weights), "weights_sha256": weights_sha256(weights, "generator")}


def generator_calibration(calibration=None, generator=None) -> tuple[ModelCalibration | None, str | None]:
    """The calibration DNG applies to a generator, and the file it came from (as `dng_source` names it):

    - None: the one beside the weights (`load_calibration`), file None;
    - "none": no calibration (the preset's own settings, for measurements), file "none";
    - a path: that file, which must have been made for these weights (`dng.calibration.load_calibration_file`:
      a ConfigError says what to change otherwise);
    - a `ModelCalibration`: itself, file None.
    """
    if calibration is None:
        return load_calibration(generator), None
    if isinstance(calibration, ModelCalibration):
        return calibration, None
    if isinstance(calibration, str) and calibration.strip().lower() == NO_CALIBRATION:
        return None, NO_CALIBRATION
    return load_calibration_file(calibration, generator_model(generator))[0], str(calibration)


def dng_config(calibration: ModelCalibration | None, removed: Sequence[int], preset: str = "default",
               **changes) -> DNGConfig:
    """DNG's settings for removing the classes `removed` from a generator: the preset, with the generator's
    `calibration` (`load_generator(...).dng_calibration`, or `load_calibration`) applied to our own presets
    (`dng.config.CALIBRATED_PRESETS`; published presets run as published), then `changes`. Several classes are
    mutually exclusive unless `changes` say otherwise.

    The one source of DNG settings for the shipped generator: the Python API, `dng sample`, `dng demo` and the
    benches all call it.
    """
    from dng.vision.data import CLASS_NAMES

    mode = {"mode": "exclusive"} if len(removed) > 1 else {}
    config = DNGConfig.preset(preset, **mode)
    if calibration is not None and preset in CALIBRATED_PRESETS:
        config = calibration.apply(config, [CLASS_NAMES[k] for k in removed])
    return config.replace(**changes)


def dng_source(calibration: ModelCalibration | None, preset: str, file: str | None = None) -> str:
    """Where `dng_config`'s settings come from, as a report says it; `file` is the calibration file given
    (`generator_calibration`'s: None for the generator's own, "none" for none)."""
    if preset not in CALIBRATED_PRESETS:
        return f"the published preset {preset!r} as published"
    if file == NO_CALIBRATION:
        return "library defaults (calibration turned off: --calibration none)"
    if calibration is None:
        return "library defaults (no calibration)"
    return "the generator's calibration" if file is None else f"the calibration file {file}"
