"""How good is the model's own verdict (`dng.verdict`)? Against the exact log-likelihood ratio on the Gaussian mixture,
and against the shipped classifier on the shipped generator.

Gaussian mixtures (the default one and the tests' overlapping one): the error of `log_ratios` at 8..128 draws against
its exact target: for the likelihood weighting the exact log p(x0|c) - log p(x0), for the default weighting the exact
expected log-ratio of the noisy copies it reads (from the mixture's closed form); and the error of the exhaustive
verdict's p(c|x0) against the exact posterior, with the true priors and with the verdict's own.

Fashion-MNIST: unguided samples (Euler ancestral, 25 steps), the verdict of all ten class branches at the default
draws, against the shipped classifier's labels: per class the AUC of p, the model's own prior against the
classifier's share and the mean p; a reliability table; argmax agreement; wall time and model calls per image; and,
against the classifier (which the verdict cannot do without labels), how a temperature on the log-ratio would fare.
The weighting comparison: one more set of draws shared by every candidate weighting, reweighted to each.

Run: OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/verdict_quality.py --out runs/verdict-quality.json
     (--part gmm, generator or weightings for one of the three)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from dng.calibration import roc_auc
from dng.gmm import GaussianMixture, default_mixture_config
from dng.io import write_json
from dng.verdict import (
    DRAWS,
    MIDPOINT,
    DiffusionPath,
    branch_errors,
    log_ratios,
    path_of,
    probabilities,
    signal,
    stratified,
    weighting,
)
from dng.vision.branches import ClassBranches
from dng.vision.data import CLASS_NAMES, NUM_CLASSES
from dng.vision.generate import generate
from dng.vision.images import classify, to_uint8
from dng.vision.models import NULL_LABEL, generator_sampler, load_classifier, load_generator
from dng.vision.seeding import seeded_noise

GMM_DRAWS = (8, 16, 32, 64, 128)
TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0)


def exact_log_ratio(gmm, path, x, lam, classes):
    """log p_lam(x|c) - log p_lam(x) of the mixture at log-SNR lam (math.inf: the clean data), [N, len(classes)]."""
    joint = gmm.log_joint(x, -1 if lam == math.inf else path.timestep(lam))
    return joint[:, classes] - gmm.weights[classes].log() - joint.logsumexp(-1, keepdim=True)


def exact_target(gmm, path, x0, midpoint, classes, generator, grid=200, pairs=32):
    """What `log_ratios` estimates, exactly: int w dG with G(lam) = E_z[log-ratio of the noisy copy z at lam]
    (Kingma & Gao 2023), = w G at the ends + int (-dw/dlam) G."""

    def expected(lam):
        a, s = path.scales(lam)
        total = 0
        for _ in range(pairs):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            total = total + sum(exact_log_ratio(gmm, path, a * x0 + sign * s * eps, lam, classes) for sign in (1, -1))
        return total / (2 * pairs)

    if midpoint == math.inf:
        return expected(path.lam_max) - expected(path.lam_min)
    lams = np.linspace(path.lam_min, path.lam_max, grid)
    w = weighting(lams, midpoint)
    g = torch.stack([expected(float(lam)) for lam in lams]).numpy()
    inner = np.trapezoid((w * (1 - w))[:, None, None] * g, lams, axis=0)
    return torch.from_numpy(w[-1] * g[-1] - w[0] * g[0] + inner)


def mixtures(alphas_cumprod) -> dict:
    """The default mixture (ten classes, log-ratios of hundreds of nats) and the tests' overlapping one (four classes
    in 16 dimensions, log-ratios of a few nats, a fifth of the samples ambiguous)."""
    cfg = default_mixture_config()
    g = torch.Generator().manual_seed(0)
    means = 0.35 * torch.randn(4, 16, generator=g, dtype=torch.float64) / math.sqrt(2)
    return {"default": GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], alphas_cumprod, torch.float64),
            "overlapping": GaussianMixture(means, [0.5] * 4, [0.4, 0.3, 0.2, 0.1], alphas_cumprod, torch.float64)}


def gmm_table(n: int, seed: int) -> dict:
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    path = DiffusionPath(scheduler.alphas_cumprod)
    out = {}
    for name, gmm in mixtures(scheduler.alphas_cumprod).items():
        g = torch.Generator().manual_seed(seed)
        x0, _ = gmm.sample(n, generator=g)
        classes = list(range(min(3, gmm.num_classes)))
        scale = float(exact_log_ratio(gmm, path, x0, math.inf, classes).abs().median())
        print(f"\n{name} mixture, {n} samples, classes {classes} (median |exact log-ratio| {scale:.1f}): error of "
              "log_ratios against its exact target; mean |p - exact posterior| of the exhaustive verdict with the true "
              "priors and with its own")
        print(f"{'weighting':<22} {'draws':>5} {'mean error':>10} {'sd':>7} {'median |err|':>12} {'p error':>8} "
              f"{'own priors':>10}")
        everything = list(range(gmm.num_classes))
        exact_p = gmm.posterior(x0)
        rows = []
        for midpoint in (math.inf, MIDPOINT):
            target = exact_target(gmm, path, x0, midpoint, classes, g)
            label = "likelihood (w = 1)" if midpoint == math.inf else f"sigmoid({midpoint:g} - lam)"
            for draws in GMM_DRAWS:
                # Batches of 10: each has its own stratified noise levels, so the errors are nearly independent.
                est = log_ratios(gmm.branch_model(everything), x0, path, gmm.num_classes, midpoint=midpoint,
                                 draws=draws, batch_size=10, generator=g, progress=False)
                err = (est[:, classes] - target).flatten()
                p_err = float((probabilities(est, gmm.weights, exhaustive=True).p - exact_p).abs().mean())
                own = float((probabilities(est, exhaustive=True).p - exact_p).abs().mean())
                rows.append({"midpoint": midpoint, "draws": draws, "mean_error": float(err.mean()),
                             "sd": float(err.std()), "median_abs": float(err.abs().median()),
                             "p_mean_abs_error": p_err, "p_mean_abs_error_own_priors": own})
                print(f"{label:<22} {draws:>5} {err.mean():10.3f} {err.std():7.3f} {err.abs().median():12.3f} "
                      f"{p_err:8.4f} {own:10.4f}")
        out[name] = {"samples": n, "classes": classes, "median_abs_log_ratio": scale, "rows": rows}
    return out


def scores(p: torch.Tensor, log_ratio: torch.Tensor, labels: np.ndarray) -> dict:
    """The verdict against the classifier's labels."""
    y = torch.from_numpy(labels[:, None] == np.arange(NUM_CLASSES)[None]).double()
    share = y.mean(0)
    clipped = p.clamp(1e-9, 1 - 1e-9)
    nll = float(-(y * clipped.log() + (1 - y) * (1 - clipped).log()).mean())
    base = float(-(share * share.log() + (1 - share) * (1 - share).log()).mean())
    bins = (p.flatten() * 10).long().clamp(max=9)
    reliability = [{"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "count": int((bins == b).sum()),
                    "mean_p": float(p.flatten()[bins == b].mean()), "share": float(y.flatten()[bins == b].mean())}
                   for b in range(10) if (bins == b).any()]
    ece = sum(r["count"] * abs(r["mean_p"] - r["share"]) for r in reliability) / p.numel()
    return {"auc_p": [roc_auc(p[:, k], y[:, k]) for k in range(NUM_CLASSES)],
            "auc_log_ratio": [roc_auc(log_ratio[:, k], y[:, k]) for k in range(NUM_CLASSES)],
            "share": share.tolist(), "mean_p": p.mean(0).tolist(), "nll": nll, "baseline_nll": base,
            "brier": float(((p - y) ** 2).mean()), "ece": ece, "reliability": reliability,
            "argmax_agreement": float((p.argmax(1).numpy() == labels).mean())}


def unguided(args):
    """The generator, its unguided samples at the benchmark's settings, their classifier labels and the sampling's
    wall time."""
    unet, classifier = load_generator(), load_classifier()
    noise = seeded_noise(args.seed, 0, args.num_samples)
    start = time.perf_counter()
    x0, _ = generate(unet, noise, scheduler="euler-a", guidance=None, negatives=[], steps=args.steps, seed=args.seed,
                     dtype=args.dtype)
    return unet, x0, classify(classifier, to_uint8(x0))[0], time.perf_counter() - start


def weightings(args) -> dict:
    """Every candidate weighting from one set of model calls: 2 DRAWS draws per image from the mean of the candidates'
    own draw densities (w alpha, as `noise_levels` draws), so that each gets a share of draws where it weighs,
    reweighted to each candidate."""
    unet, x0, labels, _ = unguided(args)
    model = ClassBranches(unet, [NULL_LABEL, *range(NUM_CLASSES)], args.dtype)
    path = path_of(generator_sampler("euler-a").scheduler)
    generator = torch.Generator().manual_seed(args.seed + 1)
    grid = np.linspace(path.lam_min, path.lam_max, 4097)
    dt = np.abs(np.gradient([path.timestep(lam) for lam in grid], grid))
    # Uniform in the timestep (Li et al. 2023), scaled to the likelihood weighting's total: not a log-ratio.
    uniform_t = dt * (grid[-1] - grid[0]) / np.trapezoid(dt, grid)
    candidates = {"likelihood (w = 1)": lambda lam: np.ones_like(lam),
                  "uniform in t": lambda lam: np.interp(lam, grid, uniform_t),
                  "step: lam < 1": lambda lam: (lam < 1).astype(float)}
    candidates.update({f"sigmoid({m:g} - lam)": (lambda lam, m=m: weighting(lam, m)) for m in (-1, 0, 1, 2, 4)})
    own = [weight(grid) * signal(grid) for weight in candidates.values()]
    density = sum(d / np.trapezoid(d, grid) for d in own) / len(own)
    parts, lam_all, dens_all = [], [], []
    for start in range(0, len(x0), 50):
        xb = x0[start : start + 50]
        lams, dens = stratified(grid, density, DRAWS, float(torch.rand((), generator=generator)))
        errors = []
        for lam in lams:
            eps = torch.randn(xb.shape, generator=generator)
            errors.append(sum(branch_errors(model, xb, path, NUM_CLASSES, float(lam), sign * eps) for sign in (1, -1)))
        parts.append(torch.stack(errors))  # [levels, batch, K], summed over the sign pair
        lam_all.append(np.repeat(lams[:, None], len(xb), 1))
        dens_all.append(np.repeat(dens[:, None], len(xb), 1))
    errors, lams, dens = torch.cat(parts, 1), np.concatenate(lam_all, 1), np.concatenate(dens_all, 1)
    torch.save({"errors": errors, "lams": torch.from_numpy(lams), "density": torch.from_numpy(dens),
                "labels": torch.from_numpy(labels)}, Path(args.out).with_suffix(".weightings.pt"))
    out = {}
    print(f"\nWeightings, {len(x0)} samples, {2 * DRAWS} draws per image shared by all: mean and worst AUC of the "
          "log-ratio; argmax agreement, NLL over the constant share's and ECE of the exhaustive verdict; "
          "|own prior - share|; NLL over the constant share's after the E[r] = 1 shift")
    print(f"{'weighting':<22} {'mean AUC':>8} {'min AUC':>7} {'argmax':>6} {'nll/base':>8} {'ECE':>6} "
          f"{'|prior-share|':>13} {'shifted':>7}")
    for name, weight in candidates.items():
        factor = torch.from_numpy(weight(lams) / dens)[..., None]
        log_ratio = (factor * errors).sum(0) / (2 * DRAWS)
        verdict = probabilities(log_ratio, exhaustive=True)
        row = scores(verdict.p, log_ratio, labels)
        # The lead of issue 26: shift each concept's log-ratio so that its mean ratio over unguided samples is 1.
        shifted = log_ratio - log_ratio.logsumexp(0) + math.log(len(log_ratio))
        row["shifted"] = scores(probabilities(shifted, exhaustive=True).p, shifted, labels)
        row["priors"] = verdict.priors.tolist()
        out[name] = row
        gap = float((verdict.priors - torch.tensor(row["share"])).abs().mean())
        print(f"{name:<22} {np.mean(row['auc_log_ratio']):8.3f} {np.min(row['auc_log_ratio']):7.3f} "
              f"{row['argmax_agreement']:6.2f} {row['nll'] / row['baseline_nll']:8.3f} {row['ece']:6.3f} {gap:13.3f} "
              f"{row['shifted']['nll'] / row['shifted']['baseline_nll']:7.3f}")
    return out


def generator_table(args) -> dict:
    unet, x0, labels, sampling = unguided(args)
    model = ClassBranches(unet, [NULL_LABEL, *range(NUM_CLASSES)], args.dtype)
    path = path_of(generator_sampler("euler-a").scheduler)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    log_ratio = log_ratios(model, x0, path, NUM_CLASSES, generator=g)
    wall = time.perf_counter() - start
    verdict = probabilities(log_ratio, exhaustive=True)
    row = scores(verdict.p, log_ratio, labels)
    row.update(priors=verdict.priors.tolist(), seconds_per_image=wall / len(x0),
               sampling_seconds_per_image=sampling / len(x0), model_calls_per_image=DRAWS,
               branches_per_call=NUM_CLASSES + 1)
    print(f"\nShipped generator: {len(x0)} unguided samples, Euler ancestral {args.steps} steps; verdict of the ten "
          f"classes at {DRAWS} draws ({DRAWS} calls of {NUM_CLASSES + 1} branches per image), {args.dtype}")
    print(f"{'class':<12} {'AUC':>5} {'share':>6} {'prior':>6} {'mean p':>6}")
    for k, name in enumerate(CLASS_NAMES):
        print(f"{name:<12} {row['auc_p'][k]:5.3f} {row['share'][k]:6.3f} {row['priors'][k]:6.3f} "
              f"{row['mean_p'][k]:6.3f}")
    print(f"mean AUC {np.mean(row['auc_p']):.3f} (of the log-ratio {np.mean(row['auc_log_ratio']):.3f}); argmax "
          f"agrees with the classifier on {row['argmax_agreement']:.0%}; NLL {row['nll']:.3f} (constant share "
          f"{row['baseline_nll']:.3f}), Brier {row['brier']:.4f}, ECE {row['ece']:.3f}")
    print("reliability (all classes pooled): " + "; ".join(
        f"{r['bin']}: {r['count']} at p {r['mean_p']:.2f}, share {r['share']:.2f}" for r in row["reliability"]))
    print(f"wall time {wall / len(x0):.2f} s per image (sampling {sampling / len(x0):.2f} s)")
    row["temperature"] = {}
    for t in TEMPERATURES:
        tempered = scores(probabilities(t * log_ratio, exhaustive=True).p, log_ratio, labels)
        row["temperature"][t] = {k: tempered[k] for k in ("nll", "ece", "argmax_agreement")}
    print("temperature on the log-ratio, NLL against the classifier: " + ", ".join(
        f"{t:g}: {r['nll']:.3f}" for t, r in row["temperature"].items()))
    # The raw log-ratios, for analyses beyond these tables.
    torch.save({"log_ratio": log_ratio, "labels": torch.from_numpy(labels)}, Path(args.out).with_suffix(".pt"))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gmm-samples", type=int, default=200)
    parser.add_argument("--part", choices=("all", "gmm", "generator", "weightings"), default="all")
    parser.add_argument("--out", default="runs/verdict-quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "draws": DRAWS, "midpoint": MIDPOINT}
    if args.part in ("all", "gmm"):
        result["gmm"] = gmm_table(args.gmm_samples, args.seed)
    if args.part in ("all", "generator"):
        result["generator"] = generator_table(args)
    if args.part in ("all", "weightings"):
        result["weightings"] = weightings(args)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
