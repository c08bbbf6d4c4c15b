"""Fit DNG's prior, temperature and offset to a model: the tracked p_t should predict what the chain becomes.

Under the unguided chain, p_t(c-|x_t) is the probability that the sample the chain finishes is a c-. So draw
unguided samples with a tracking-only rule (scale 0, temperature 1, offset 0: the trace's llr is the raw
Gaussian log-ratio), label each finished sample (a classifier: did it become c-?), and fit

    log p_s = clamp(log p_{s-1} + temperature * llr_s + offset * (lambda_{s+1} - lambda_s))

with the tracker's own clamp (`dng.posterior.clamp_log_p`, independent or exclusive), starting from log prior, by
maximum likelihood of the labels pooled over steps. The label can also be the model's own verdict, a probability
p(c-|x0) from its two branches (`dng.verdict`; `self_calibrate` does it all), which needs no classifier.
Exact Bayes with exact kernels is temperature 1, offset 0 and the true prior; a model whose branches disagree
more than its samples do (an under-trained one, say) needs temperature < 1 and offset > 0, which this measures
instead of guessing. The offset is a drift per unit of log-SNR lambda = -2 log sigma (as in
`dng.config.DNGConfig`), so a fit made on one sampler and step count holds on the others.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dng.config import DNGConfig, check_concepts, check_probability
from dng.errors import ConfigError
from dng.posterior import clamp_log_p, log_snr_gain
from dng.verdict import DRAWS, MIDPOINT

# Fractions of the chain at which the discrimination of the fitted p_t is reported.
REPORT_AT = (0.25, 0.5, 0.75, 0.9)


@dataclass
class Calibration:
    """Fitted tracker settings: one prior per concept, one temperature and offset shared by all of them."""

    priors: list[float]
    temperature: float
    offset: float
    nll: float  # mean Bernoulli negative log-likelihood per (step, sample, concept), fitted
    baseline_nll: float  # the same for a constant p per concept equal to its share of the samples
    auc: dict  # fraction of the chain -> per concept, AUC of the fitted p_t for "finishes as the concept"
    positives: list[float]  # samples that became each concept (expected over soft labels)
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


# The unit of the offset, written into every calibration file so that one of another unit is never misread.
OFFSET_UNIT = "per unit of log-SNR"


@dataclass(frozen=True)
class ModelCalibration:
    """A model's fitted tracker, as DNG applies it: a prior per concept, one temperature and offset (per unit of
    log-SNR, so the same on every sampler and step count) and the p_max the fit was made with.

    `apply` is the one place where a calibration becomes DNG settings, whatever made it.
    """

    concepts: tuple[str, ...]
    priors: tuple[float, ...]
    temperature: float
    offset: float
    p_max: float

    def prior_of(self, concept: str) -> float | None:
        return self.priors[self.concepts.index(concept)] if concept in self.concepts else None

    def apply(self, config: DNGConfig, concepts: Sequence[str]) -> DNGConfig:
        """`config` with this calibration's temperature, offset and p_max, and the prior of each of `concepts` (a
        concept the calibration has no prior for keeps the config's). The calibrated offset replaces any per-step
        offset."""
        fallback = config.priors_for(len(concepts))
        priors = [own if own is not None else other
                  for own, other in zip(map(self.prior_of, concepts), fallback, strict=True)]
        return config.replace(prior=tuple(priors), temperature=self.temperature, offset=self.offset,
                              offset_per_step=0.0, p_max=self.p_max)

    @classmethod
    def read(cls, path) -> tuple[ModelCalibration, dict]:
        """The calibration a file written by `dng calibrate` holds (its joint fit "all"), and the file's entry."""
        path = Path(path)
        try:
            entry = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); delete it or rerun `dng calibrate`") from err
        if not isinstance(entry, dict) or entry.get("offset_unit") != OFFSET_UNIT:
            raise ConfigError(f"{path} is not a calibration whose offset is {OFFSET_UNIT} (an older per-step fit?); "
                              "delete it or rerun `dng calibrate`")
        try:
            fit = entry["fits"]["all"]
            calibration = cls(tuple(entry["classes"]), tuple(float(p) for p in fit["priors"]),
                              float(fit["temperature"]), float(fit["offset"]), float(entry["settings"]["p_max"]))
            if len(calibration.priors) != len(calibration.concepts):
                raise ValueError(f"{len(calibration.priors)} priors for {len(calibration.concepts)} concepts")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{path} is not a calibration file written by `dng calibrate` ({err!r}); "
                              "delete it or rerun the calibration") from err
        return calibration, entry


def log_snr_gains(sigma: torch.Tensor) -> torch.Tensor:
    """Every step's log-SNR gain as the tracker adds the offset over it (`dng.posterior.log_snr_gain`: 0 where it is
    not finite), from a trace's `sigma` [steps, 2]."""
    return torch.tensor([log_snr_gain(*map(float, levels)) for levels in sigma], dtype=torch.float64)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a positive outscores a negative (ties count half). A soft label y in [0, 1] counts its sample
    as a positive with weight y and as a negative with weight 1 - y, never against itself."""
    s = torch.as_tensor(scores, dtype=torch.float64).contiguous()
    y = torch.as_tensor(labels, dtype=torch.float64)
    order = s.argsort()
    # Negative weight below each score and up to it: their mean counts ties half.
    negative = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - y[order]).cumsum(0)])
    below = negative[torch.searchsorted(s[order], s, right=False)]
    upto = negative[torch.searchsorted(s[order], s, right=True)]
    own = y * (1 - y)
    pairs = y.sum() * (1 - y).sum() - own.sum()
    if pairs <= 0:
        return float("nan")
    return float(((y * (below + upto)).sum() / 2 - own.sum() / 2) / pairs)


def trajectory(log_prior, temperature, offset, llr, gains, p_min, p_max, exclusive=False):
    """log p_s [steps, samples, concepts] as the tracker computes it from the raw llr with this temperature and
    offset (per unit of log-SNR, over each step's gain) and its own clamp."""
    log_p, out = clamp_log_p(log_prior.expand(llr.shape[1:]), p_min, p_max, exclusive), []
    for s in range(llr.shape[0]):
        log_p = clamp_log_p(log_p + temperature * llr[s] + offset * gains[s], p_min, p_max, exclusive)
        out.append(log_p)
    return torch.stack(out)


def _bernoulli_nll(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(y * log_p + (1 - y) * torch.log1p(-log_p.exp())).mean()


def _chains(llr, gains, outcome):
    """llr [tracked steps, samples, concepts] and gains [tracked steps, 1, 1] in float64, outcome [samples, concepts]
    (float64 in [0, 1]), checked; steps whose llr is NaN (not tracked) carry no evidence and are dropped."""
    llr = torch.as_tensor(llr, dtype=torch.float64)
    outcome = torch.as_tensor(outcome, dtype=torch.float64)
    if not ((outcome >= 0) & (outcome <= 1)).all():
        raise ConfigError("outcomes must be labels in {0, 1} or probabilities in [0, 1] (NaN is neither)")
    if llr.dim() == 2:
        llr = llr[..., None]
    if outcome.dim() == 1:
        outcome = outcome[:, None]
    if (llr.dim() != 3 or llr.shape[1:] != outcome.shape or len(gains) != llr.shape[0]):
        raise ConfigError(f"need llr [steps, samples(, concepts)], gains [steps] and outcomes "
                          f"[samples(, concepts)]; got {tuple(llr.shape)}, {len(gains)} and {tuple(outcome.shape)}")
    keep = ~llr.isnan().flatten(1).any(1)
    return llr[keep], torch.as_tensor(gains, dtype=torch.float64)[keep, None, None], outcome


def _scores(log_p, outcome) -> tuple[float, float, dict]:
    """Bernoulli NLL of the trajectory, that of the constant share per concept, and the AUC at `REPORT_AT`."""
    y = outcome[None].expand_as(log_p)
    share = outcome.mean(0).clamp(1e-12, 1 - 1e-12)
    baseline = float(-(share * share.log() + (1 - share) * torch.log1p(-share)).mean())
    auc = {q: [roc_auc(log_p[min(len(log_p) - 1, int(q * len(log_p))), :, k], outcome[:, k])
               for k in range(outcome.shape[1])] for q in REPORT_AT}
    return float(_bernoulli_nll(log_p, y)), baseline, auc


def evaluate(priors, temperature: float, offset: float, llr, gains, outcome, p_min: float = DNGConfig.p_min,
             p_max: float = DNGConfig.p_max, exclusive: bool = False) -> dict:
    """How well a calibration made elsewhere (another sampler, step count or seed) predicts these chains' outcomes:
    {"nll", "baseline_nll", "auc"} as in `Calibration`, with its settings held fixed."""
    llr, gains, outcome = _chains(llr, gains, outcome)
    if len(priors) != outcome.shape[1]:
        raise ConfigError(f"{len(priors)} priors for {outcome.shape[1]} concepts; give one per concept")
    log_prior = torch.tensor([check_probability("prior", p) for p in priors], dtype=torch.float64).log()
    nll, baseline, auc = _scores(trajectory(log_prior, temperature, offset, llr, gains, p_min, p_max, exclusive),
                                 outcome)
    return {"nll": nll, "baseline_nll": baseline, "auc": auc}


def fit(llr: torch.Tensor, gains: torch.Tensor, outcome: torch.Tensor, p_min: float = DNGConfig.p_min,
        p_max: float = DNGConfig.p_max, exclusive: bool = False) -> Calibration:
    """Maximum-likelihood priors, temperature and offset from the raw llr and the samples' outcomes.

    `llr` is [steps, samples] or [steps, samples, concepts] (as in a trace), `outcome` [samples] or
    [samples, concepts]: did the sample finish as the concept, as labels (bool or 0/1) or probabilities (soft labels,
    e.g. `dng.verdict`'s p, fit by the likelihood expected over the labels they stand for). `gains` [steps] are the
    steps' log-SNR gains (`log_snr_gains(trace.sigma)`); steps whose llr is NaN (not tracked) carry no evidence and
    are dropped. `exclusive` fits concepts that are tracked as mutually exclusive (DNG's mode "exclusive", e.g.
    several classes of one classifier), whose clamp caps their total.
    """
    llr, gains, outcome = _chains(llr, gains, outcome)
    positives = outcome.sum(0)  # expected, for soft labels
    if (positives < 5).any() or (len(outcome) - positives < 5).any():
        raise ConfigError(f"{[round(p, 1) for p in positives.tolist()]} of {len(outcome)} samples became the "
                          "concept(s): calibration needs at least 5 of each outcome per concept; draw more samples")
    check_probability("p_min", p_min)
    check_probability("p_max", p_max)
    # Fit the total drift over the chain, whose scale is that of the llr, rather than the rate.
    unit = float(gains.sum())
    y = outcome[None].expand_as(llr)
    share = positives / len(outcome)
    concepts = outcome.shape[1]
    # Start from the constant-p baseline (temperature 0): the fit can then only improve on it.
    params = torch.cat([share.log(), torch.zeros(2, dtype=torch.float64)]).requires_grad_()

    def fitted():
        return trajectory(params[:concepts], params[concepts], params[concepts + 1] / unit, llr, gains, p_min,
                          p_max, exclusive)

    opt = torch.optim.LBFGS([params], max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _bernoulli_nll(fitted(), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll, baseline, auc = _scores(fitted(), outcome)
    return Calibration(priors=clamp_log_p(params[:concepts].detach(), p_min, p_max, exclusive).exp().tolist(),
                       temperature=float(params[concepts].detach()), offset=float(params[concepts + 1].detach()) / unit,
                       nll=nll, baseline_nll=baseline, auc=auc, positives=positives.tolist(), samples=len(outcome))


def tracking_only():
    """A DNG rule that only tracks: scale 0 leaves the chain unguided, temperature 1 and offset 0 make the trace's llr
    the raw Gaussian log-ratio that `fit` takes."""
    from dng.guidance import DynamicNegativeGuidance

    return DynamicNegativeGuidance(DNGConfig(0.0, 0.5, 1.0, 0.0, p_min=1e-30, p_max=1 - 1e-6, sigma_min=0.0))


def check_replayable(scheduler) -> None:
    """Refuse chains whose trace does not replay the tracker, as `fit` replays it (p after a step = clamp(p before +
    its llr)): on a scheduler that restarts its stages (`dng.schedulers.restarts_stages`), every later step of a
    stage, and the tracker, start again from the stage's first sample and the p held there."""
    from dng.schedulers import restarts_stages

    if restarts_stages(scheduler):
        raise ConfigError(
            f"calibration chains cannot be drawn with DPMSolverSinglestepScheduler at solver_order "
            f"{scheduler.config.solver_order}: each stage restarts from its first sample, so the trace does not replay "
            f"the tracker step by step. Calibrate with its multistep sibling (DPMSolverMultistepScheduler.from_config("
            f"scheduler.config)) or with solver_order=1; the calibration is the model's, and applies on this "
            f"sampler too")


# Who labelled the finished samples the fit was made from, and what kind of model a calibration file was made for.
LABEL_SOURCES = ("model", "classifier")
MODEL_KINDS = ("generator", "diffusers")


def model_record(kind: str, path, weights_sha256: str | None = None) -> dict:
    """The `"model"` entry of a calibration file: {"kind", "path", "weights_sha256"}. `kind` is "generator" (a dng
    generator file, whose sha256 `dng.vision.models.weights_sha256` gives) or "diffusers" (a diffusers folder, whose
    sha256 is None: hashing gigabytes of weights at every load would cost more than the check is worth)."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    return {"kind": kind, "path": None if path is None else str(path), "weights_sha256": weights_sha256}


def calibration_entry(fits: dict, concepts: Sequence[str], settings: dict, *, model: dict, labels: str,
                      **extra) -> dict:
    """A calibration file's content, as `ModelCalibration.read` reads it back: the joint fit `fits["all"]` (name ->
    `Calibration`; others are kept for reference), the `concepts` it has priors for (in order; the file's
    "classes"), the `settings` it was made with (they must hold its p_max), the `model` it was made for
    (`model_record`), who gave its `labels` (`LABEL_SOURCES`), and any `extra` entries."""
    if "p_max" not in settings or "all" not in fits:
        raise ConfigError("a calibration needs the joint fit 'all' and the p_max it was made with")
    if len(fits["all"].priors) != len(concepts):
        raise ConfigError(f"the joint fit has {len(fits['all'].priors)} priors for {len(concepts)} concepts")
    if labels not in LABEL_SOURCES:
        raise ConfigError(f"labels must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    if not isinstance(model, dict) or set(model) != {"kind", "path", "weights_sha256"}:
        raise ConfigError(f"model must be a model_record(kind, path, weights_sha256), got {model!r}")
    return {"offset_unit": OFFSET_UNIT, "model": model, "labels": labels, "settings": settings,
            "classes": list(concepts), "fits": {name: fit.as_dict() for name, fit in fits.items()}, **extra}


@dataclass
class SelfCalibration:
    """What `self_calibrate` (or `dng.pipelines.calibrate_pipeline`) made: the calibration to apply, its fit, and the
    chains and verdict it was fitted to; `settings` (what it was made with) and `model` (`model_record`, if known)
    are what `save` writes beside the fit."""

    calibration: ModelCalibration
    fit: Calibration
    verdict: object  # dng.verdict.Verdict of the chains' finished samples
    samples: torch.Tensor
    trace: object  # dng.sampler.Trace of the chains
    settings: dict = field(default_factory=dict)
    model: dict | None = None

    def save(self, path, model: dict | None = None) -> Path:
        """Write the calibration file that `ModelCalibration.read` (and every command's --calibration) reads, for
        `model` (`model_record`; default: the one this result records)."""
        from dng.io import write_json

        model = model if model is not None else self.model
        if model is None:
            raise ConfigError("say which model this calibration was made for: save(path, model=model_record(kind, "
                              "path, weights_sha256))")
        entry = calibration_entry({"all": self.fit}, self.calibration.concepts,
                                  {**self.settings, "p_max": self.calibration.p_max}, model=model, labels="model")
        return write_json(Path(path), entry)


def fit_to_verdict(model, samples: torch.Tensor, trace, path, concepts: Sequence[str], *, exhaustive: bool = False,
                   priors=None, p_max: float = DNGConfig.p_max, exclusive: bool = False, draws: int = DRAWS,
                   midpoint: float = MIDPOINT, batch_size: int = 64, generator: torch.Generator | None = None,
                   progress: bool = True) -> SelfCalibration:
    """Label the finished `samples` of tracked unguided chains (`trace`, as a tracking-only rule records it) with
    the model's verdict (`dng.verdict.verdict` of the branches `model(x, t)`, [unconditional, concept 1..K], on the
    noising `path`) and `fit` the tracker to it: the second half of `self_calibrate`, for chains drawn elsewhere
    (e.g. by a diffusers pipeline)."""
    from dng.verdict import verdict

    judged = verdict(model, samples, path, len(concepts), priors=priors, exhaustive=exhaustive, draws=draws,
                     midpoint=midpoint, batch_size=batch_size, generator=generator, progress=progress)
    fitted = fit(trace.llr, log_snr_gains(trace.sigma), judged.p, p_max=p_max, exclusive=exclusive)
    calibration = ModelCalibration(tuple(concepts), tuple(fitted.priors), fitted.temperature, fitted.offset, p_max)
    settings = {"draws": draws, "midpoint": midpoint, "exhaustive": exhaustive, "exclusive": exclusive,
                "verdict_priors": judged.priors.tolist(), "samples": len(samples)}
    return SelfCalibration(calibration, fitted, judged, samples, trace, settings)


def self_calibrate(model, scheduler, noise: torch.Tensor, concepts: Sequence[str], *, exhaustive: bool = False,
                   priors=None, num_inference_steps: int = 25, eta: float = 0.0,
                   generator: torch.Generator | None = None, p_max: float = DNGConfig.p_max, exclusive: bool = False,
                   draws: int = DRAWS, midpoint: float = MIDPOINT, batch_size: int = 64, progress: bool = True,
                   set_timesteps_kwargs: dict | None = None) -> SelfCalibration:
    """DNG's tracker fitted to any model from its own branches, no classifier: unguided chains from `noise` with a
    tracking-only rule, each finished sample labelled by the model's verdict (`dng.verdict`), and `fit` with the
    verdict's p(c|x0) as soft labels (`fit_to_verdict`).

    `model(x, t)` evaluates the branches [unconditional, concept 1..K] of the K `concepts` (names, which key the
    calibration) in one call, as `dng.sampler.sample` calls it; `scheduler` is a stochastic diffusers scheduler DNG
    tracks (with its `eta`), whose config also gives the verdict its noising path (`dng.verdict.path_of`).
    `exhaustive`: the concepts partition the model (a class-conditional model's classes), so the verdict finds their
    priors itself; otherwise give `priors`, each concept's share of the model's samples. `exclusive` fits the clamp of
    DNG's exclusive mode. `generator` draws the chains' noise, then the verdict's. Cost per image:
    `num_inference_steps + draws` model calls of 1 + K branches. `.save(path, model=model_record(...))` writes the
    calibration file. For a diffusers Stable Diffusion pipeline, `dng.pipelines.calibrate_pipeline` does the same
    through the pipeline's call.
    """
    from dng.sampler import sample
    from dng.verdict import path_of

    concepts = check_concepts(concepts)
    check_replayable(scheduler)
    path = path_of(scheduler)  # before sampling: a scheduler the verdict cannot read fails fast
    out = sample(model, scheduler, tracking_only(), noise=noise, num_inference_steps=num_inference_steps,
                 num_negatives=len(concepts), eta=eta, generator=generator, progress=progress, return_trace=True,
                 set_timesteps_kwargs=set_timesteps_kwargs)
    made = fit_to_verdict(model, out.samples, out.trace, path, concepts, exhaustive=exhaustive, priors=priors,
                          p_max=p_max, exclusive=exclusive, draws=draws, midpoint=midpoint, batch_size=batch_size,
                          generator=generator, progress=progress)
    made.settings.update(steps=num_inference_steps, scheduler=type(scheduler).__name__, eta=eta)
    return made


def recorded_model(entry: dict) -> dict | None:
    """The model a calibration file's entry records it was made for (`model_record`: {"kind", "path",
    "weights_sha256"}); an older generator file's "generator_sha256" reads as a generator's; None where the entry
    records no model."""
    model = entry.get("model")
    if isinstance(model, dict):
        return {"kind": model.get("kind"), "path": model.get("path"), "weights_sha256": model.get("weights_sha256")}
    if entry.get("generator_sha256"):
        return {"kind": "generator", "path": None, "weights_sha256": entry["generator_sha256"]}
    return None


def _model_name(path) -> str:
    """A model's final folder (or file) name, which a diffusers model is compared by."""
    return Path(str(path).rstrip("/\\")).name


def load_calibration_file(path, model: dict | None = None) -> tuple[ModelCalibration, dict]:
    """The calibration a file written by `dng calibrate` holds, and its entry, checked against the `model` it is
    about to be applied to (described as the file records one, `recorded_model`; None: no check).

    A generator ({"kind": "generator", "path", "weights_sha256"}) must be the weights the file was made for: a file
    made for other weights, or for a diffusers model, is refused. A diffusers model ({"kind": "diffusers", "path":
    its folder or name}) is compared by its final folder name only (hashing its weights on every call would cost
    more than sampling): a mismatch is logged as a warning, and the calibration applied.
    """
    import logging

    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"calibration file {path} {what}; give the JSON file `dng calibrate` wrote")
    try:
        calibration, entry = ModelCalibration.read(path)
    except OSError as err:
        raise ConfigError(f"cannot read the calibration file {path} ({err.strerror or err})") from None
    if model is None:
        return calibration, entry
    log = logging.getLogger(__name__)
    kind, where = model.get("kind"), model.get("path")
    recorded = recorded_model(entry)
    if kind == "generator":
        fix = (f"rerun `dng calibrate --generator {where}` for these weights, or pass --calibration none to run "
               "uncalibrated")
        if recorded is None or (recorded["kind"] == "generator" and recorded["weights_sha256"] is None):
            log.warning("%s records no weights it was made for; applying it to %s as given", path, where)
        elif recorded["kind"] != "generator":
            raise ConfigError(f"{path} was made for the {recorded['kind']} model {recorded['path']}, not for the "
                              f"generator {where}: {fix}")
        elif recorded["weights_sha256"] != model.get("weights_sha256"):
            made_for = f" ({recorded['path']})" if recorded["path"] else ""
            raise ConfigError(f"{path} was made for other weights{made_for} than the generator {where}: {fix}")
    elif recorded is not None and where:
        if recorded["kind"] != kind:
            log.warning("%s was made for the %s model %s, not for the %s model %s; applying it anyway", path,
                        recorded["kind"], recorded["path"], kind, where)
        elif recorded["path"] and _model_name(recorded["path"]) != _model_name(where):
            log.warning("%s was made for the model %s, not %s; applying it anyway (rerun `dng calibrate` for this "
                        "model to fit its own)", path, recorded["path"], where)
    return calibration, entry
