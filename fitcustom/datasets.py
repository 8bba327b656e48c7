"""Datasets as arrays ready for `fit()`.

`load_digits` is the embedded default: scikit-learn's bundled 8x8 digits,
real and offline.

May import: the ground floor (`_args`).
"""

import numpy as np

from fitcustom import _args


def _check_fraction(value, name="test_fraction"):
    _args.number(name, value, low=0, high=1, low_open=True, high_open=True)


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes).

    Needs scikit-learn (`pip install fitcustom[examples]`); works offline.

    Args:
        test_fraction: Fraction of the images held out for testing,
            stratified by class. Defaults to `0.25`.
        seed: Seed of the split. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x` float32 of shape
        `(n, 8, 8, 1)` scaled to [0, 1]; `y` int32 class ids in [0, 10).
    """
    _check_fraction(test_fraction)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError(
            "load_digits() needs scikit-learn. Install it with "
            "`pip install scikit-learn` or `pip install fitcustom[examples]`."
        ) from e
    bunch = sk_load_digits()
    x = (bunch.images.astype("float32") / 16.0)[..., None]
    y = bunch.target.astype("int32")
    return split(x, y, test_fraction, seed)


def split(x, y, fraction, seed=0):
    """Splits `(x, y)` in two, stratified by class: each class gives the
    same `fraction` of its samples to the second part.

    Use it to hold out a validation set from a training set, so that the
    test set is read only once, at the end.

    Args:
        x: Array of samples.
        y: Array of integer class ids, one per sample.
        fraction: Float strictly between 0 and 1: the share of each class
            that goes to the second part.
        seed: Seed of the draw. Defaults to 0.

    Returns:
        `((x_first, y_first), (x_second, y_second))`, each part in a
        shuffled order.
    """
    _check_fraction(fraction, "fraction")
    y = np.asarray(y)
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(
            "`x` and `y` must hold the same number of samples and `y` one "
            f"class id per sample. Received: len(x)={len(x)}, y.shape="
            f"{y.shape}."
        )
    rng = np.random.default_rng(seed)
    second = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        second.extend(idx[: int(round(len(idx) * fraction))])
    mask = np.zeros(len(y), bool)
    mask[second] = True
    first = rng.permutation(np.flatnonzero(~mask))
    second = np.flatnonzero(mask)
    return (x[first], y[first]), (x[second], y[second])


def keras_cache_dir():
    """The folder where `keras.datasets` caches downloads.

    `$KERAS_HOME/datasets` when `KERAS_HOME` is set, else
    `~/.keras/datasets` (Keras' own rule).
    """
    import os

    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(home, "datasets")


def _offline_error(name, expected, error):
    return OSError(
        f"{name} is not in the Keras cache and could not be downloaded "
        f"({type(error).__name__}: {error}). Expected the cached file at "
        f"{expected}. Run once with network access, copy the file there, "
        "or set KERAS_HOME to a folder that holds it. The offline default "
        "is load_digits()."
    )


def load_mnist():
    """MNIST via Keras' cache (`mnist.npz`), downloading it if missing.

    Reads the cached `mnist.npz` directly when it exists (Keras' own
    `mnist.load_data()` re-downloads a cached file whose hash it does not
    recognise); otherwise calls `keras.datasets.mnist.load_data()`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x` float32 of shape
        `(n, 28, 28, 1)` in [0, 1]; `y` int32.

    Raises:
        OSError: Not cached and no network; the message names the file.
    """
    import os

    path = os.path.join(keras_cache_dir(), "mnist.npz")
    if not os.path.exists(path):
        import keras

        try:
            keras.datasets.mnist.load_data()
        except Exception as e:  # noqa: BLE001 - any download failure
            raise _offline_error("MNIST", path, e) from e
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(
                f"{path} is not an MNIST file in Keras' format: it lacks "
                f"{sorted(missing)}. Received arrays: {sorted(f.files)}. "
                "Delete it so that it is downloaded again."
            )
        splits = [(f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])]
    return tuple(_images(x, y) for x, y in splits)


def _from_keras(name, loader, cache_name):
    import os

    try:
        splits = loader()
    except Exception as e:  # noqa: BLE001 - any download failure
        raise _offline_error(
            name, os.path.join(keras_cache_dir(), cache_name), e
        ) from e
    return tuple(_images(x, y) for x, y in splits)


def load_fashion_mnist():
    """Fashion-MNIST through `keras.datasets` (cached under
    `keras_cache_dir()/fashion-mnist`), as `load_mnist` returns it."""
    import keras

    return _from_keras(
        "Fashion-MNIST",
        keras.datasets.fashion_mnist.load_data,
        "fashion-mnist",
    )


def load_cifar10():
    """CIFAR-10 through `keras.datasets`: `x` float32 `(n, 32, 32, 3)` in
    [0, 1], `y` int32 of shape `(n,)`."""
    import keras

    return _from_keras(
        "CIFAR-10",
        keras.datasets.cifar10.load_data,
        "cifar-10-batches-py-target",
    )


def _images(x, y):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    return x.astype("float32") / 255.0, np.asarray(y).reshape(-1).astype(
        "int32"
    )


def load_synthetic(n, shape, num_classes=10, seed=0):
    """Random images and labels of any shape, for speed tests.

    Args:
        n: Number of samples (>= 1).
        shape: Shape of one sample, e.g. `(28, 28, 1)`.
        num_classes: Labels are drawn from `[0, num_classes)`.
        seed: Seed of the generator.

    Returns:
        `(x, y)`: float32 in [0, 1] of shape `(n, *shape)`, int32 labels.
    """
    n = _args.whole("n", n)
    shape = tuple(shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            "`shape` must be a non-empty tuple of positive ints. "
            f"Received: shape={shape!r}."
        )
    num_classes = _args.whole("num_classes", num_classes, 2)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=n).astype("int32")
    return x, y


DATASETS = {
    "digits": lambda: load_digits(),
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def load(name):
    """Loads a dataset by name: one of `DATASETS` ("digits" is offline)."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset. Received: name={name!r}. Expected one of "
            f"{sorted(DATASETS)}."
        )
    return DATASETS[name]()


def to_dataset(x, y=None, batch_size=32, shuffle=False, seed=0):
    """A `tf.data.Dataset` over in-memory arrays: shuffle, batch, prefetch.

    Args:
        x: Array of inputs.
        y: Optional array of targets.
        batch_size: Batch size (>= 1). Defaults to 32.
        shuffle: Reshuffle every epoch with a buffer of the whole data.
            Defaults to `False`.
        seed: Seed of the shuffle. Defaults to 0.
    """
    import tensorflow as tf

    batch_size = _args.whole("batch_size", batch_size)
    elements = x if y is None else (x, y)
    ds = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
