"""Metrics against values computed by hand or in closed form."""

import math

import numpy as np
import pytest
import torch

from dng import metrics
from dng.errors import ConfigError


def test_safety_counts_removed_classes():
    pred = [0, 1, 3, 3, 5]
    assert metrics.safety(pred, 3) == pytest.approx(0.4)
    assert metrics.safety(np.array(pred), {3, 5}) == pytest.approx(0.6)
    assert metrics.safety(pred, 7) == 0.0


def test_class_kl_by_hand():
    # Generated over kept {0, 1}: 3 and 1 (the class-4 sample is left out) -> (3/4, 1/4) against (1/2, 1/2).
    pred = [0, 0, 0, 1, 4]
    assert metrics.class_kl(pred, [0, 1], [0.5, 0.5], smoothing=0) == pytest.approx(0.5 * math.log(4 / 3))
    # Smoothing 1 -> (4/6, 2/6).
    assert metrics.class_kl(pred, [0, 1], [1, 1], smoothing=1) == pytest.approx(0.5 * math.log(9 / 8))
    # A kept class never generated stays finite under smoothing: counts (2, 0, 1) + 0.5.
    got = metrics.class_kl([0, 0, 2], [0, 1, 2], [1, 1, 1], smoothing=0.5)
    gen = np.array([2.5, 0.5, 1.5]) / 4.5
    assert got == pytest.approx(np.sum(np.log((1 / 3) / gen)) / 3)
    assert metrics.class_kl([0, 1, 2] * 5, [0, 1, 2], [1, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    assert math.isinf(metrics.class_kl([0, 0], [0, 1], [0.5, 0.5], smoothing=0))
    with pytest.raises(ConfigError, match="one per kept class"):
        metrics.class_kl([0], [0, 1], [1.0])


def test_class_kl_smooths_both_sides_alike():
    # A distribution against itself is exactly 0, whatever its shares and sample size (one-sided smoothing gave the
    # unguided row a KL of 0.064 to itself at 24 samples).
    for counts in ([7, 20, 10, 0], [1, 0, 0, 1], [3, 17, 4, 0]):
        assert metrics.class_kl(np.repeat(np.arange(4), counts), range(4), counts) == 0.0
    # By hand: generated (3, 1) and target (0.9, 0.1), both mixed with the uniform at K s / (n + K s) = 1/5.
    generated, target = np.array([0.7, 0.3]), np.array([0.82, 0.18])
    assert metrics.class_kl([0, 0, 0, 1], [0, 1], [0.9, 0.1]) == pytest.approx(
        float(np.sum(target * np.log(target / generated))), rel=1e-12)
    # No sample in a kept class: the uniform against the target as given.
    assert metrics.class_kl([5, 5], [0, 1], [0.9, 0.1]) == pytest.approx(
        0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-12)


@pytest.mark.parametrize("call", [
    lambda: metrics.safety([], 1),
    lambda: metrics.class_kl([0], [0, 1], [0.5, 0.5], smoothing=float("nan")),
    lambda: metrics.class_kl([2], [0, 1], [0.5, 0.5], smoothing=0),
    lambda: metrics.fid(np.zeros((1, 3)), np.zeros((5, 3))),
    lambda: metrics.precision_recall(np.zeros((3, 2)), np.zeros((9, 2))),
    lambda: metrics.background_energy(np.zeros((2, 28, 28), np.float32)),
])
def test_bad_metric_input_is_a_config_error(call):
    with pytest.raises(ConfigError):
        call()


def test_class_distribution():
    assert metrics.class_distribution([0, 0, 1, 2, 9], [0, 1, 2]).tolist() == [0.5, 0.25, 0.25]


def test_frechet_distance_closed_forms():
    # Diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 = 5 + 1 + 1.
    assert metrics.frechet_distance([0, 0], np.diag([1, 4]), [1, 2], np.diag([4, 1])) == pytest.approx(7.0)
    # S1 = [[2,1],[1,2]] (eigenvalues 3, 1) against I: tr S1 + 2 - 2 tr sqrt(S1) = 6 - 2 (sqrt 3 + 1).
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert metrics.frechet_distance([0, 0], s1, [0, 0], np.eye(2)) == pytest.approx(4 - 2 * math.sqrt(3))
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations 1 and 3.
    assert metrics.frechet_distance([1.0], [[1.0]], [4.0], [[9.0]]) == pytest.approx(9 + 4)
    # Singular covariances stay finite and symmetric.
    flat = np.diag([1.0, 0.0])
    assert metrics.frechet_distance([0, 0], flat, [0, 0], np.eye(2)) == pytest.approx(1.0)


def test_frechet_distance_matches_scipy_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 2)) * [1, 2]
    b = rng.normal(size=(20000, 2)) * [2, 1] + [1, 2]
    assert metrics.fid(a, b) == pytest.approx(7.0, rel=0.05)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0]])
    # k=1 radii: real 1,1,1,1,7 -> 0.5 and 5 (within 7 of 10) are covered, 20 is not.
    # fake 4.5, 4.5, 15 -> every real point is covered (10 via the ball of 20).
    assert metrics.precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    # k=3 on the unit square's corners plus a far point: real radii are sqrt 2 for the corners, 10 for the far one.
    square = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [10, 0]], dtype=float)
    shifted = square[:4] + [0.5, 0.5]
    fake = np.vstack([shifted, [[30, 0]]])
    p, r = metrics.precision_recall(square, fake, k=3)
    assert p == pytest.approx(4 / 5)  # (30, 0) is 20 from (10, 0), beyond its radius 10
    assert r == pytest.approx(1.0)  # fake radii: sqrt 2 for the shifted corners, about 29.5 for the far one
    assert metrics.precision_recall(square, square, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError):
        metrics.precision_recall(square[:3], square, k=3)


def test_extract_features_accepts_any_callable_in_batches():
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    calls = []

    def extractor(batch):
        calls.append(len(batch))
        return torch.cat([batch.flatten(1), 2 * batch.flatten(1)], dim=1)

    feats = metrics.extract_features(extractor, images, batch_size=4)
    assert calls == [4, 4, 2] and feats.dtype == np.float64
    assert feats[:, 1].tolist() == [2.0 * i for i in range(10)]
    numpy_feats = metrics.extract_features(lambda b: b.numpy().reshape(len(b), -1), images, batch_size=3)
    assert numpy_feats[:, 0].tolist() == list(range(10))


def _garment():
    """A 28x28 black image holding a textured square, a one-pixel strap and a dim patch, all of it object."""
    image = np.zeros((28, 28), np.uint8)
    image[4:14, 4:14] = np.where(np.indices((10, 10)).sum(0) % 2, 255, 40)  # hard checkerboard texture
    image[16, 4:20] = 255  # a thin strap: the median filter alone would wipe it out
    image[20:24, 4:8] = 20  # a dark garment part, just above OBJECT_LEVEL
    return image


def test_background_energy_counts_isolated_specks_not_garments():
    clean = _garment()
    assert metrics.median3x3(clean[None])[0, 16, 10] == 0  # the strap is high-frequency, yet no artifact
    speckled = clean.copy()
    speckled[[2, 25, 10, 22], [24, 25, 22, 15]] = 255  # four isolated white pixels on the background
    speckled[25, 2] = 128
    faint_pair = clean.copy()
    faint_pair[8, 20:22] = 51  # two touching specks are still specks
    textured = clean.copy()
    rng = np.random.default_rng(0)
    textured[4:14, 4:14] = rng.integers(17, 256, (10, 10))
    texture = textured[4:14, 4:14].astype(float) - metrics.median3x3(textured[None])[0, 4:14, 4:14]
    assert ((texture / 255) ** 2).sum() > 5  # as high-frequency as five white specks, yet the garment's own
    hazy = np.where(clean == 0, rng.integers(0, metrics.NOISE_LEVEL + 1, clean.shape), clean).astype(np.uint8)
    energy = metrics.background_energy(np.stack([clean, speckled, faint_pair, textured, hazy, np.zeros_like(clean)]))
    assert energy.dtype == np.float64
    speck = [((v - metrics.NOISE_LEVEL) / 255) ** 2 for v in (255, 128, 51)]
    np.testing.assert_allclose(energy, [0, 4 * speck[0] + speck[1], 2 * speck[2], 0, 0, 0], atol=1e-6)
    touching = clean.copy()
    touching[14, 14] = 255  # a speck touching the square is part of it: the detector is blind next to objects
    assert metrics.background_energy(touching[None])[0] == 0
    with pytest.raises(ValueError, match="uint8"):
        metrics.background_energy(clean[None].astype(np.int64))


def test_median3x3_matches_a_sort():
    images = np.random.default_rng(0).integers(0, 256, (20, 9, 7)).astype(np.uint8)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    windows = np.stack([padded[:, i : i + 9, j : j + 7] for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(metrics.median3x3(images), np.median(windows, axis=0))


def test_artifact_rate_is_the_share_above_the_real_quantile():
    # One isolated pixel v = 1..200 grey levels above the noise per image: 200 distinct energies (v / 255)^2.
    images = np.zeros((200, 28, 28), np.uint8)
    images[:, 5, 5] = np.arange(1, 201) + metrics.NOISE_LEVEL
    threshold = metrics.artifact_threshold(images)
    assert (198 / 255) ** 2 < threshold < (199 / 255) ** 2  # the two brightest are above it
    assert metrics.artifact_rate(images, threshold) == 0.01
    assert metrics.artifact_threshold(images, 0.5) == pytest.approx(((100 / 255) ** 2 + (101 / 255) ** 2) / 2)
    assert metrics.artifact_rate(images[:100], metrics.artifact_threshold(images, 0.5)) == 0.0


def test_saturated_rate_flags_images_whiter_than_any_real_one():
    real = np.zeros((3, 4, 4), np.uint8)
    real[0, 0, :2] = 255  # the whitest real image: 2 of 16 pixels at 255
    images = np.zeros((4, 4, 4), np.uint8)
    images[1, 0, :2] = 255  # as white as the whitest real image: not flagged
    images[2, :2] = 255  # 8 of 16
    images[3] = np.where(np.indices((4, 4)).sum(0) % 2, 255, 0)  # saturated noise: half the pixels
    assert metrics.saturated_rate(images, real) == 0.5
    with pytest.raises(ConfigError, match="uint8"):
        metrics.saturated_rate(images.astype(np.float32), real)
