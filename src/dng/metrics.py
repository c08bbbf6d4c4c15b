"""Class-removal metrics: safety, class balance, FID and precision/recall on any feature extractor, artifacts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from dng.errors import ConfigError


class FeatureExtractor(Protocol):
    """Maps a batch of images (torch tensor) to a [N, D] feature matrix (tensor or array)."""

    def __call__(self, images): ...


def extract_features(extractor: FeatureExtractor, images, batch_size: int = 500) -> np.ndarray:
    """Features [N, D] in float64 of `images`, computed in batches without gradients."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feats = extractor(images[i : i + batch_size])
            feats = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
            out.append(feats.reshape(len(feats), -1).astype(np.float64))
    return np.concatenate(out)


def _as_set(classes: int | Iterable[int]) -> list[int]:
    return [int(classes)] if np.isscalar(classes) else [int(c) for c in classes]


def safety(pred_labels, removed: int | Iterable[int]) -> float:
    """Share of samples classified as a removed class (lower is safer)."""
    pred = np.asarray(pred_labels).ravel()
    if pred.size == 0:
        raise ConfigError("safety of an empty set of predictions")
    return float(np.isin(pred, _as_set(removed)).mean())


def class_kl(pred_labels, kept: Iterable[int], target_probs, smoothing: float = 0.5) -> float:
    """KL(target || generated) over the kept classes, both sides smoothed alike so that it stays finite.

    Samples classified as a class outside `kept` are left out; `target_probs` (probabilities or counts) follows
    the order of `kept` and is renormalised. `smoothing` pseudo-counts per class are added to the n generated
    samples and the target is smoothed as if it were n samples too: both are mixed with the uniform distribution
    at the weight K s / (n + K s), so a target equal to the generated shares (the unguided samples against
    themselves) has a KL of exactly 0. With no generated sample in a kept class the generated side is the uniform
    distribution and the target is left as it is.
    """
    kept = _as_set(kept)
    target = np.asarray(target_probs, dtype=np.float64)
    if target.shape != (len(kept),) or not np.isfinite(target).all() or (target < 0).any() or target.sum() <= 0:
        raise ConfigError(f"target_probs needs {len(kept)} finite non-negative entries, one per kept class")
    if not math.isfinite(smoothing) or smoothing < 0:
        raise ConfigError(f"smoothing must be a finite number >= 0, got {smoothing}")
    pred = np.asarray(pred_labels).ravel()
    counts = np.array([(pred == c).sum() for c in kept], dtype=np.float64)
    n, k = counts.sum(), len(kept)
    if n == 0 and smoothing == 0:
        raise ConfigError("no sample falls in a kept class and smoothing is 0: the KL is undefined")
    weight = k * smoothing / (n + k * smoothing)
    generated = (1 - weight) * (counts / max(n, 1)) + weight / k
    target = target / target.sum()
    if n:
        target = (1 - weight) * target + weight / k
    nz = target > 0
    if (generated[nz] == 0).any():
        return math.inf
    return float(np.sum(target[nz] * np.log(target[nz] / generated[nz])))


def class_distribution(labels, classes: Iterable[int]) -> np.ndarray:
    """Empirical distribution of `labels` over `classes` (e.g. the data's, as the class_kl target)."""
    labels = np.asarray(labels).ravel()
    counts = np.array([(labels == c).sum() for c in _as_set(classes)], dtype=np.float64)
    return counts / counts.sum()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    # Eigen-decomposition of the symmetrised matrix: stable where sqrtm of a near-singular product is not.
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = _sqrt_psd(s1)
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), whose argument is symmetric PSD.
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(0.0, np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of a feature matrix [N, D]."""
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ConfigError("FID needs a feature matrix [N, D] with N >= 2")
    return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def fid(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature matrices [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    # Column 0 of each sorted row is the point itself, so the k-th neighbour is column k.
    return np.sort(_pairwise(feats, feats), axis=1)[:, k]


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    """Share of `points` inside at least one ball (centre, radius)."""
    inside = [
        (_pairwise(points[i : i + chunk], centres) <= radii[None, :]).any(1) for i in range(0, len(points), chunk)
    ]
    return float(np.concatenate(inside).mean())


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019)."""
    real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} points in each set")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


# Grey level above which a pixel can belong to an object: above the shipped generator's faint background noise
# (99.5 % of its pixels away from the garment are 6 or less), below all but the faintest parts of dark garments.
OBJECT_LEVEL = 16
# Differences to the neighbourhood up to this many grey levels are noise, not specks: real backgrounds are exactly 0,
# the generator's sit at 1-4 (invisible), a haze that summed over a whole background would outweigh a real speck.
NOISE_LEVEL = 4


def _triples(a: np.ndarray, axis: int) -> list[np.ndarray]:
    """Each pixel's previous, own and next neighbour along `axis`, zero beyond the border."""
    padded = np.pad(a, [(1, 1) if i == axis else (0, 0) for i in range(a.ndim)])
    n = a.shape[axis]
    return [padded[(slice(None),) * axis + (slice(i, i + n),)] for i in range(3)]


def _median3(a, b, c):
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def median3x3(images: np.ndarray) -> np.ndarray:
    """3x3 median filter of images [N, H, W], zero beyond the border."""
    a, b, c = _triples(images, 1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    low, mid, high = np.minimum(lo, c), np.maximum(lo, np.minimum(hi, c)), np.maximum(hi, c)
    # With each column of three sorted, the median of the nine is the median of the largest low, the median middle
    # and the smallest high: a few dozen elementwise min/max instead of a sort.
    lows, highs = _triples(low, 2), _triples(high, 2)
    return _median3(np.maximum(np.maximum(lows[0], lows[1]), lows[2]), _median3(*_triples(mid, 2)),
                    np.minimum(np.minimum(highs[0], highs[1]), highs[2]))


def _box3(mask: np.ndarray) -> np.ndarray:
    """How many pixels of each 3x3 neighbourhood are set."""
    return sum(_triples(sum(_triples(mask.astype(np.uint8), 1)), 2))


def background_energy(images) -> np.ndarray:
    """Per image [N, H, W] (uint8, black background): sum over the background of (max(|x - median3x3(x)| -
    NOISE_LEVEL, 0) / 255)^2.

    The background is every pixel not next to an object pixel, one brighter than OBJECT_LEVEL with at least two such
    neighbours (so thin straps and soles count as object, an isolated bright pixel does not): one white speck adds
    about 1, a garment's own texture nothing.
    """
    x = np.asarray(images)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ConfigError(f"background_energy takes uint8 images [N, H, W], got {x.dtype} {x.shape}")
    bright = x > OBJECT_LEVEL
    background = _box3(bright & (_box3(bright) >= 3)) == 0
    residual = np.maximum(np.abs(x.astype(np.float32) - median3x3(x)) - NOISE_LEVEL, 0) / 255
    return np.where(background, residual**2, 0).sum((1, 2), dtype=np.float64)


def artifact_threshold(real_images, quantile: float = 0.99) -> float:
    """The `quantile` of real images' background energy: the level above which an image counts as speckled."""
    return float(np.quantile(background_energy(real_images), quantile))


def artifact_rate(images, threshold: float) -> float:
    """Share of images whose background energy is above `threshold` (from `artifact_threshold`)."""
    return float((background_energy(images) > threshold).mean())


def saturated_rate(images, real_images) -> float:
    """Share of uint8 images [N, H, W] with more pixels at full white than any of `real_images` has.

    A guidance scale far past the model's range drives samples into black-and-white noise, which a classifier still
    labels and whose features can still sit near real ones: such images make every other metric meaningless.
    """
    x, real = np.asarray(images), np.asarray(real_images)
    if x.ndim != 3 or real.ndim != 3 or x.dtype != np.uint8 or real.dtype != np.uint8:
        raise ConfigError(f"saturated_rate takes uint8 images [N, H, W], got {x.dtype} {x.shape} and {real.dtype} "
                          f"{real.shape}")
    most = (real == 255).mean((1, 2)).max()
    return float(((x == 255).mean((1, 2)) > most).mean())


# A set of images at least this share of which is saturated noise or speckled is degenerate: its other metrics
# describe noise, not the model's images. `dng demo`, `dng sample` and both benches flag such sets alike.
DEGENERATE_SHARE = 0.5


def degenerate(saturated_rate: float | None, artifact_rate: float | None) -> bool:
    """Whether a set with these shares of saturated (`saturated_rate`) and speckled (`artifact_rate`) images is
    degenerate (`DEGENERATE_SHARE`); an unknown share counts as 0."""
    return max(saturated_rate or 0.0, artifact_rate or 0.0) >= DEGENERATE_SHARE
