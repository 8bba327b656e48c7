"""Input checks that Keras 3 does not make (CONTRACT.md, silent failures).

Each check is vectorised over the arrays already in memory (no copy) and
raises a `ValueError` that says what was received, what was expected and
how to fix it, before any weight changes. For `tf.data` input only the
element spec (shapes, dtypes) is checked: values are not scanned, since
that would mean a pass over the dataset.
"""

import numpy as np


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_not_empty(x):
    """Refuses zero samples (Keras only warns and returns an empty history)."""
    n = len(x) if _is_array(x) else None
    if n == 0:
        raise ValueError(
            "The training data is empty. Received: x with 0 samples "
            f"(shape {tuple(x.shape)}). Expected at least one sample."
        )


def check_finite(name, values):
    """Refuses NaN or inf in a float array (`name` is "x" or "y")."""
    arr = np.asarray(values)
    if arr.dtype.kind != "f":
        return
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(
            f"`{name}` contains NaN or inf: {int((~finite).sum())} values, "
            f"the first at index {tuple(int(i) for i in bad)}. Expected "
            f"finite numbers. Clean the data, or pass check_inputs=False to "
            "compile() to skip this check (and skip_nonfinite=True to skip "
            "such batches instead)."
        )


def label_format(y, num_classes):
    """ "sparse" (class ids) or "one_hot" (a width-`num_classes` last axis)."""
    shape = tuple(np.shape(y))
    if len(shape) >= 2 and shape[-1] == num_classes and num_classes > 1:
        return "one_hot"
    if len(shape) >= 2 and shape[-1] != 1:
        raise ValueError(
            "The labels look one-hot but their width differs from the "
            f"model's {num_classes} outputs. Received: y of shape {shape}. "
            f"Expected class ids of shape (n,) or one-hot labels of shape "
            f"(n, {num_classes})."
        )
    return "sparse"


def check_labels(y, num_classes):
    """Checks class-id labels (range, integrality) or one-hot labels."""
    y = np.asarray(y)
    if label_format(y, num_classes) == "one_hot":
        return
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            check_finite("y", y)
        fractional = y != np.round(y)
        if fractional.any():
            first = y[fractional].ravel()[0]
            raise ValueError(
                "Sparse class labels must be whole numbers; Keras would "
                f"truncate them silently. Received: y with "
                f"{int(fractional.sum())} non-integer values, e.g. "
                f"{float(first)}. Expected integer class ids in "
                f"[0, {num_classes}), or one-hot labels of width "
                f"{num_classes}."
            )
    if y.dtype.kind in "biuf" and y.size:
        low, high = y.min(), y.max()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"Labels must be class ids in [0, {num_classes}). Received: "
                f"labels from {low} to {high}. Keras would give NaN on GPU "
                "or count them as wrong. Fix the labels, or give the model "
                f"{int(high) + 1} outputs."
            )


def check_input_shape(x_shape, expected, what="x"):
    """Compares a sample shape with the model's input shape.

    Names the channels-first case (e.g. (3, 32, 32) for (32, 32, 3)).
    """
    x_shape = tuple(x_shape)
    expected = tuple(expected)
    if len(x_shape) != len(expected) or any(
        e is not None and s is not None and s != e
        for s, e in zip(x_shape, expected)
    ):
        hint = ""
        if (
            len(x_shape) == 3
            and len(expected) == 3
            and x_shape[0] == expected[-1]
            and x_shape[1:] == expected[:-1]
        ):
            hint = (
                " This looks like channels-first data for a channels-last "
                "model: transpose it with np.transpose(x, (0, 2, 3, 1))."
            )
        raise ValueError(
            f"`{what}` does not fit the model's input. Received: samples of "
            f"shape {x_shape}. Expected: {expected}.{hint}"
        )


def check_element_spec(spec, input_shape, num_classes):
    """Checks a `tf.data` element spec (shapes and dtypes only)."""
    import tensorflow as tf

    if not isinstance(spec, tuple) or len(spec) < 2:
        return
    x_spec, y_spec = spec[0], spec[1]
    if isinstance(x_spec, tf.TensorSpec) and input_shape is not None:
        check_input_shape(x_spec.shape[1:], input_shape, what="dataset x")
    if isinstance(y_spec, tf.TensorSpec) and num_classes:
        shape = tuple(y_spec.shape)
        if len(shape) >= 2 and shape[-1] not in (None, 1, num_classes):
            label_format(np.zeros([1] + list(shape[1:])), num_classes)
