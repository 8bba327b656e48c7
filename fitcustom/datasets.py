"""Datasets as arrays ready for `fit()`.

`load_digits` is the embedded default: scikit-learn's bundled 8x8 digits,
real and offline.
"""

import numpy as np


def _check_fraction(test_fraction):
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0.0 < test_fraction < 1.0
    ):
        raise ValueError(
            "`test_fraction` must be a float strictly between 0 and 1. "
            f"Received: test_fraction={test_fraction!r}."
        )


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
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), bool)
    test_mask[test_idx] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx = np.flatnonzero(test_mask)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
