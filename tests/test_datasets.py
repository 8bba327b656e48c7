"""Datasets: the offline default, Keras-cache loaders (no network), helpers."""

import numpy as np
import pytest

from fitcustom import datasets


def test_digits_split_is_stratified_and_scaled():
    (x_train, y_train), (x_test, y_test) = datasets.load_digits(0.25, seed=3)
    assert x_train.shape[1:] == (8, 8, 1) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))
    # Stratified: each class holds about a quarter of its images out.
    counts = np.bincount(y_test, minlength=10) / (
        np.bincount(y_test, minlength=10) + np.bincount(y_train, minlength=10)
    )
    assert np.all(np.abs(counts - 0.25) < 0.02)
    (x2, _), _ = datasets.load_digits(0.25, seed=3)
    np.testing.assert_array_equal(x_train, x2)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, "0.2", True])
def test_digits_refuses_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load_digits(fraction)


def test_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), [10, 20, 30, 40]).astype("int32")
    x = np.arange(len(y))  # each sample is its own index
    (x1, y1), (x2, y2) = datasets.split(x, y, 0.2, seed=1)
    assert sorted(np.concatenate([x1, x2])) == list(range(len(y)))
    np.testing.assert_array_equal(y[x1], y1)
    np.testing.assert_array_equal(np.bincount(y2), [2, 4, 6, 8])
    (again, _), _ = datasets.split(x, y, 0.2, seed=1)
    (other, _), _ = datasets.split(x, y, 0.2, seed=2)
    np.testing.assert_array_equal(x1, again)
    assert not np.array_equal(x1, other)
    with pytest.raises(ValueError, match="same number of samples"):
        datasets.split(x, y[:-1], 0.2)
    with pytest.raises(ValueError, match="fraction"):
        datasets.split(x, y, 1.0)


def test_mnist_reads_keras_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = tmp_path / "datasets"
    cache.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        cache / "mnist.npz",
        x_train=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 12).astype(np.uint8),
        x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 5).astype(np.uint8),
    )
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (5, 28, 28, 1)
    assert x_train.dtype == np.float32 and x_train.max() <= 1.0
    assert y_train.dtype == np.int32 and y_test.shape == (5,)


def test_mnist_cache_in_wrong_format_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    np.savez(tmp_path / "datasets" / "mnist.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        datasets.load_mnist()


def test_mnist_offline_error_names_the_cache_file(tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", no_network)
    expected = str(tmp_path / "datasets" / "mnist.npz")
    with pytest.raises(OSError, match="mnist.npz") as info:
        datasets.load_mnist()
    assert expected in str(info.value)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="Unknown dataset.*'svhn'"):
        datasets.load("svhn")


def test_synthetic_and_tf_data_helpers():
    x, y = datasets.load_synthetic(10, (4, 4, 3), num_classes=3, seed=1)
    assert x.shape == (10, 4, 4, 3) and y.max() < 3
    ds = datasets.to_dataset(x, y, batch_size=4, shuffle=True)
    sizes = [len(b[0]) for b in ds]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        datasets.to_dataset(x, y, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        datasets.load_synthetic(3, (0, 2))
