"""Bad arguments to compile() / fit() / evaluate(): a clear ValueError
before any weight changes, where Keras 3.15 trains silently or fails
inside TensorFlow."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fitcustom
from fitcustom import checks

N = 32


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = np.arange(N) % 3
    return x, y


def _model(cls=fitcustom.TapeModel, **compile_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = cls(inputs, keras.layers.Dense(3)(inputs))
    kwargs = dict(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    kwargs.update(compile_kwargs)
    model.compile(**kwargs)
    return model


def _refused(model, match, **fit_kwargs):
    x, y = _data()
    kwargs = dict(x=x, y=y, verbose=0)
    kwargs.update(fit_kwargs)
    before = model.get_weights()
    with pytest.raises(ValueError, match=match):
        model.fit(**kwargs)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


FIT_CASES = {
    "batch_size_zero": (dict(batch_size=0), "batch_size=0"),
    "batch_size_negative": (dict(batch_size=-4), "batch_size=-4"),
    "batch_size_float": (dict(batch_size=2.5), "batch_size=2.5"),
    "validation_batch_size": (
        dict(validation_split=0.25, validation_batch_size=0),
        "validation_batch_size=0",
    ),
    "sample_weight_negative": (
        dict(sample_weight=np.r_[-1.0, np.ones(N - 1)]),
        "sample_weight.*>= 0.*minimum -1.0 at index 0",
    ),
    "sample_weight_all_zero": (
        dict(sample_weight=np.zeros(N)),
        "0 for every sample",
    ),
    "sample_weight_per_class": (
        dict(sample_weight=np.ones((N, 3))),
        r"one weight per sample.*\(32, 3\) for targets of shape \(32,\)",
    ),
    "class_weight_missing_class": (
        dict(class_weight={0: 1.0, 1: 2.0}),
        r"no weight for classes \[2\]",
    ),
    "class_weight_string_keys": (
        dict(class_weight={"0": 1.0, "1": 1.0, "2": 1.0}),
        "integer class ids.*'0'",
    ),
    "class_weight_negative": (
        dict(class_weight={0: 1.0, 1: -1.0, 2: 1.0}),
        ">= 0",
    ),
    # Both failed only after the first epoch had trained.
    "validation_x_of_another_width": (
        dict(validation_data=(np.ones((8, 4), "float32"), np.zeros(8))),
        r"`validation_data x` does not fit.*\(4,\).*Expected: \(5,\)",
    ),
    "validation_without_targets": (
        dict(validation_data=(np.ones((8, 5), "float32"),)),
        "validation_data has no targets",
    ),
    # Keras warns "ran out of data" and returns an empty history.
    "zero_samples": (
        dict(x=np.ones((0, 5), "float32"), y=np.zeros(0, "int64")),
        r"empty.*0 samples \(shape \(0, 5\)\)",
    ),
    "empty_dataset": (
        dict(
            x=tf.data.Dataset.from_tensor_slices(
                (np.ones((4, 5), "float32"), np.zeros(4, "int64"))
            )
            .batch(2)
            .take(0),
            y=None,
        ),
        "dataset is empty.*0 batches",
    ),
}


@pytest.mark.parametrize("case", list(FIT_CASES), ids=list(FIT_CASES))
@pytest.mark.parametrize("cls", ["TapeModel", "TapeClassifier"])
def test_bad_fit_arguments_are_refused(case, cls):
    fit_kwargs, match = FIT_CASES[case]
    _refused(_model(getattr(fitcustom, cls)), match, **fit_kwargs)


def test_keras_trains_silently_on_the_same_arguments():
    """Control: built-in fit() takes batch_size=0, negative sample weights,
    string class-weight keys and a weight per class for each sample without
    a word (the weights move)."""
    x, y = _data()
    for kwargs in (
        dict(batch_size=0),
        dict(sample_weight=-np.ones(N)),
        dict(class_weight={"0": 1.0, "1": 1.0, "2": 1.0}),
        # (batch,) losses times (batch, 3) weights broadcast for batches
        # of 1 or 3 samples (and fail inside TensorFlow otherwise).
        dict(sample_weight=np.ones((N, 3)), batch_size=1),
    ):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = model.get_weights()
        model.fit(x, y, verbose=0, **kwargs)
        assert not np.array_equal(before[0], model.get_weights()[0]), kwargs


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_steps_per_execution_is_refused(value):
    with pytest.raises(ValueError, match="steps_per_execution"):
        _model(steps_per_execution=value)


def test_fit_without_an_optimizer_is_refused():
    model = _model(optimizer=None)
    _refused(model, "needs an optimizer.*optimizer=None")
    x, y = _data()
    model.evaluate(x, y, verbose=0)  # evaluation needs none


def test_endless_dataset_without_steps_is_refused():
    x, y = _data()
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model = _model()
    _refused(model, "endless.*steps_per_epoch=N", x=endless, y=None)
    with pytest.raises(ValueError, match="endless"):
        model.evaluate(endless, verbose=0)
    history = model.fit(endless, steps_per_epoch=2, verbose=0).history
    assert len(history["loss"]) == 1


def _classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(3)(inputs))
    model.compile()
    return model


def test_pandas_data_is_checked_like_arrays():
    import pandas as pd

    x, y = _data()
    frame, labels = pd.DataFrame(x), pd.Series(y)
    bad = frame.copy()
    bad.iloc[3, 2] = np.nan
    _refused(_classifier(), "NaN", x=bad, y=labels)
    _refused(_classifier(), r"class ids in \[0, 3\)", x=frame, y=labels + 1)
    history = _classifier().fit(frame, labels, verbose=0).history
    assert np.isfinite(history["loss"][0])


@pytest.mark.parametrize(
    "x, y, match",
    [
        ("same", np.array(["cat", "dog"] * (N // 2)), "np.unique"),
        (
            np.array([[1.0] * 5] * (N - 1) + [[1.0]], dtype=object),
            "same",
            "dtype object",
        ),
        ([[0.0] * 5] * N, "same", "Python list.*np.asarray"),
    ],
    ids=["string_labels", "ragged_object_array", "python_list"],
)
def test_non_numeric_data_gets_a_message(x, y, match):
    good_x, good_y = _data()
    x = good_x if isinstance(x, str) else x
    y = good_y if isinstance(y, str) else y
    _refused(_classifier(), match, x=x, y=y)


def test_refit_with_labels_of_another_format():
    x, y = _data()
    model = _classifier()
    model.fit(x, y, verbose=0)
    one_hot = keras.utils.to_categorical(y, 3)
    _refused(model, "one-hot rows now.*class ids.*compile", x=x, y=one_hot)
    model.compile()  # as the message says
    model.fit(x, one_hot, verbose=0)


def test_validation_data_of_the_wrong_shape_before_epoch_one():
    x, y = _data()
    _refused(
        _classifier(),
        r"shape \(4,\).*Expected: \(5,\)",
        x=x,
        y=y,
        validation_data=(x[:, :4], y),
    )


def test_sequence_weights_for_sequence_targets_are_accepted():
    """One weight per time step is Keras' temporal weighting, not a
    mistake: (n, T) weights for (n, T) sparse targets train."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 5))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.default_rng(0).normal(size=(8, 4, 5)).astype("float32")
    y = np.arange(32).reshape(8, 4) % 3
    weights = np.ones((8, 4), "float32")
    weights[:, 2:] = 0.0
    model.fit(x, y, sample_weight=weights, verbose=0)


def test_metrics_for_an_output_the_model_lacks_are_refused():
    # Keras accepts the dict and logs nothing for the unknown name.
    with pytest.raises(ValueError, match=r"\['nope'\].*outputs are \['out'\]"):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        out = keras.layers.Dense(3, name="out")(inputs)
        fitcustom.TapeModel(inputs, out).compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics={"nope": ["accuracy"]},
        )


def _dataset(labels, batch=16):
    x, _ = _data()
    n = len(labels)
    return tf.data.Dataset.from_tensor_slices((x[:n], labels)).batch(batch)


def _good_then_bad(bad_label):
    """Two batches of 16: class ids 0..2, then one `bad_label`."""
    labels = np.r_[np.arange(16) % 3, np.arange(16) % 3].astype("int32")
    labels[20] = bad_label
    return labels


@pytest.mark.parametrize(
    "cls, compile_kwargs",
    [
        (fitcustom.TapeModel, {}),
        (fitcustom.TapeModel, dict(loss="sparse_categorical_crossentropy")),
        # One-hot encoded first: an id of 12 becomes a row of zeros and
        # trains silently, on a CPU too.
        (
            fitcustom.TapeClassifier,
            dict(loss=None, label_smoothing=0.1, check_inputs=False),
        ),
        (fitcustom.TapeClassifier, dict(loss=None, check_inputs=False)),
    ],
    ids=["sparse_loss", "loss_name", "smoothed_classifier", "classifier"],
)
@pytest.mark.parametrize("bad", [12, -1])
def test_class_ids_out_of_range_in_a_dataset_stop_before_their_update(
    cls, compile_kwargs, bad
):
    labels = _good_then_bad(bad)
    model = _model(cls, **compile_kwargs)
    with pytest.raises(
        ValueError,
        match=rf"class id outside \[0, 3\).*Received: the label {bad} ",
    ):
        model.fit(_dataset(labels), epochs=1, shuffle=False, verbose=0)
    # The first batch trained, the bad one did not.
    reference = _model(cls, **compile_kwargs)
    reference.fit(_dataset(labels[:16]), epochs=1, verbose=0)
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=rf"label {bad} "):
        model.evaluate(_dataset(labels), verbose=0)


def _two_heads(list_outputs=False):
    """Class ids for two outputs of 3 and 5 classes, a loss each."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8)(inputs)
    kind = keras.layers.Dense(3, name="kind")(h)
    size = keras.layers.Dense(5, name="size")(h)
    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if list_outputs:
        model = fitcustom.TapeModel(inputs, [kind, size])
        loss = [sparse, "sparse_categorical_crossentropy"]
    else:
        model = fitcustom.TapeModel(inputs, {"kind": kind, "size": size})
        loss = {"kind": sparse, "size": "sparse_categorical_crossentropy"}
    model.compile(optimizer="sgd", loss=loss)
    return model


@pytest.mark.parametrize("list_outputs", [False, True], ids=["dict", "list"])
def test_class_ids_of_each_output_are_checked_before_the_update(list_outputs):
    """Each output's labels against its own width, by the engine's check
    (TensorFlow's cross-entropy also fails on a CPU, after its own
    fashion; on a GPU it gives NaN)."""
    x, _ = _data()
    kinds = (np.arange(32) % 3).astype("int32")
    sizes = (np.arange(32) % 5).astype("int32")
    sizes[20] = 7  # the second batch's

    def dataset(n):
        y = [kinds[:n], sizes[:n]]
        y = tuple(y) if list_outputs else {"kind": y[0], "size": y[1]}
        return tf.data.Dataset.from_tensor_slices((x[:n], y)).batch(16)

    model = _two_heads(list_outputs)
    with pytest.raises(
        ValueError, match=r"class id outside \[0, 5\).*label 7 "
    ):
        model.fit(dataset(32), epochs=1, verbose=0)
    reference = _two_heads(list_outputs)
    reference.fit(dataset(16), epochs=1, verbose=0)
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The engine's own check (what guards a GPU, where the cross-entropy
    # gives NaN): the bad id of the second output stops it, the control
    # passes.
    y_pred = model(x[:2])
    for ids, ok in (([4, 0], True), ([4, 7], False)):
        y = {"kind": tf.constant([0, 2]), "size": tf.constant(ids)}
        if list_outputs:
            y = [y["kind"], y["size"]]
        if ok:
            assert model.check_class_ids(y, y_pred, ["g"]) == ["g"]
            continue
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            model.check_class_ids(y, y_pred, ["g"])
        assert checks.CLASS_ID_MARKER in str(e.value)


def test_class_ids_from_a_generator_are_checked():
    x, _ = _data()
    labels = _good_then_bad(7)

    def batches():
        for start in (0, 16):
            yield x[start : start + 16], labels[start : start + 16]

    model = _model()
    with pytest.raises(ValueError, match=r"label 7 .*give the output layer 8"):
        model.fit(batches(), epochs=1, verbose=0)


def test_the_ignored_class_is_accepted():
    labels = _good_then_bad(-1)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1
    )
    model = _model(loss=loss)
    history = model.fit(_dataset(labels), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
