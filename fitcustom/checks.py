"""Input checks that Keras 3 does not make: data it would train on silently.

Each check works on the arrays already in memory: reductions (`min`,
`max`) that allocate nothing of the data's size, so a float32 image array
is read twice and never copied. They raise a `ValueError` that says what
was received, what was expected and how to fix it, before any weight
changes.

For `tf.data` input only what is known without reading the data is
checked: the element spec (shapes of `x` and `y`) and an empty dataset
whose cardinality is known. Values (NaN, label range, fractional labels)
are *not* scanned, since that would mean a pass over the dataset; compile
with `skip_nonfinite=True` to survive non-finite batches there.

Example:

```python
import numpy as np
from fitcustom import checks

checks.check_labels(np.array([0, 2, 1]), output_shape=(3,))  # passes
try:
    checks.check_labels(np.array([0, 3]), output_shape=(3,))
except ValueError as e:
    print(e)  # Labels must be class ids in [0, 3). Received: ...
```

May import: nothing of fitcustom's (the ground floor).
"""

import re

import keras
import numpy as np

_OPT_OUT = (
    "or pass check_inputs=False to compile() to skip the checks "
    "(with skip_nonfinite=True to skip non-finite batches instead)"
)


#: Starts the message of a training step stopped by class ids outside
#: the output's range (`TapeModel.check_class_ids`); `fit()` and
#: `evaluate()` turn it into a `ValueError`.
CLASS_ID_MARKER = "fitcustom: class ids out of range"

#: Starts the message of a training or test step stopped by a check of
#: its own values (`step_check`): `fit()` and `evaluate()` turn it into
#: the `ValueError` the check describes.
STEP_CHECK_MARKER = "fitcustom: step check"

_STEP_TEMPLATES: list[str] = []


def step_check(condition, template: str, received, expected):
    """An op that stops the running step unless `condition` holds, for
    what is known only when the step runs (a batch size in a traced
    step); `fit()` and `evaluate()` raise
    `ValueError(template.format(received=..., expected=...))` for it.

    Args:
        condition: A scalar boolean tensor.
        template: The error message, with `{received}` and `{expected}`
            (integers) to fill in.
        received: A scalar integer tensor: the value found.
        expected: A scalar integer tensor: the value expected.

    Returns:
        The assertion: make what must not run before it (an update)
        depend on it.
    """
    import tensorflow as tf

    if template not in _STEP_TEMPLATES:
        _STEP_TEMPLATES.append(template)
    code = _STEP_TEMPLATES.index(template)
    return tf.debugging.Assert(
        condition,
        [
            STEP_CHECK_MARKER,
            tf.constant(code, tf.int64),
            tf.cast(received, tf.int64),
            tf.cast(expected, tf.int64),
        ],
    )


def step_check_message(error_message: str) -> str | None:
    """The message of a failed `step_check` found in a TensorFlow error's
    text (eager or graph), or `None`."""
    if STEP_CHECK_MARKER not in error_message:
        return None
    rest = error_message.split(STEP_CHECK_MARKER, 1)[1]
    numbers = re.findall(r"-?\d+", rest)
    if len(numbers) < 3 or int(numbers[0]) >= len(_STEP_TEMPLATES):
        return None
    code, received, expected = map(int, numbers[:3])
    return _STEP_TEMPLATES[code].format(received=received, expected=expected)


def is_array(value) -> bool:
    """Whether `value` is an in-memory array or tensor (has shape, dtype)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _arrays(structure):
    """The arrays in a (possibly nested) input, e.g. a dict of inputs."""
    if structure is None:
        return []
    if is_array(structure):
        return [structure]
    if isinstance(structure, (list, tuple, dict)):
        return [a for a in keras.tree.flatten(structure) if is_array(a)]
    return []


def as_arrays(data):
    """`data` with pandas DataFrames and Series as NumPy arrays (for the
    checks; Keras reads pandas data itself)."""
    if hasattr(data, "to_numpy") and hasattr(data, "index"):
        return data.to_numpy()
    if isinstance(data, dict):
        return {k: as_arrays(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)) and any(
        hasattr(v, "to_numpy") for v in data
    ):
        return type(data)(as_arrays(v) for v in data)
    return data


def check_numeric(x, what="x"):
    """Refuses inputs that are not numbers (strings, Python objects, or
    rows of different lengths), which Keras fails on deep inside
    TensorFlow with a dump of the data."""
    for array in _arrays(x):
        kind = np.asarray(array).dtype.kind if is_array(array) else None
        if kind in ("U", "S", "O"):
            raise ValueError(
                f"`{what}` must hold numbers. Received: an array of dtype "
                f"{array.dtype} and shape {tuple(array.shape)} (strings, "
                "Python objects or rows of different lengths). Convert it "
                "to a float array of one shape first, e.g. "
                "np.asarray(x, dtype='float32')."
            )


def check_not_empty(x, what="x"):
    """Refuses zero samples (Keras only warns and returns an empty history).

    Args:
        x: An array, a nested structure of arrays, or a `tf.data.Dataset`
            (refused when known to hold no batch).
        what: Its name in the message. Defaults to `"x"`.
    """
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        if int(x.cardinality()) == 0:
            raise ValueError(
                "The dataset is empty. Received: a tf.data.Dataset of "
                "cardinality 0 (0 batches). Expected at least one batch. "
                "Check its filtering, take() or batch(drop_remainder=True) "
                "with fewer samples than a batch."
            )
        return
    for array in _arrays(x):
        if len(array.shape) and array.shape[0] == 0:
            raise ValueError(
                f"The data is empty. Received: {what} with 0 samples "
                f"(shape {tuple(array.shape)}). Expected at least one "
                "sample. Check the filtering or slicing that produced it."
            )


def check_finite(name, values):
    """Refuses NaN or inf in float arrays.

    Reads the data twice (`min` and `max`, which propagate NaN and inf)
    without allocating a mask; the mask is built only to name the first
    bad value once one is known to exist.

    Args:
        name: The argument's name in the message (`"x"`, `"y"`, ...).
        values: An array, or a nested structure of arrays.
    """
    for array in _arrays(values):
        arr = np.asarray(array)
        if arr.dtype.kind not in "fc" or arr.size == 0:
            continue
        if np.isfinite(arr.min()) and np.isfinite(arr.max()):
            continue
        bad = ~np.isfinite(arr)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` contains NaN or inf. Received: {int(bad.sum())} "
            f"non-finite values, the first at index {first} "
            f"(value {arr[first]}). Expected finite numbers. Clean the "
            f"data, {_OPT_OUT}."
        )


def _shape_text(n, sample_shape):
    return "(" + ", ".join(str(d) for d in (n, *sample_shape)) + ")"


def label_format(y_shape, output_shape, n="n") -> str:
    """Tells class ids from one-hot labels by their shape.

    Args:
        y_shape: Shape of one label (without the batch axis).
        output_shape: Shape of one model output (without the batch axis).
        n: The number of samples, for the message. Defaults to `"n"`.

    Returns:
        `"one_hot"` when the label has the output's rank and width (the
        width > 1), `"sparse"` for class ids (one rank less, or a last
        axis of 1), `"binary"` for a single-unit output, `"unknown"` when
        a width is not known (a `tf.data` spec with `None` dimensions).

    Raises:
        ValueError: The label shape fits neither format (e.g. one-hot
            labels narrower or wider than the output).
    """
    y_shape = tuple(y_shape)
    out = tuple(output_shape)
    width = out[-1] if out else None
    if width == 1:
        return "binary"
    if width is None or (len(y_shape) == len(out) and y_shape[-1] is None):
        return "unknown"
    if len(y_shape) == len(out) and y_shape and y_shape[-1] == width:
        return "one_hot"
    if len(y_shape) == len(out) and y_shape and y_shape[-1] == 1:
        return "sparse"
    if len(y_shape) == len(out) - 1:
        return "sparse"
    if len(y_shape) == len(out):
        raise ValueError(
            "The labels look one-hot but their width differs from the "
            f"model's {width} outputs. Received: labels of shape "
            f"{_shape_text(n, y_shape)}. Expected class ids of "
            f"shape (n,) or one-hot labels of shape (n, {width}). "
            f"Re-encode them with keras.utils.to_categorical(ids, {width}) "
            "or give the model as many outputs as classes."
        )
    raise ValueError(
        "The labels do not fit the model's output. Received: labels of "
        f"shape {_shape_text(n, y_shape)} for outputs of sample shape {out}. "
        f"Expected class ids of shape {out[:-1]} or one-hot labels of "
        f"shape {out}."
    )


def check_labels(y, output_shape):
    """Checks labels against the model's output.

    Class ids: whole numbers (Keras truncates fractional ones silently) in
    `[0, num_classes)` (Keras gives NaN on GPU, or counts them wrong).
    One-hot or soft labels: the output's width, values in [0, 1]. A
    single-unit (binary) output: values in [0, 1].

    Args:
        y: Array of labels.
        output_shape: Shape of one model output (without the batch axis).
    """
    y = np.asarray(y)
    if y.dtype.kind in "USO":
        example = y.ravel()[0] if y.size else None
        raise ValueError(
            "Labels must be numbers: class ids or one-hot rows. Received: "
            f"labels of dtype {y.dtype} (e.g. {example!r}). Map them to "
            "ids first: `names, y = np.unique(labels, return_inverse=True)`."
        )
    if y.size == 0 or y.dtype.kind not in "biuf":
        return
    check_finite("y", y)
    kind = label_format(y.shape[1:], output_shape, n=len(y))
    if kind == "unknown":
        return
    low, high = y.min(), y.max()
    if kind in ("one_hot", "binary"):
        if low < 0 or high > 1:
            what = "one-hot" if kind == "one_hot" else "binary"
            raise ValueError(
                f"{what.capitalize()} labels must lie in [0, 1]. Received: "
                f"labels from {low} to {high}. Expected 0/1 (or soft "
                "targets between them). Pass class ids of shape (n,) "
                "instead, or rescale the labels."
            )
        return
    num_classes = output_shape[-1]
    if y.dtype.kind == "f":
        fractional = y != np.round(y)
        if fractional.any():
            first = y[fractional].ravel()[0]
            raise ValueError(
                "Sparse class labels must be whole numbers; Keras would "
                "truncate them silently. Received: labels with "
                f"{int(fractional.sum())} non-integer values, e.g. "
                f"{float(first):.6g}. Expected integer class ids in "
                f"[0, {num_classes}), or one-hot labels of width "
                f"{num_classes}."
            )
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Labels must be class ids in [0, {num_classes}). Received: "
            f"labels from {low} to {high}. Keras would give NaN on GPU or "
            "count them as wrong. Fix the labels, or give the model "
            f"{int(high) + 1} outputs."
        )


def check_input_shape(x_shape, expected, what="x"):
    """Compares a sample shape with the model's input shape.

    Names the channels-first case (e.g. (3, 32, 32) for (32, 32, 3)).

    Args:
        x_shape: Shape of one sample of the data.
        expected: Shape of one sample the model takes (`None` = any).
        what: The data's name in the message.
    """
    x_shape = tuple(x_shape)
    expected = tuple(expected)
    if len(x_shape) == len(expected) and all(
        e is None or s is None or s == e for s, e in zip(x_shape, expected)
    ):
        return
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


def check_arrays(
    x, y=None, sample_weight=None, input_shape=None, output_shape=None
):
    """All the checks on in-memory data, in the order a user fixes them.

    Args:
        x: Inputs: an array or a nested structure of arrays.
        y: Optional labels (an array; other structures are not checked).
        sample_weight: Optional array of per-sample weights.
        input_shape: Shape of one model input, or `None` to skip.
        output_shape: Shape of one model output, or `None` to skip the
            label checks.
    """
    check_not_empty(x)
    if input_shape is not None and is_array(x):
        check_input_shape(x.shape[1:], input_shape)
    check_finite("x", x)
    if sample_weight is not None:
        check_finite("sample_weight", sample_weight)
    if is_array(y):
        check_finite("y", y)
        if output_shape is not None:
            check_labels(y, output_shape)


def check_dataset(dataset, input_shape=None, output_shape=None):
    """Checks a `tf.data.Dataset` without reading its elements.

    Refuses a dataset known to be empty and one whose element spec does
    not fit the model (input sample shape, label shape). Values are not
    scanned.

    Args:
        dataset: A `tf.data.Dataset` of batches.
        input_shape: Shape of one model input, or `None` to skip.
        output_shape: Shape of one model output, or `None` to skip.
    """
    import tensorflow as tf

    check_not_empty(dataset)
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or not spec:
        spec = (spec,)
    x_spec = spec[0]
    if isinstance(x_spec, tf.TensorSpec) and input_shape is not None:
        if x_spec.shape.rank is not None:
            check_input_shape(x_spec.shape[1:], input_shape, "dataset x")
    if len(spec) < 2 or output_shape is None:
        return
    y_spec = spec[1]
    if isinstance(y_spec, tf.TensorSpec) and y_spec.shape.rank is not None:
        label_format(
            tuple(y_spec.shape[1:]) if y_spec.shape.rank else (),
            output_shape,
        )


def describe_structure(value) -> str:
    """A short description of a data structure, for error messages."""
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} elements"
    if value is None:
        return "None"
    return f"one {type(value).__name__}"


def _data_part(data):
    """`(x, y)` of in-memory data or of a dataset's element spec."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if isinstance(spec, tuple) and 1 <= len(spec) <= 3:
            return spec[0], (spec[1] if len(spec) > 1 else None)
        return spec, None
    return data, None


def check_input_structure(x, expected, model_name="the model"):
    """Refuses inputs whose structure does not match a model's inputs.

    Keras raises for a missing key but only warns, and trains, when a
    dict has keys the model does not know (a typo leaves the intended
    input unused) or when a dict model is given a list (the inputs are
    matched by position). Checked for dict and list inputs; a single
    input is left to Keras.

    Args:
        x: Inputs: arrays, a structure of arrays, or a `tf.data.Dataset`
            (its element spec is read, not its elements).
        expected: The model's input structure (`model.input`).
        model_name: For the message.
    """
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        x, _ = _data_part(x)
    if not (isinstance(x, (dict, list, tuple)) or is_array(x)):
        return  # generators, PyDataset: read only by Keras
    if isinstance(expected, dict) and len(expected) > 1:
        names = sorted(expected)
        example = ", ".join(f"{k!r}: ..." for k in names)
        if not isinstance(x, dict):
            raise ValueError(
                f"{model_name} takes named inputs {names}. Received: "
                f"{describe_structure(x)}. Pass a dict: {{{example}}}."
            )
        _check_keys(x, names, "input", model_name)
    elif isinstance(expected, (list, tuple)) and len(expected) > 1:
        if isinstance(x, dict):
            names = sorted(t.name for t in expected)
            _check_keys(x, names, "input", model_name)
        elif not isinstance(x, (list, tuple)) or len(x) != len(expected):
            raise ValueError(
                f"{model_name} takes {len(expected)} inputs. Received: "
                f"{describe_structure(x)}. Pass a list of "
                f"{len(expected)} arrays, in the order of the model's "
                "inputs, or a dict keyed by input name."
            )


def check_target_structure(y, output_names, needs_target, model_name):
    """Refuses dict targets that do not match the model's outputs.

    Keras trains silently when a target dict names an output that has no
    loss and no metric (its values are never read) or when it lacks the
    target of an output that has a loss.

    Args:
        y: Targets: a dict of arrays, or a `tf.data.Dataset` whose
            element spec is read. Other structures are left to Keras.
        output_names: The model's output names.
        needs_target: The output names that have a loss or a metric.
        model_name: For the message.
    """
    import tensorflow as tf

    if isinstance(y, tf.data.Dataset):
        _, y = _data_part(y)
    if not isinstance(y, dict) or not output_names:
        return
    unknown = sorted(set(y) - set(output_names))
    unused = sorted(set(y) & set(output_names) - set(needs_target))
    missing = sorted(set(needs_target) - set(y))
    if not (unknown or unused or missing):
        return
    problems = []
    if unknown:
        problems.append(f"{unknown} are not outputs of the model")
    if unused:
        problems.append(f"{unused} have no loss and no metric")
    if missing:
        problems.append(
            f"targets for {missing}, which have a loss, are missing"
        )
    raise ValueError(
        f"The targets of {model_name} do not match its outputs. Received: "
        f"a dict with keys {sorted(y)}; " + "; ".join(problems) + ". "
        f"Expected keys: {sorted(needs_target)} (outputs "
        f"{list(output_names)}). Fix the keys, or give those outputs a "
        "loss or metric in compile()."
    )


def _check_keys(received, names, what, model_name):
    missing = sorted(set(names) - set(received))
    extra = sorted(set(received) - set(names))
    if missing or extra:
        raise ValueError(
            f"The {what} dict does not match the {what}s of {model_name}. "
            f"Received: keys {sorted(received)}. Expected: keys {names} "
            f"(missing: {missing}, not {what}s of the model: {extra}). "
            f"Rename the keys to the model's {what} names (the `name=` of "
            "each `keras.Input`)."
        )


def check_batch_size(batch_size, what="batch_size"):
    """Refuses a batch size that is not a whole number >= 1 (Keras takes
    0 as its default of 32 and fails late on a negative or float one)."""
    if batch_size is None:
        return
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            f"`{what}` must be a whole number >= 1, or None for Keras' "
            f"default of 32. Received: {what}={batch_size!r}."
        )


def check_sample_weight(sample_weight, y=None):
    """Refuses negative weights (they turn the step into gradient ascent),
    weights that are all zero (nothing to learn from), and weights with
    more values per sample than the targets have positions (Keras would
    broadcast them against the per-sample losses)."""
    if not is_array(sample_weight):
        return
    weights = np.asarray(sample_weight)
    if weights.size == 0 or weights.dtype.kind not in "biuf":
        return
    per_sample = tuple(weights.shape[1:])
    while per_sample and per_sample[-1] == 1:
        per_sample = per_sample[:-1]
    target = tuple(getattr(y, "shape", ())[1:]) if is_array(y) else None
    if per_sample and target is not None:
        if tuple(target[: len(per_sample)]) != per_sample:
            raise ValueError(
                "`sample_weight` must hold one weight per sample (shape "
                f"(n,)), or one per target position for sequence targets. "
                f"Received: sample_weight of shape {weights.shape} for "
                f"targets of shape {tuple(y.shape)}. Give one weight per "
                "sample, e.g. sample_weight[:, 0], or use class_weight "
                "to weigh classes."
            )
    low = weights.min()
    if low < 0:
        raise ValueError(
            "`sample_weight` must be >= 0: a negative weight makes the "
            "step climb the loss instead of descending it. Received: "
            f"sample_weight with minimum {low} at index "
            f"{int(np.argmin(weights.reshape(len(weights), -1).min(1)))}."
            " Use 0 to ignore a sample."
        )
    if weights.max() == 0:
        raise ValueError(
            "`sample_weight` is 0 for every sample, so nothing would be "
            f"learned. Received: sample_weight of shape {weights.shape}, "
            "all zero. Give the samples to train on a weight > 0."
        )


def check_class_weight(class_weight, y=None):
    """Refuses class weights with keys that are not class ids, negative
    weights, and (for class-id labels in memory) a class of the data
    without a weight, which Keras would silently weigh 0."""
    if class_weight is None:
        return
    if not isinstance(class_weight, dict) or not class_weight:
        raise ValueError(
            "`class_weight` must be a non-empty dict {class id: weight}. "
            f"Received: class_weight={class_weight!r}."
        )
    bad = [
        k
        for k in class_weight
        if isinstance(k, bool) or not isinstance(k, (int, np.integer))
    ]
    if bad:
        raise ValueError(
            "`class_weight` keys must be integer class ids. Received keys "
            f"{bad!r} (of type {type(bad[0]).__name__}). Map label names "
            "to their ids first, e.g. {0: 1.0, 1: 2.5}."
        )
    negative = {k: v for k, v in class_weight.items() if v < 0}
    if negative:
        raise ValueError(
            f"`class_weight` values must be >= 0. Received: {negative}."
        )
    if not is_array(y):
        return
    labels = np.asarray(y)
    if labels.ndim > 1 and labels.shape[-1] > 1:
        labels = labels.argmax(axis=-1)  # one-hot
    if labels.dtype.kind not in "biu":
        return
    missing = sorted(set(np.unique(labels).tolist()) - set(class_weight))
    if missing:
        raise ValueError(
            f"`class_weight` has no weight for classes {missing}, which "
            "occur in the labels; Keras would give them weight 0 and "
            f"ignore those samples. Received keys {sorted(class_weight)}. "
            "Add a weight for every class."
        )


def check_not_endless(x, steps_per_epoch, what="x"):
    """Refuses an endless `tf.data.Dataset` without `steps_per_epoch`
    (the first epoch would never end)."""
    import tensorflow as tf

    if steps_per_epoch is not None or not isinstance(x, tf.data.Dataset):
        return
    if int(x.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(
            f"`{what}` is an endless tf.data.Dataset (it repeats without "
            "end), so an epoch would never finish. Received: "
            "steps_per_epoch=None. Pass steps_per_epoch=N, or remove "
            "`.repeat()`."
        )
