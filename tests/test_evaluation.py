"""GAN quality metrics: each agrees with a reference (scipy, a naive loop,
or a count by hand), bad input is refused with a clear ValueError, and
feature extraction does not depend on the batch size."""

import inspect
import re

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf
from scipy.spatial.distance import cdist

from fitcustom import evaluation


def gaussian(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_module_example_runs():
    doc = inspect.getdoc(evaluation)
    (block,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    exec(compile(block, "<module example>", "exec"), {"__name__": "doc"})


# FID


def test_frechet_distance_matches_closed_form_with_sqrtm():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 4))
    a = rng.normal(size=(300, 4))
    b = rng.normal(size=(200, 4)) @ mix + np.array([0.5, -1.0, 0.0, 2.0])
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    fid = evaluation.frechet_distance(a, b)
    assert isinstance(fid, float)
    np.testing.assert_allclose(fid, expected, rtol=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = gaussian(200, 8)
    assert evaluation.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_grows_with_the_mean_shift():
    a = gaussian(300, 8, seed=0)
    near = evaluation.frechet_distance(a, gaussian(300, 8, 0.5, seed=1))
    far = evaluation.frechet_distance(a, gaussian(300, 8, 2.0, seed=1))
    # The mean term alone is 8 * shift^2: 2 and 32.
    assert 1.0 < near < far
    assert far > 25


def test_frechet_distance_with_fewer_samples_than_features():
    a = gaussian(50, 64, seed=0)  # covariances of rank 49 < 64
    b = gaussian(50, 64, 0.1, seed=1)
    fid = evaluation.frechet_distance(a, b)
    assert np.isfinite(fid) and fid >= 0
    assert evaluation.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


# KID


def naive_mmd2(x, y):
    """The unbiased MMD^2 estimate of Bińkowski et al., by loops."""
    m, d = x.shape

    def kernel(u, v):
        return (float(np.dot(u, v)) / d + 1) ** 3

    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kernel_distance_matches_a_naive_loop():
    x, y = gaussian(6, 3, seed=0), gaussian(6, 3, 0.3, seed=1)
    mean, std = evaluation.kernel_distance(x, y, subsets=1, subset_size=6)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(naive_mmd2(x, y), abs=1e-10)
    assert std == 0.0


def test_kernel_distance_lowers_the_subset_size_to_the_smaller_set():
    a, b = gaussian(10, 3, seed=0), gaussian(6, 3, 1.0, seed=1)
    mean, _ = evaluation.kernel_distance(a, b, subsets=2, seed=7)
    rng = np.random.default_rng(7)  # the draws the function makes
    expected = []
    for _ in range(2):
        x = a[rng.choice(10, 6, replace=False)]
        y = b[rng.choice(6, 6, replace=False)]
        expected.append(naive_mmd2(x, y))
    assert mean == pytest.approx(np.mean(expected), abs=1e-10)


def test_kernel_distance_is_near_zero_for_one_distribution():
    a, b = gaussian(500, 16, seed=0), gaussian(500, 16, seed=1)
    mean, std = evaluation.kernel_distance(a, b, subsets=50, subset_size=200)
    # Measured: mean 0.0005, std 0.0100 (over five seed pairs, |mean| /
    # std from 0.05 to 0.6).
    assert abs(mean) < 3 * std
    again = evaluation.kernel_distance(a, b, subsets=50, subset_size=200)
    assert again == (mean, std)  # seeded


def test_kernel_distance_detects_a_mean_shift():
    a, b = gaussian(500, 16, seed=0), gaussian(500, 16, 1.0, seed=1)
    mean, std = evaluation.kernel_distance(a, b, subsets=50, subset_size=200)
    # Measured: mean 7.37, std 0.41 (over five seed pairs, mean / std
    # from 18 to 25).
    assert mean > 0 and mean > 10 * std


# Precision, recall, density, coverage

LINE = np.arange(10.0)[:, None]  # 0, 1, ..., 9: nearest other at 1
GRID = np.array([[i, j] for i in range(3) for j in range(3)], float)


def test_exact_copies_on_a_line():
    # k=2: radii 2 at the ends (0 and 9), 1 inside. Each ball holds 3
    # copies (itself and two neighbours): density = 10 * 3 / (2 * 10).
    assert evaluation.precision_recall(LINE, LINE, k=2) == (1.0, 1.0)
    density, coverage = evaluation.density_coverage(LINE, LINE, k=2)
    assert density == pytest.approx(1.5, abs=1e-12)
    assert coverage == 1.0


def test_exact_copies_on_a_grid_count_points_on_the_edge():
    # 3 x 3 grid, k=1: every radius is 1. The ball of a corner holds 3
    # points, of an edge point 4, of the centre 5: density =
    # (4 * 3 + 4 * 4 + 5) / (1 * 9) = 33 / 9.
    assert evaluation.precision_recall(GRID, GRID, k=1) == (1.0, 1.0)
    density, coverage = evaluation.density_coverage(GRID, GRID, k=1)
    assert density == pytest.approx(33 / 9, abs=1e-12)
    assert coverage == 1.0


@pytest.mark.parametrize("block_rows", [1024, 7], ids=["whole", "blocks"])
@pytest.mark.parametrize("width", [4, 64])
def test_exact_copies_have_density_k_plus_1_over_k(
    width, block_rows, monkeypatch
):
    # Each ball holds its centre's copy and the copies of its k nearest
    # neighbours, the k-th exactly on its edge: density (k + 1) / k. The
    # fast distances round differently per block shape (with 64 features
    # up to 1 in 15 edges were missed before ties were re-measured).
    monkeypatch.setattr(evaluation, "_BLOCK_ROWS", block_rows)
    real = gaussian(150, width) * 3 + 2
    assert evaluation.precision_recall(real, real, k=3) == (1.0, 1.0)
    density, coverage = evaluation.density_coverage(real, real, k=5)
    assert density == pytest.approx(6 / 5, abs=1e-12)
    assert coverage == 1.0


def test_far_away_fakes_score_zero():
    far = GRID + 100
    assert evaluation.precision_recall(GRID, far, k=1) == (0.0, 0.0)
    assert evaluation.density_coverage(GRID, far, k=1) == (0.0, 0.0)


def test_half_copies_half_far_on_a_line():
    fake = np.array([0.0, 1, 2, 50, 51, 52])[:, None]
    # k=1: real and fake radii are all 1. Precision: 0, 1, 2 of 6 fakes.
    # Recall: real 0 to 3 lie within 1 of a fake copy: 4 of 10.
    precision, recall = evaluation.precision_recall(LINE, fake, k=1)
    assert precision == 0.5
    assert recall == pytest.approx(0.4)
    # Fake 0 lies in the balls of 0 and 1, fake 1 in those of 0, 1, 2,
    # fake 2 in those of 1, 2, 3: density = 8 / (1 * 6). The balls of
    # real 0 to 3 hold a fake: coverage = 4 / 10.
    density, coverage = evaluation.density_coverage(LINE, fake, k=1)
    assert density == pytest.approx(8 / 6, abs=1e-12)
    assert coverage == pytest.approx(0.4)


def test_half_copies_half_far_on_a_grid():
    fake = np.array([[0, 0], [1, 1], [2, 2], [100, 100], [100, 101]], float)
    fake = np.concatenate([fake, [[101, 100]]])
    # k=1, real radii 1. The fake (1, 1) has radius sqrt(2), reaching the
    # whole grid: recall 1. Its copy covers 5 real balls; the corner
    # copies cover 3 each, 2 of them new: coverage 7 / 9 (not (2, 0)
    # and (0, 2)), density (3 + 5 + 3) / (1 * 6).
    assert evaluation.precision_recall(GRID, fake, k=1) == (0.5, 1.0)
    density, coverage = evaluation.density_coverage(GRID, fake, k=1)
    assert density == pytest.approx(11 / 6, abs=1e-12)
    assert coverage == pytest.approx(7 / 9)


def reference_scores(real, fake, k):
    """All four scores from full distance matrices (scipy)."""

    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is itself

    fake_to_real = cdist(fake, real)
    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean((fake_to_real <= r_real).any(axis=1))
    recall = np.mean((fake_to_real.T <= r_fake).any(axis=1))
    density = (fake_to_real <= r_real).sum() / (k * len(fake))
    coverage = np.mean(fake_to_real.min(axis=0) <= r_real)
    return precision, recall, density, coverage


def test_blocks_give_the_unblocked_answer(monkeypatch):
    real, fake = gaussian(50, 3, seed=0), gaussian(40, 3, 0.3, seed=1)
    expected = reference_scores(real, fake, k=3)
    whole = evaluation.precision_recall(
        real, fake, k=3
    ) + evaluation.density_coverage(real, fake, k=3)
    monkeypatch.setattr(evaluation, "_BLOCK_ROWS", 7)  # 50 = 7 * 7 + 1
    blocked = evaluation.precision_recall(
        real, fake, k=3
    ) + evaluation.density_coverage(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[3] < 1  # not trivial
    np.testing.assert_allclose(blocked, expected, rtol=1e-12)
    assert blocked == whole


# Bad input

A = gaussian(10, 4)
NAN = A.copy()
NAN[[3, 7], 1] = np.nan
NAN[7, 2] = np.inf

BAD = {
    "fid_3d": (
        lambda: evaluation.frechet_distance(A.reshape(10, 2, 2), A),
        r"2-D array of features.*Received: a of shape \(10, 2, 2\)",
    ),
    "fid_1d": (
        lambda: evaluation.frechet_distance(A, A[:, 0]),
        r"Received: b of shape \(10,\)",
    ),
    "fid_widths": (
        lambda: evaluation.frechet_distance(A, A[:, :3]),
        r"same number of features\. Received: a of shape \(10, 4\) and b "
        r"of shape \(10, 3\)",
    ),
    "fid_one_sample": (
        lambda: evaluation.frechet_distance(A[:1], A),
        r"a covariance needs 2\. Received: a of shape \(1, 4\) \(1 sample\)"
        r"\. Expected at least 2 samples",
    ),
    "kid_one_sample": (
        lambda: evaluation.kernel_distance(A, A[:1]),
        r"Received: b of shape \(1, 4\) \(1 sample\)\. Expected at least 2",
    ),
    "kid_subsets": (
        lambda: evaluation.kernel_distance(A, A, subsets=0),
        r"`subsets` must be a whole number >= 1\. Received: subsets=0",
    ),
    "kid_subset_size": (
        lambda: evaluation.kernel_distance(A, A, subset_size=1),
        r"`subset_size` must be a whole number >= 2\. Received: "
        r"subset_size=1",
    ),
    "pr_too_few": (
        lambda: evaluation.precision_recall(A[:3], A, k=3),
        r"k=3 nearest other points need 4\. Received: real of shape "
        r"\(3, 4\) \(3 samples\)\. Expected at least 4 samples\. Pass more "
        r"samples or a smaller k",
    ),
    "pr_widths": (
        lambda: evaluation.precision_recall(A, A[:, :2]),
        r"Received: real of shape \(10, 4\) and fake of shape \(10, 2\)",
    ),
    "pr_k_zero": (
        lambda: evaluation.precision_recall(A, A, k=0),
        r"`k` must be a whole number >= 1\. Received: k=0",
    ),
    "pr_k_float": (
        lambda: evaluation.precision_recall(A, A, k=2.5),
        r"Received: k=2\.5",
    ),
    "dc_too_few": (
        lambda: evaluation.density_coverage(A, A[:5], k=5),
        r"Received: fake of shape \(5, 4\) \(5 samples\)\. Expected at "
        r"least 6",
    ),
    "dc_nonfinite": (
        lambda: evaluation.density_coverage(A, NAN, k=2),
        r"`fake` contains NaN or inf\. Received: 2 rows of 10 with "
        r"non-finite values, the first at row 3",
    ),
    "fid_nonfinite": (
        lambda: evaluation.frechet_distance(NAN[7:], A),
        r"`a` contains NaN or inf\. Received: 1 row of 3 with non-finite "
        r"values, the first at row 0",
    ),
    "strings": (
        lambda: evaluation.kernel_distance(A, A.astype(str)),
        r"`b` must hold real numbers\. Received: b of dtype <U\d+ and "
        r"shape \(10, 4\)",
    ),
    "extract_batch_size": (
        lambda: evaluation.extract_features(
            keras.layers.Flatten(), np.zeros((4, 2, 2)), batch_size=0
        ),
        r"Received: batch_size=0",
    ),
    "extract_empty": (
        lambda: evaluation.extract_features(
            keras.layers.Flatten(), np.zeros((0, 2, 2))
        ),
        r"Received: images of shape \(0, 2, 2\)",
    ),
    "extract_pairs": (
        lambda: evaluation.extract_features(
            keras.layers.Flatten(),
            tf.data.Dataset.from_tensor_slices(
                (np.zeros((4, 2, 2)), np.zeros(4))
            ).batch(2),
        ),
        r"batches of images only\. Received: a tf\.data\.Dataset with "
        r"element spec \(TensorSpec",
    ),
    "extract_two_outputs": (
        lambda: evaluation.extract_features(
            keras.layers.Lambda(lambda x: (x, x)), np.zeros((4, 2, 2))
        ),
        r"must return one tensor\. Received: a tuple of 2 elements",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call()


# Feature extraction


def rgb_images(n=100, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32")


def extractor():
    """Batch norm and dropout: rows would depend on their batch (or on
    chance) if the model ran with training=True."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),  # per position: output (6, 6, 2)
        ]
    )


def test_extract_features_does_not_depend_on_the_batch_size():
    model, x = extractor(), rgb_images()
    expected = model(x, training=False).numpy().reshape(100, -1)
    small = evaluation.extract_features(model, x, batch_size=7)
    large = evaluation.extract_features(model, x, batch_size=64)
    assert small.shape == (100, 72) and small.dtype == np.float64
    np.testing.assert_allclose(small, large, rtol=1e-6)
    np.testing.assert_allclose(small, expected, rtol=1e-6)


def test_extract_features_from_a_dataset():
    model, x = extractor(), rgb_images()
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(13)
    from_dataset = evaluation.extract_features(model, dataset)
    from_array = evaluation.extract_features(model, x, batch_size=64)
    np.testing.assert_allclose(from_dataset, from_array, rtol=1e-6)


def test_extract_features_with_a_layer_and_a_plain_function():
    x = rgb_images(20)
    layer = keras.layers.Conv2D(2, 3)  # built inside the tf.function
    features = evaluation.extract_features(layer, x, batch_size=6)
    expected = layer(x).numpy().reshape(20, -1)
    np.testing.assert_allclose(features, expected, rtol=1e-6)

    def pool(batch):  # takes no `training`
        return keras.ops.mean(batch, axis=(1, 2))

    pooled = evaluation.extract_features(pool, x, batch_size=6)
    np.testing.assert_allclose(pooled, x.mean(axis=(1, 2)), rtol=1e-6)
