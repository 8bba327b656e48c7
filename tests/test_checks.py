"""Input checks: each bad input is refused with a clear ValueError before
any weight changes; good input passes; the checks cost little."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_weights_close
from helpers import labelled_images

import fitcustom
from fitcustom import checks


def functional():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    return fitcustom.TapeClassifier(inputs, keras.layers.Dense(10)(h))


class Subclassed(fitcustom.TapeClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.out = keras.layers.Dense(10)

    def call(self, inputs, training=None):
        return self.out(self.flatten(inputs))


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 8, 8, 1), "float32"))  # built
    return model


def backbone():
    body = keras.Sequential([keras.layers.Flatten()], name="backbone")
    model = fitcustom.TapeClassifier(backbone=body, num_classes=10)
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


BUILDERS = {"functional": functional, "subclassed": subclassed}


def bad(case):
    x, y = labelled_images(20)
    sample_weight = None
    if case == "label_out_of_range":
        y[3] = 10
    elif case == "negative_label":
        y[0] = -1
    elif case == "float_labels":
        y = y.astype("float32") + 0.6
    elif case == "one_hot_width":
        y = keras.utils.to_categorical(y % 5, 5)
    elif case == "one_hot_values":
        y = keras.utils.to_categorical(y, 10) * 2.0
    elif case == "nan_x":
        x[2, 1, 1, 0] = np.nan
    elif case == "inf_x":
        x[5, 0, 0, 0] = -np.inf
    elif case == "inf_y":
        y = keras.utils.to_categorical(y, 10)
        y[4, 0] = np.inf
    elif case == "nan_sample_weight":
        sample_weight = np.ones(20, "float32")
        sample_weight[7] = np.nan
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "channels_first":
        x = np.zeros((20, 1, 8, 8), np.float32)
    return x, y, sample_weight


BAD = {
    "label_out_of_range": r"class ids in \[0, 10\)\. Received: labels from "
    r"\d+ to 10",
    "negative_label": r"Received: labels from -1 to",
    "float_labels": r"whole numbers.*truncate.*Received: labels with 20 "
    r"non-integer values, e\.g\. \d+\.6",
    "one_hot_width": r"width differs from the model's 10 outputs\. "
    r"Received: labels of shape \(20, 5\)",
    "one_hot_values": r"One-hot labels must lie in \[0, 1\]\. Received: "
    r"labels from 0\.0 to 2\.0",
    "nan_x": r"`x` contains NaN or inf\. Received: 1 non-finite values, "
    r"the first at index \(2, 1, 1, 0\)",
    "inf_x": r"`x` contains NaN or inf.*index \(5, 0, 0, 0\)",
    "inf_y": r"`y` contains NaN or inf.*index \(4, 0\)",
    "nan_sample_weight": r"`sample_weight` contains NaN or inf",
    "empty": r"The data is empty\. Received: x with 0 samples",
    "channels_first": r"Received: samples of shape \(1, 8, 8\)\. Expected: "
    r"\(8, 8, 1\)\. This looks like channels-first",
}


@pytest.mark.parametrize("builder", list(BUILDERS), ids=list(BUILDERS))
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_before_training(case, builder):
    model = BUILDERS[builder]()
    model.compile()
    before = model.get_weights()
    x, y, sample_weight = bad(case)
    with pytest.raises(ValueError, match=BAD[case]):
        model.fit(x, y, sample_weight=sample_weight, verbose=0)
    with pytest.raises(ValueError, match=BAD[case]):
        model.evaluate(x, y, sample_weight=sample_weight, verbose=0)
    assert_weights_close(before, model.get_weights(), atol=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_bad_validation_data_is_refused_before_training():
    model = functional()
    model.compile()
    before = model.get_weights()
    x, y = labelled_images(20)
    xv, yv, _ = bad("label_out_of_range")
    with pytest.raises(ValueError, match=BAD["label_out_of_range"]):
        model.fit(x, y, validation_data=(xv, yv), verbose=0)
    assert_weights_close(before, model.get_weights(), atol=0)


def test_good_input_passes_in_every_format():
    """Every label format the checks accept trains, and the four spellings
    of the same class ids give the same numbers (the loss follows the
    format); soft targets give others."""
    x, y = labelled_images(20)
    soft = np.full((20, 10), 0.1, "float32")
    formats = {
        "class ids": y,
        "class ids (n, 1)": y[:, None],
        "whole floats": y.astype("float32"),
        "one-hot": keras.utils.to_categorical(y, 10),
        "soft": soft,
    }
    logs = {}
    for name, labels in formats.items():
        keras.utils.set_random_seed(0)
        model = backbone()
        model.compile()
        logs[name] = model.fit(
            x, labels, sample_weight=np.ones(20), epochs=2, verbose=0
        ).history
    for name in ("class ids (n, 1)", "whole floats", "one-hot"):
        np.testing.assert_allclose(
            logs[name]["loss"], logs["class ids"]["loss"], rtol=1e-6
        )
        assert logs[name]["accuracy"] == logs["class ids"]["accuracy"], name
    assert np.all(np.isfinite(logs["soft"]["loss"]))
    assert not np.allclose(logs["soft"]["loss"], logs["class ids"]["loss"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    keras.utils.set_random_seed(0)
    model = backbone()
    model.compile()
    history = model.fit(ds, validation_data=ds, verbose=0).history
    assert np.all(np.isfinite(history["loss"] + history["val_loss"]))


def test_checks_can_be_turned_off():
    model = functional()
    model.compile(check_inputs=False, skip_nonfinite=True)
    x, y, _ = bad("nan_x")
    history = model.fit(x, y, batch_size=20, verbose=0).history
    assert history["nonfinite_steps"] == [1.0]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda x, y: tf.data.Dataset.from_tensor_slices(
                (np.zeros((8, 10, 10, 1), "float32"), y[:8])
            ).batch(4),
            r"`dataset x` does not fit.*Received: samples of shape "
            r"\(10, 10, 1\)",
        ),
        (
            lambda x, y: tf.data.Dataset.from_tensor_slices(
                (x, keras.utils.to_categorical(y % 5, 5))
            ).batch(4),
            r"width differs.*Received: labels of shape \(n, 5\)",
        ),
        (
            lambda x, y: (
                tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0)
            ),
            r"The dataset is empty\. Received: a tf.data.Dataset of "
            r"cardinality 0",
        ),
    ],
    ids=["input_shape", "one_hot_width", "empty"],
)
def test_tf_data_spec_is_checked(make, match):
    model = functional()
    model.compile()
    before = model.get_weights()
    x, y = labelled_images(8)
    with pytest.raises(ValueError, match=match):
        model.fit(make(x, y), verbose=0)
    assert_weights_close(before, model.get_weights(), atol=0)


def test_tf_data_values_are_not_scanned():
    """Documented limit: a NaN inside a dataset is not seen by the checks
    (it would need a pass over the data); the guard handles it."""
    model = functional()
    model.compile(skip_nonfinite=True)
    x, y, _ = bad("nan_x")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    history = model.fit(ds, verbose=0).history
    assert history["nonfinite_steps"] == [1.0]


def test_label_format():
    assert checks.label_format((), (10,)) == "sparse"
    assert checks.label_format((1,), (10,)) == "sparse"
    assert checks.label_format((10,), (10,)) == "one_hot"
    assert checks.label_format((), (1,)) == "binary"
    assert checks.label_format((None,), (10,)) == "unknown"
    assert checks.label_format((7,), (7, 10)) == "sparse"  # per time step
    with pytest.raises(ValueError, match=r"Received: labels of shape"):
        checks.label_format((7, 3), (10,))


def test_binary_labels_must_lie_in_unit_interval():
    checks.check_labels(np.array([0, 1, 1.0, 0.3]), (1,))
    with pytest.raises(ValueError, match=r"Binary labels must lie in"):
        checks.check_labels(np.array([0, 1, 2]), (1,))


def test_finite_check_ignores_integers_and_names_the_first_bad_value():
    checks.check_finite("x", np.arange(10))
    checks.check_finite("x", {"a": np.zeros(3), "b": [np.ones(2)]})
    with pytest.raises(ValueError, match=r"index \(1,\) \(value nan\)"):
        checks.check_finite("x", {"a": np.zeros(3), "b": np.array([0, np.nan])})


def test_module_docstring_example_runs(capsys):
    (example,) = re.findall(r"```python\n(.*?)```", checks.__doc__, re.S)
    exec(compile(example, "<checks example>", "exec"), {})
    assert "Labels must be class ids in [0, 3)" in capsys.readouterr().out
