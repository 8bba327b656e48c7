"""TapeClassifier: parity with built-in fit(), defaults, SAM, bad input."""

import json

import keras
import numpy as np
import pytest
import task_harness
import tensorflow as tf
from helpers import MODES
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import labelled_images

import fitcustom
from fitcustom import architectures
from fitcustom.datasets import load_digits

mlp = architectures.mlp_body
vgg_like = architectures.vgg_body


def pair(body, shape):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    reference = keras.Model(inputs, body(inputs))
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    ours = fitcustom.TapeClassifier(inputs, body(inputs))
    ours.set_weights(reference.get_weights())
    return reference, ours


def classifier_task(body, shape, n, fit_kwargs, learning_rate=None, **defaults):
    """A harness `Task` of `TapeClassifier(body)` on `n` labelled images,
    compiled with `defaults` (and the harness's mode arguments); with
    `learning_rate`, a new `SGD` of that rate for each model."""

    def build(**compile_kwargs):
        _, model = pair(body, shape)
        if learning_rate is not None:
            compile_kwargs["optimizer"] = keras.optimizers.SGD(learning_rate)
        model.compile(**defaults, **compile_kwargs)
        return model

    return task_harness.Task(
        build, lambda: labelled_images(n, shape), fit_kwargs
    )


CASES = [
    pytest.param(mlp, (28, 28), mode, id=f"mlp-{mode}") for mode in MODES
] + [pytest.param(vgg_like, (28, 28, 1), "graph", id="vgg_like_cnn-graph")]


@pytest.mark.parametrize("body, shape, mode", CASES)
def test_defaults_train_like_builtin(body, shape, mode):
    """compile() defaults == Adam + sparse CE from logits + accuracy."""
    xv, yv = labelled_images(24, shape, seed=1)
    task = classifier_task(
        body,
        shape,
        96,
        dict(
            batch_size=32,
            epochs=2,
            shuffle=False,
            validation_data=(xv, yv),
        ),
    )
    references = []

    def built_in(initial):
        reference, _ = pair(body, shape)
        reference.set_weights(initial)
        reference.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            **MODES[mode],
        )
        history = task.fit(reference)
        references.append(reference)
        return reference.get_weights(), history

    ours = task_harness.check_reference(task, built_in, modes=[mode])[mode]
    assert isinstance(ours.optimizer, keras.optimizers.Adam)
    # The same logs as built-in fit(), validation included (the harness
    # compared their values).
    logs = {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert set(references[0].history.history) == logs
    assert set(ours.history.history) == logs
    ev_ref = references[0].evaluate(xv, yv, verbose=0, return_dict=True)
    ev_ours = ours.evaluate(xv, yv, verbose=0, return_dict=True)
    assert ev_ref == pytest.approx(ev_ours, rel=1e-6)


def test_explicit_arguments_win_over_defaults():
    x, y = labelled_images(64, (28, 28))
    reference, ours = pair(mlp, (28, 28))
    for model in (reference, ours):
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseTopKCategoricalAccuracy(3)],
        )
    kwargs = dict(batch_size=32, epochs=1, shuffle=False, verbose=0)
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert "accuracy" not in h_ours
    assert isinstance(ours.optimizer, keras.optimizers.SGD)
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


def test_functional_keyword_construction_and_network_wrap():
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(inputs)
    by_keyword = fitcustom.TapeClassifier(inputs=inputs, outputs=outputs)
    wrapped = fitcustom.TapeClassifier(network=keras.Model(inputs, outputs))
    for model in (by_keyword, wrapped):
        assert model.num_classes == 3 and model.from_logits is True
        model.compile()
        x = np.zeros((4, 5), "float32")
        np.testing.assert_allclose(model.predict(x, verbose=0), 1 / 3)


def test_predict_returns_probabilities_and_classes():
    x, _ = labelled_images(16, (28, 28))
    reference, ours = pair(mlp, (28, 28))
    logits = reference.predict(x, verbose=0)
    probabilities = ours.predict(x, verbose=0)
    np.testing.assert_allclose(
        probabilities, tf.nn.softmax(logits).numpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(ours.predict_classes(x), logits.argmax(-1))


def test_probability_outputs_are_detected():
    inputs = keras.Input((5,))
    softmax_model = fitcustom.TapeClassifier(
        inputs, keras.layers.Dense(3, activation="softmax")(inputs)
    )
    assert softmax_model.from_logits is False
    inputs = keras.Input((5,))
    logits_model = fitcustom.TapeClassifier(
        inputs, keras.layers.Dense(3)(inputs)
    )
    assert logits_model.from_logits is True
    x = np.random.default_rng(0).random((8, 5), dtype=np.float32)
    out = softmax_model.predict(x, verbose=0)
    np.testing.assert_allclose(out, softmax_model(x).numpy(), rtol=1e-6)
    # Declared wins over detected.
    inputs = keras.Input((5,))
    declared = fitcustom.TapeClassifier(
        inputs, keras.layers.Dense(3)(inputs), from_logits=False
    )
    assert declared.from_logits is False


def test_softmax_op_and_log_softmax_outputs_are_detected():
    inputs = keras.Input((5,))
    ops_softmax = fitcustom.TapeClassifier(
        inputs, keras.ops.softmax(keras.layers.Dense(3)(inputs))
    )
    assert ops_softmax.from_logits is False  # layers[-1] is a linear Dense
    inputs = keras.Input((5,))
    log_softmax = fitcustom.TapeClassifier(
        inputs, keras.layers.Dense(3, activation="log_softmax")(inputs)
    )
    assert log_softmax.from_logits is True  # log-probabilities are logits
    inner = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="softmax")]
    )
    assert fitcustom.TapeClassifier(network=inner).from_logits is False


def test_single_logit_is_binary_with_accuracy_on_logits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    inputs = keras.Input((4,))
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(1)(inputs))
    model.compile()
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    logits = model(x).numpy()[:, 0]
    # Keras' "accuracy" would threshold the logit at 0.5.
    assert logs["accuracy"] == pytest.approx(np.mean((logits > 0) == y))
    assert np.mean((logits > 0.5) == y) != pytest.approx(logs["accuracy"])
    expected = keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_array_equal(model.predict_classes(x), logits > 0)


def test_one_hot_labels_and_label_smoothing_for_both_formats():
    x, y = labelled_images(64, (28, 28))
    one_hot = keras.utils.to_categorical(y, 10)
    _, sparse_model = pair(mlp, (28, 28))
    _, onehot_model = pair(mlp, (28, 28))
    ref, _ = pair(mlp, (28, 28))
    sparse_model.compile(label_smoothing=0.1)
    onehot_model.compile(label_smoothing=0.1)
    ref.compile(
        optimizer="adam",
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1
        ),
        metrics=["accuracy"],
    )
    kwargs = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
    h_sparse = sparse_model.fit(x, y, **kwargs).history
    h_onehot = onehot_model.fit(x, one_hot, **kwargs).history
    h_ref = ref.fit(x, one_hot, **kwargs).history
    assert_weights_close(ref.get_weights(), onehot_model.get_weights())
    assert_weights_close(ref.get_weights(), sparse_model.get_weights())
    np.testing.assert_allclose(h_sparse["loss"], h_ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(h_onehot["loss"], h_ref["loss"], rtol=1e-6)
    # Smoothing changes the loss (the test can fail).
    plain, _ = pair(mlp, (28, 28))
    plain.compile(
        optimizer="adam",
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    h_plain = plain.fit(x, one_hot, **kwargs).history
    assert abs(h_plain["loss"][0] - h_ref["loss"][0]) > 1e-3


def test_classifier_loss_with_unknown_label_rank():
    """After a retrace with relaxed shapes the labels' rank is unknown; the
    loss then tells the formats apart at run time."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32")
    ids = rng.integers(0, 4, size=6)
    loss = fitcustom.ClassifierLoss(label_smoothing=0.1)
    relaxed = tf.function(
        lambda t, p: loss(t, p),
        input_signature=[
            tf.TensorSpec(None, tf.float32),
            tf.TensorSpec([None, 4], tf.float32),
        ],
    )
    expected = float(loss(keras.utils.to_categorical(ids, 4), logits))
    for labels in (ids, ids[:, None], keras.utils.to_categorical(ids, 4)):
        got = float(relaxed(labels.astype("float32"), logits))
        assert got == pytest.approx(expected, rel=1e-6)


def test_backbone_head_and_layer_scaling():
    x, y = labelled_images(64, (28, 28))
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
        ],
        name="backbone",
    )
    model = fitcustom.TapeClassifier(backbone=backbone, num_classes=10)
    model.compile(
        gradient_transforms=[fitcustom.ScaleByLayer({"backbone": 0.0})],
        skip_nonfinite=True,
    )
    model.fit(x[:1], y[:1], verbose=0, epochs=1)  # builds
    frozen = [w.numpy() for w in backbone.weights]
    head = model.get_layer("classifier_head")
    head_before = [w.numpy() for w in head.weights]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert_weights_close(frozen, [w.numpy() for w in backbone.weights], atol=0)
    assert (
        max(
            np.abs(a - b.numpy()).max()
            for a, b in zip(head_before, head.weights)
        )
        > 1e-3
    )
    assert model.predict(x, verbose=0).shape == (64, 10)


def mlp_bn(inputs):
    """The MLP with BatchNorm and Dropout: SAM must restore the moving
    statistics after its second pass."""
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.layers.Dense(10)(h)


def test_layer_scaling_composes_with_clipping_and_guard():
    """ScaleByLayer then ClipByGlobalNorm under the guard equals scaling and
    clipping by hand before an SGD step; a NaN batch changes nothing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, size=16)

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="relu", name="body")(inputs)
        return inputs, keras.layers.Dense(3, name="head")(h)

    reference = keras.Model(*build())
    ours = fitcustom.TapeClassifier(*build())
    ours.compile(
        optimizer=keras.optimizers.SGD(0.5),
        gradient_transforms=[
            fitcustom.ScaleByLayer({"body": 0.1}),
            fitcustom.ClipByGlobalNorm(0.05),
        ],
        skip_nonfinite=True,
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = reference.trainable_weights
    with tf.GradientTape() as tape:
        loss = loss_fn(y, reference(x, training=True))
    grads = tape.gradient(loss, variables)
    body = {id(v) for v in reference.get_layer("body").trainable_weights}
    grads = [g * 0.1 if id(v) in body else g for g, v in zip(grads, variables)]
    norm = float(tf.linalg.global_norm(grads))
    assert norm > 0.05  # the clip is active
    for v, g in zip(variables, grads):
        v.assign_sub(0.5 * g * (0.05 / norm))
    ours.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert_weights_close(reference.get_weights(), ours.get_weights())
    before = ours.get_weights()
    x_bad = x.copy()
    x_bad[0, 0] = np.nan
    ours.compile(
        optimizer=keras.optimizers.SGD(0.5),
        gradient_transforms=list(ours.gradient_transforms),
        skip_nonfinite=True,
        check_inputs=False,
    )
    logs = ours.fit(x_bad, y, batch_size=16, verbose=0).history
    assert logs["nonfinite_steps"] == [1.0]
    assert_weights_close(before, ours.get_weights(), atol=0)


@pytest.mark.parametrize(
    "optimizer, scales, match",
    [
        (lambda: "adam", {"body": 0.1}, "Adam normalises"),
        (
            lambda: keras.optimizers.SGD(0.1, weight_decay=0.01),
            {"body": 0.0},
            "weight_decay=0.01 still",
        ),
    ],
    ids=["adaptive_optimizer", "weight_decay_on_frozen"],
)
def test_scaling_that_cannot_work_warns(optimizer, scales, match):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, name="body")(inputs)
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(3)(h))
    with pytest.warns(UserWarning, match=match):
        model.compile(
            optimizer=optimizer(),
            gradient_transforms=[fitcustom.ScaleByLayer(scales)],
        )


def _hand_sam(model, x, y, rho, lr, steps, batch):
    """SAM written out: perturb, second gradient, restore, SGD step."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(lr)
    variables = model.trainable_weights
    for step in range(steps):
        xb = x[step * batch : (step + 1) * batch]
        yb = y[step * batch : (step + 1) * batch]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        norm = tf.linalg.global_norm(grads)
        saved = [v.numpy() for v in variables]
        stats = [v.numpy() for v in model.non_trainable_weights]
        for v, g in zip(variables, grads):
            v.assign_add(g * (rho / (norm + 1e-12)))
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        sharp = tape.gradient(loss, variables)
        for v, w in zip(variables, saved):
            v.assign(w)
        for v, w in zip(model.non_trainable_weights, stats):
            v.assign(w)
        optimizer.apply_gradients(zip(sharp, variables))


def sam_task(body, n):
    """SAM (rho 0.05, SGD 0.1) on `n` images, batches of 16."""
    return classifier_task(
        body,
        (28, 28),
        n,
        dict(batch_size=16, shuffle=False),
        learning_rate=0.1,
        sam_rho=0.05,
    )


SAM = sam_task(mlp_bn, 48)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_sam_equals_hand_written_sam_loop(mode):
    x, y = SAM.data()

    def hand_written(initial):
        reference, _ = pair(mlp_bn, (28, 28))
        reference.set_weights(initial)
        _hand_sam(reference, x, y, rho=0.05, lr=0.1, steps=3, batch=16)
        return reference.get_weights(), {}

    # Trainable weights and BatchNorm's moving statistics.
    ours = task_harness.check_reference(SAM, hand_written, modes=[mode])[mode]
    # SAM differs from the plain step (the comparison can fail).
    _, plain = pair(mlp_bn, (28, 28))
    plain.compile(optimizer=keras.optimizers.SGD(0.1))
    plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert (
        max(
            np.abs(a - b).max()
            for a, b in zip(plain.get_weights(), ours.get_weights())
        )
        > 1e-5
    )


def test_sam_skips_a_nan_batch_without_corrupting_weights():
    """The first pass's NaN gradient must not become the perturbation."""
    x, y = labelled_images(48, (28, 28))
    x[20, 3, 3] = np.nan  # in the second batch of 16
    _, ours = pair(mlp, (28, 28))
    ours.compile(sam_rho=0.05, skip_nonfinite=True, check_inputs=False)
    history = ours.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0
    ).history
    assert history["nonfinite_steps"] == [1.0]
    assert np.isfinite(history["loss"][0])
    assert all(np.isfinite(w).all() for w in ours.get_weights())


def test_sam_survives_loss_scale_overflow():
    """Under mixed precision an overflowing first gradient (inf) must not
    move the weights: the optimizer skips the step and lowers its scale."""
    keras.config.set_dtype_policy("mixed_float16")
    x, y = labelled_images(64, (28, 28))
    _, ours = pair(mlp, (28, 28))
    before = ours.get_weights()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**24
    )
    ours.compile(optimizer=optimizer, sam_rho=0.05)
    ours.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    after = ours.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert float(ours.optimizer.dynamic_scale) < 2.0**24
    assert max(np.abs(a - b).max() for a, b in zip(before, after)) > 1e-4


def test_sam_two_replicas_match_one_device(two_replicas):
    report = task_harness.check_two_replicas(
        sam_task(mlp, 32),
        two_replicas,
        weight_tolerance=1e-6,
        log_tolerance=1e-5,
    )
    assert report.weight_change > 1e-4  # it trained


@pytest.mark.parametrize("variant", ["defaults", "sam", "layer_scaling"])
def test_learns_digits(variant):
    """>= 95% held-out accuracy on scikit-learn's digits."""
    (x, y), (xt, yt) = load_digits()
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(128, activation="relu", name="hidden")(h)
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(10)(h))
    options = {
        "defaults": {},
        "sam": {"sam_rho": 0.05},
        # SGD: under Adam a gradient factor hardly changes the step.
        "layer_scaling": {
            "optimizer": keras.optimizers.SGD(0.2, momentum=0.9),
            "gradient_transforms": [fitcustom.ScaleByLayer({"hidden": 0.5})],
        },
    }[variant]
    model.compile(**options)
    model.fit(x, y, batch_size=32, epochs=30, verbose=0)
    accuracy = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    print(f"{variant}: test accuracy {accuracy:.4f}")
    assert accuracy >= 0.95


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="mse", label_smoothing=0.1), "label_smoothing"),
        (dict(sam_rho=-1), "sam_rho"),
        (dict(check_inputs="no"), "check_inputs"),
    ],
)
def test_bad_compile_arguments(kwargs, match):
    inputs = keras.Input((4,))
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match=match):
        model.compile(**kwargs)


def test_backbone_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        fitcustom.TapeClassifier(backbone=keras.layers.Dense(4))


# ----------------------------------------------------------------------
# Save, load in a fresh process, continue exactly
# ----------------------------------------------------------------------


def build_resumable(**compile_kwargs):
    """The harness's classifier (see `task_harness`): SAM, label
    smoothing, a gradient transform, BatchNormalization."""
    _, model = pair(mlp_bn, (28, 28))
    model.compile(
        label_smoothing=0.1,
        sam_rho=0.05,
        gradient_transforms=[fitcustom.ClipByGlobalNorm(2.0)],
        **compile_kwargs,
    )
    return model


RESUMABLE = task_harness.Task(
    build_resumable,
    lambda: labelled_images(64, (28, 28)),
    dict(batch_size=16, shuffle=False),
)


@pytest.mark.slow
def test_save_load_in_fresh_process_continues_exactly(tmp_path):
    result = task_harness.check_continue_in_fresh_process(
        "test_classifier", "RESUMABLE", tmp_path
    )
    assert result["steps"] == [8]
    model = build_resumable()
    config = json.loads(json.dumps(model.get_compile_config()))
    assert config["label_smoothing"] == 0.1
    assert config["sam_rho"] == 0.05


def test_subclass_with_call_trains_like_builtin():
    class Net(fitcustom.TapeClassifier):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.flatten = keras.layers.Flatten()
            self.hidden = keras.layers.Dense(32, activation="relu")
            self.out = keras.layers.Dense(10)

        def call(self, inputs, training=None):
            return self.out(self.hidden(self.flatten(inputs)))

    x, y = labelled_images(48, (28, 28))
    ours = Net()
    ours(x[:1])
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28))
    h = keras.layers.Dense(32, activation="relu")(
        keras.layers.Flatten()(inputs)
    )
    reference = keras.Model(inputs, keras.layers.Dense(10)(h))
    ours.set_weights(reference.get_weights())
    assert ours.from_logits is True
    reference.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ours.compile()
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)
