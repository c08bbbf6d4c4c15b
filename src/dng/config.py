"""DNG's settings as one frozen, serialisable object: the paper's four parameters, then the noise-level schedule.

Every entry point (the rule, the pipelines' `dng=`, the CLI's `--dng-preset` / `--dng`, the benches) takes a
`DNGConfig`; `PRESETS` holds the named ones. Where the chain is, is read as the noise level sigma = sqrt((1 - abar)
/ abar) of the step (log-SNR = -2 log sigma), never a timestep index, so a setting means the same on every schedule,
scheduler and step count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields
from pathlib import Path

from dng.errors import ConfigError

MODES = ("independent", "exclusive")
KERNEL_VARIANCES = ("step", "forward")
UPDATES = ("paper", "mixture", "moment")
# Where a step's evidence is read (`dng.posterior.TrackedPosterior`): the kernel's default, both ends, its start.
ENDPOINTS = ("kernel", "on", "off")
# Exclusive concepts share 1 - sum_i p_i as the denominator of every scale: their priors must leave at least this.
MIN_REST = 1e-6
# Float rounding of a sum of priors (ten of 0.095 add up to 0.95 plus a few ulps), not a real excess over p_max.
SUM_TOLERANCE = 1e-9


def check_scale(name: str, value) -> float:
    """A finite number >= 0 (a scale, a temperature, a noise level)."""
    value = _number(name, value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_concepts(concepts: Sequence[str]) -> list[str]:
    """Concept names: at least one, distinct, non-empty strings."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts or len(set(concepts)) != len(concepts):
        raise ConfigError(f"concepts must be distinct names, one per concept branch, got {concepts}")
    if not all(isinstance(c, str) and c.strip() for c in concepts):
        raise ConfigError(f"concepts must be non-empty texts (an empty prompt is the unconditional branch), got "
                          f"{concepts}")
    return concepts


def check_finite(name: str, value) -> float:
    value = _number(name, value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def check_probability(name: str, value) -> float:
    value = _number(name, value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def _number(name: str, value) -> float:
    """A plain number (a 0-d tensor or numpy scalar too); anything else is refused with its type."""
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a single number, got {value!r}") from None


@dataclass(frozen=True)
class DNGConfig:
    """DNG's settings: eps = base - lam0(sigma) * p/(1-p) * (eps_n - eps_u), p tracked from `prior`.

    lam0 = 1 is the exact score of p(x | not c-); it is `lam0 * late_boost` where sigma < `boost_sigma` (late in the
    chain the tracked p of a sample heading into the concept trails the exact one) and 0 below `sigma_min` (where
    the rule neither guides nor tracks). `push_cap` (0: none) bounds each applied scale by push_cap / (the step's
    log-SNR gain): a large scale over one large step overshoots where the posterior would have fallen within it.
    `temperature` weighs each step's evidence (1 is Bayes); `offset` is a drift of log p per unit of log-SNR gained;
    `p_min`, `p_max` clamp p, so `p_max` caps the scale at lam0 p_max / (1 - p_max). Several concepts combine as
    "independent" (lam0 p_i / (1 - p_i), free text) or "exclusive" (lam0 p_i / (1 - sum_j p_j), classes).

    Research options: `offset_per_step` (the published offset, added once per step, which holds only for the sampler
    and step count it was tuned on), `kernel_variance` ("step": the noise the step adds; "forward": the forward
    transition's), `update` ("paper": one Gaussian per kernel; "mixture": `dng.posterior.mixture_llr`; "moment":
    `dng.posterior.moment_llr`) and `endpoint` (where a tracked step's evidence is read: "kernel", the kernel's
    default, both ends for DPM-Solver SDE and the start for the one-step kernels; "on": both ends on every kernel,
    which measures better on Euler ancestral too, docs/GMM.md "Which kernels"; "off": the start).
    """

    lam0: float = 1.0
    prior: float | tuple[float, ...] = 0.1
    temperature: float = 1.0
    offset: float = 0.0
    _: KW_ONLY
    p_min: float = 1e-6
    p_max: float = 0.95
    mode: str = "independent"
    late_boost: float = 6.0
    boost_sigma: float = 0.72
    sigma_min: float = 0.0
    push_cap: float = 4.0
    offset_per_step: float = 0.0
    kernel_variance: str = "step"
    update: str = "paper"
    endpoint: str = "kernel"

    def __post_init__(self):
        for name in ("lam0", "temperature", "late_boost", "boost_sigma", "sigma_min", "push_cap"):
            object.__setattr__(self, name, check_scale(name, getattr(self, name)))
        for name in ("offset", "offset_per_step"):
            object.__setattr__(self, name, check_finite(name, getattr(self, name)))
        for name, allowed in (("mode", MODES), ("kernel_variance", KERNEL_VARIANCES), ("update", UPDATES),
                              ("endpoint", ENDPOINTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        p_min, p_max = check_probability("p_min", self.p_min), check_probability("p_max", self.p_max)
        if p_min >= p_max:
            raise ConfigError(f"p_min ({p_min}) must be smaller than p_max ({p_max})")
        object.__setattr__(self, "p_min", p_min)
        object.__setattr__(self, "p_max", p_max)
        prior = self.prior
        if isinstance(prior, (list, tuple)):
            if not prior:
                raise ConfigError("prior is an empty list: give one prior, or one per concept")
            prior = tuple(check_probability("prior", p) for p in prior)
            prior = prior[0] if len(prior) == 1 else prior
        else:
            prior = check_probability("prior", prior)
        object.__setattr__(self, "prior", prior)
        # The clamp would move such a prior before the first step: say so instead of changing it silently.
        outside = [p for p in self.priors if not p_min <= p <= p_max]
        if outside:
            raise ConfigError(f"prior {outside[0]} lies outside [p_min, p_max] = [{p_min}, {p_max}]; give a prior "
                              f"inside it or move p_min / p_max")
        if len(self.priors) > 1:
            self.priors_for(len(self.priors))

    @property
    def priors(self) -> tuple[float, ...]:
        """The prior as a tuple (one value serves every concept)."""
        return self.prior if isinstance(self.prior, tuple) else (self.prior,)

    @property
    def exclusive(self) -> bool:
        return self.mode == "exclusive"

    def priors_for(self, num_concepts: int) -> tuple[float, ...]:
        """The prior of each of `num_concepts` concepts, checked: exclusive concepts need priors summing to at most
        p_max and below 1 by MIN_REST, which the tracker's clamp keeps their total below afterwards."""
        priors = self.priors * num_concepts if len(self.priors) == 1 else self.priors
        if len(priors) != num_concepts:
            raise ConfigError(f"{len(self.priors)} priors given for {num_concepts} negative concepts; give one or "
                              f"one per concept")
        total = math.fsum(priors)
        if self.exclusive and (total > self.p_max + SUM_TOLERANCE or 1 - total < MIN_REST):
            most = min(self.p_max, 1 - MIN_REST)
            raise ConfigError(f"exclusive concepts need priors summing to at most p_max = {self.p_max} (and below 1 by "
                              f"{MIN_REST:g}); {num_concepts} priors sum to {total:.6g}: lower them, e.g. "
                              f"{most / num_concepts:.3g} each, or raise p_max")
        return priors

    def lam0_at(self, sigma: float) -> float:
        """lam0 at noise level sigma: `lam0`, times `late_boost` below `boost_sigma`, 0 below `sigma_min`."""
        if sigma < self.sigma_min:
            return 0.0
        return self.lam0 * self.late_boost if sigma < self.boost_sigma else self.lam0

    def replace(self, **changes) -> DNGConfig:
        """A copy with `changes`; an unknown name is refused with the names there are."""
        unknown = sorted(set(changes) - set(PARAMETERS))
        if unknown:
            raise ConfigError(f"unknown DNG setting {unknown[0]!r}; the settings are {', '.join(PARAMETERS)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str = "default", **changes) -> DNGConfig:
        """The named setting of `PRESETS`, with `changes`."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown DNG preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].replace(**changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["prior"] = list(self.prior) if isinstance(self.prior, tuple) else self.prior
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DNGConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a DNG configuration is a mapping of settings, got {type(data).__name__}")
        return cls().replace(**data)

    def save(self, path) -> Path:
        """Write as JSON, atomically."""
        from dng.io import write_json

        return write_json(path, {"dng": self.to_dict()})

    @classmethod
    def load(cls, path) -> DNGConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read a DNG configuration from {path}: {err}") from None
        if not isinstance(data, dict) or "dng" not in data:
            raise ConfigError(f"{path} is not a DNG configuration (DNGConfig.save writes {{\"dng\": {{...}}}})")
        return cls.from_dict(data["dng"])

    def describe(self) -> str:
        """The settings that differ from the default preset's, as NAME=VALUE (what a report shows)."""
        base = PRESETS["default"].to_dict()
        items = [f"{k}={_short(v)}" for k, v in self.to_dict().items() if base.get(k) != v]
        return ", ".join(items) or "the default preset"


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


PARAMETERS = tuple(f.name for f in fields(DNGConfig) if f.name != "_")

PRESETS = {
    # The exact score (lam0 1) with the schedule measured on the exact mixtures (docs/GMM.md).
    "default": DNGConfig(),
    # For users who want the concept gone: the least damaging lam0 of the measured frontier whose removal reaches the
    # classifier's floor, on Euler ancestral and DPM++ 2M SDE alike (docs/RESULTS.md, "The frontier").
    "strict": DNGConfig(4.0),
    # Koulischer et al. 2025, class removal on CIFAR-10 with a 1000-step DDPM.
    "paper-cifar10": DNGConfig(5.0, 0.01, 0.2, 0.0, offset_per_step=2e-4, p_max=0.8, late_boost=1.0,
                               boost_sigma=0.0, push_cap=0.0),
    # Koulischer et al. 2025, Stable Diffusion at CFG 7.5: lam0 12-27, temperature 0.2-0.3, offset 0.002-0.004.
    "paper-sd": DNGConfig(15.0, 0.01, 0.25, 0.0, offset_per_step=0.003, p_max=0.8, late_boost=1.0,
                          boost_sigma=0.0, push_cap=0.0),
}

# Our presets, which a model's calibration (`dng.calibration.ModelCalibration.apply`) applies to; the published ones
# run as published.
CALIBRATED_PRESETS = ("default", "strict")
