"""TapeModel: parity with built-in fit(), gradient pieces, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import strategy_scope
from helpers import update_size

import fitcustom

N_FEATURES = 6
N_CLASSES = 3
LOSS = "sparse_categorical_crossentropy"


def _layers(inputs, regularizer=True, batchnorm=True):
    reg = keras.regularizers.L2(1e-2) if regularizer else None
    h = keras.layers.Dense(16, activation="relu", kernel_regularizer=reg)(
        inputs
    )
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    return keras.layers.Dense(N_CLASSES, activation="softmax", dtype="float32")(
        h
    )


def make_pair(strategy=None, **kwargs):
    """A keras.Model and a TapeModel with identical initial weights."""
    scope = strategy_scope(strategy)
    with scope:
        inputs = keras.Input((N_FEATURES,))
        reference = keras.Model(inputs, _layers(inputs, **kwargs))
        inputs = keras.Input((N_FEATURES,))
        ours = fitcustom.TapeModel(inputs, _layers(inputs, **kwargs))
        ours.set_weights(reference.get_weights())
    return reference, ours


def trainable(model):
    return [v.numpy() for v in model.trainable_weights]


def make_data(n=70, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype("float32")
    y = rng.integers(0, N_CLASSES, size=(n,)).astype("int32")
    return x, y


def compile_both(models, strategy=None, optimizer=lambda: "adam", **kwargs):
    scope = strategy_scope(strategy)
    with scope:
        for m in models:
            m.compile(optimizer=optimizer(), loss=LOSS, **kwargs)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_fit_parity_across_modes(mode):
    """Class weights, regularizer, BatchNorm, short last batch, validation."""
    x, y = make_data(70)
    xv, yv = make_data(23, seed=1)
    reference, ours = make_pair()
    compile_both(
        (reference, ours),
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
        **MODES[mode],
    )
    kwargs = dict(
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        class_weight={0: 1.0, 1: 2.5, 2: 0.5},
        validation_data=(xv, yv),
    )
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)
    assert "val_loss" in h_ours and len(h_ours["loss"]) == 3


def test_fit_parity_sample_weight_and_tf_data():
    x, y = make_data(70)
    sw = np.random.default_rng(2).uniform(0.1, 2.0, size=70).astype("float32")
    reference, ours = make_pair()
    compile_both((reference, ours), weighted_metrics=["accuracy"])
    h_ref = reference.fit(
        x,
        y,
        sample_weight=sw,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
    ).history
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(16)
    h_ours = ours.fit(ds, epochs=2, verbose=0).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


def test_evaluate_and_predict_match_builtin():
    x, y = make_data(70)
    reference, ours = make_pair()
    compile_both((reference, ours), metrics=["accuracy"])
    for m in (reference, ours):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    xe, ye = make_data(37, seed=3)
    ev_ref = reference.evaluate(
        xe, ye, batch_size=8, verbose=0, return_dict=True
    )
    ev_ours = ours.evaluate(xe, ye, batch_size=8, verbose=0, return_dict=True)
    assert ev_ref.keys() == ev_ours.keys()
    for k in ev_ref:
        np.testing.assert_allclose(ev_ours[k], ev_ref[k], rtol=1e-6)
    np.testing.assert_allclose(
        ours.predict(xe, batch_size=8, verbose=0),
        reference.predict(xe, batch_size=8, verbose=0),
        rtol=1e-6,
        atol=1e-7,
    )


class SkipsLossScaling(fitcustom.TapeModel):
    """A step that forgets mixed precision's loss scaling, to prove the test
    catches it."""

    def scale_loss(self, loss, optimizer=None):
        return loss


def test_mixed_float16_parity_and_update_size():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    reference, ours = make_pair()
    inputs = keras.Input((N_FEATURES,))
    broken = SkipsLossScaling(inputs, _layers(inputs))
    broken.set_weights(reference.get_weights())
    compile_both((reference, ours, broken), optimizer=lambda: "sgd")
    assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
    start = trainable(reference)
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    broken.fit(x, y, **kwargs)
    size_ref = update_size(start, trainable(reference))
    size_ours = update_size(start, trainable(ours))
    size_broken = update_size(start, trainable(broken))
    assert size_ref > 1e-3
    assert size_ours == pytest.approx(size_ref, rel=1e-4)
    # The comparison is able to fail: skipping scale_loss shrinks the update
    # by the loss scale (32768).
    assert size_broken < size_ref / 1000
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


def test_mirrored_strategy_parity(two_replicas):
    x, y = make_data(70)
    reference, ours = make_pair(two_replicas)
    compile_both((reference, ours), two_replicas, metrics=["accuracy"])
    kwargs = dict(
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        class_weight={0: 1.0, 1: 2.0, 2: 1.0},
    )
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


def test_two_replicas_train_what_one_device_trains(two_replicas):
    """No BatchNorm: its per-replica batch statistics differ by design."""
    x, y = make_data(70)
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    _, single = make_pair(regularizer=True, batchnorm=False)
    init = single.get_weights()
    _, mirrored = make_pair(two_replicas, regularizer=True, batchnorm=False)
    mirrored.set_weights(init)
    compile_both((single,), metrics=["accuracy"])
    compile_both((mirrored,), two_replicas, metrics=["accuracy"])
    h_single = single.fit(x, y, **kwargs).history
    h_mirrored = mirrored.fit(x, y, **kwargs).history
    assert update_size(init, single.get_weights()) > 1e-2
    assert_weights_close(single.get_weights(), mirrored.get_weights())
    assert_history_close(h_single, h_mirrored, rtol=1e-5)


def _subclassed(network_kwargs=None):
    class Net(fitcustom.TapeModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.out = keras.layers.Dense(N_CLASSES, activation="softmax")

        def call(self, inputs, training=None):
            return self.out(self.hidden(inputs))

    return Net()


@pytest.mark.parametrize(
    "construction", ["positional", "keywords", "subclass", "wrapped"]
)
def test_constructions_train_like_builtin(construction):
    x, y = make_data(48)
    inputs = keras.Input((N_FEATURES,))
    reference = keras.Model(
        inputs, _layers(inputs, regularizer=False, batchnorm=False)
    )
    if construction == "positional":
        ours = fitcustom.TapeModel(reference.inputs, reference.outputs)
        ours = keras.models.clone_model(ours)
    elif construction == "keywords":
        inputs = keras.Input((N_FEATURES,))
        ours = fitcustom.TapeModel(
            inputs=inputs, outputs=_layers(inputs, False, False)
        )
    elif construction == "subclass":
        ours = _subclassed()
        ours(x[:1])
    else:
        inner = keras.models.clone_model(reference)
        ours = fitcustom.TapeModel(network=inner)
        ours(x[:1])
    assert isinstance(ours, fitcustom.TapeModel)
    ours.set_weights(reference.get_weights())
    compile_both((reference, ours), optimizer=lambda: "sgd")
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


@pytest.mark.parametrize(
    "options",
    [
        dict(gradient_accumulation_steps=2),
        dict(use_ema=True, ema_overwrite_frequency=3),
        dict(weight_decay=0.05),
        dict(global_clipnorm=0.5),
    ],
    ids=["accumulation", "ema", "weight_decay", "optimizer_clipnorm"],
)
def test_optimizer_options_keep_working(options):
    x, y = make_data(70)
    reference, ours = make_pair()
    compile_both(
        (reference, ours),
        optimizer=lambda: keras.optimizers.AdamW(
            learning_rate=0.01, **{"weight_decay": 0.0, **options}
        ),
    )
    start = reference.get_weights()
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ref = reference.fit(x, y, **kwargs).history
    h_ours = ours.fit(x, y, **kwargs).history
    assert update_size(start, ours.get_weights()) > 1e-3
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)
    assert_weights_close(
        [v.numpy() for v in reference.optimizer.variables],
        [v.numpy() for v in ours.optimizer.variables],
    )


def test_step_traced_with_the_static_batch_shape():
    # The batch is read outside the compiled step, so its first trace sees
    # the real batch size (as a hand-written loop's does), not the
    # dataset's unknown one; a short last batch gets its own static trace
    # (Keras weighs per-output loss logs by the static batch size).
    class Recording(fitcustom.TapeModel):
        shapes = []

        def train_step(self, data):
            type(self).shapes.append(tuple(data[0].shape))
            return super().train_step(data)

    x, y = make_data(70)
    inputs = keras.Input((N_FEATURES,))
    model = Recording(inputs, _layers(inputs))
    model.compile(optimizer="adam", loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model.fit(dataset, epochs=3, verbose=0, shuffle=False)
    assert Recording.shapes == [(16, N_FEATURES), (6, N_FEATURES)]


def test_multi_step_loop_keeps_the_static_batch_shape():
    # steps_per_execution=3 over 4 batches of 16 and one of 6: the loop's
    # graph is traced for (16, ...) - with the step twice: the call's
    # first batch, then the loop's - and for the short batch's (6, ...)
    # (as for steps_per_execution=1), not again in later epochs. Keras'
    # own multi-step loop traces only (None, ...).
    class Recording(fitcustom.TapeModel):
        shapes = []

        def train_step(self, data):
            type(self).shapes.append(tuple(data[0].shape))
            return super().train_step(data)

    x, y = make_data(70)
    inputs = keras.Input((N_FEATURES,))
    model = Recording(inputs, _layers(inputs))
    model.compile(optimizer="adam", loss=LOSS, steps_per_execution=3)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model.fit(dataset, epochs=3, verbose=0)
    assert Recording.shapes == [(16, N_FEATURES)] * 2 + [(6, N_FEATURES)] * 2
    assert int(model.optimizer.iterations) == 15


def test_multi_step_over_changing_batch_shapes_keeps_parity(spe=4):
    # Batches of 12 different sizes (each one ends the loop of the batch
    # before it; more shapes than graphs kept), two epochs, evaluation
    # with the same steps_per_execution: the same weights, history and
    # optimizer iterations as built-in fit().
    x, y = make_data(78)
    sizes = list(range(1, 13))  # 1 + 2 + ... + 12 = 78
    ends = np.cumsum(sizes)

    def batches():
        for end, size in zip(ends, sizes):
            yield x[end - size : end], y[end - size : end]

    spec = (
        tf.TensorSpec((None, N_FEATURES), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    reference, ours = make_pair()
    compile_both(
        (reference, ours), metrics=["accuracy"], steps_per_execution=spe
    )
    xv, yv = make_data(23, seed=1)
    kwargs = dict(epochs=2, verbose=0, validation_data=(xv, yv))
    h_ref = reference.fit(dataset, **kwargs).history
    h_ours = ours.fit(dataset, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)
    assert int(ours.optimizer.iterations) == 24
    assert int(reference.optimizer.iterations) == 24


def _count_step_function_calls(monkeypatch):
    """Counts calls of fitcustom's compiled step through `tf.function`'s
    own `__call__` (the path that binds arguments on every call)."""
    from tensorflow.python.eager.polymorphic_function import (
        polymorphic_function,
    )

    calls = []
    original = polymorphic_function.Function.__call__

    def spy(self, *args, **kwargs):
        if self._python_function.__name__ == "one_step_on_data":
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(polymorphic_function.Function, "__call__", spy)
    return calls


def test_steps_call_their_traced_graph_directly(monkeypatch):
    # Full and short batches each get a graph once; every step then calls
    # its graph (a concrete function) without `tf.function`'s dispatch.
    calls = _count_step_function_calls(monkeypatch)
    x, y = make_data(70)
    reference, ours = make_pair()
    compile_both((reference, ours), metrics=["accuracy"])
    kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ours = ours.fit(x, y, **kwargs).history
    assert calls == []
    h_ref = reference.fit(x, y, **kwargs).history
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


def test_changing_batch_shapes_and_structure_keep_parity(monkeypatch):
    # fit() with sample weights, then fit() on batches of 12 different
    # sizes (more than the step function keeps graphs for) and without
    # them (a new structure): the same weights and history as built-in
    # fit(), and one optimizer iteration per batch.
    calls = _count_step_function_calls(monkeypatch)
    x, y = make_data(78)
    sizes = list(range(1, 13))  # 1 + 2 + ... + 12 = 78
    ends = np.cumsum(sizes)

    def batches():
        for end, size in zip(ends, sizes):
            yield x[end - size : end], y[end - size : end]

    spec = (
        tf.TensorSpec((None, N_FEATURES), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    sw = np.linspace(0.2, 2.0, 78).astype("float32")
    reference, ours = make_pair()
    compile_both((reference, ours), weighted_metrics=["accuracy"])
    histories = []
    for model in (reference, ours):
        del calls[:]  # Keras' own step function has the same name
        first = model.fit(
            x,
            y,
            sample_weight=sw,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
        ).history
        # One epoch: on a dataset of unknown size built-in fit() counts an
        # extra optimizer iteration when the data runs out (Keras 3.15.1:
        # 13 for these 12 batches), which shifts Adam's later updates.
        second = model.fit(dataset, epochs=1, verbose=0).history
        histories.append((first, second))
    # Beyond the graphs it keeps, fitcustom's step goes through
    # `tf.function`.
    assert len(calls) > 0
    assert_weights_close(reference.get_weights(), ours.get_weights())
    for h_ref, h_ours in zip(*histories):
        assert_history_close(h_ref, h_ours)
    assert int(ours.optimizer.iterations) == 5 + 12


def test_untested_keras_falls_back_to_keras_step_function(monkeypatch):
    # On a Keras version fitcustom was not tested with, the step function
    # is Keras' own (no private import), and training is unchanged.
    x, y = make_data(70)
    reference, ours = make_pair()
    reference.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    ours.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    seen = []
    original = keras.Model._make_function

    def spy(self, step):
        seen.append(step)
        return original(self, step)

    monkeypatch.setattr(keras.Model, "_make_function", spy)
    hist_ours = ours.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert seen, "Keras' own step function was not used"
    monkeypatch.undo()
    hist_ref = reference.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert_weights_close(ours.get_weights(), reference.get_weights())
    assert_history_close(hist_ours.history, hist_ref.history)


def test_train_function_traced_once_over_epochs():
    traces = []

    class Counting(fitcustom.TapeModel):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    x, y = make_data(64)
    inputs = keras.Input((N_FEATURES,))
    model = Counting(inputs, _layers(inputs))
    model.compile(
        optimizer="adam",
        loss=LOSS,
        gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
        log_gradient_norm=True,
        skip_nonfinite=True,
    )
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert len(traces) == 1
    # A short last batch may add one (shape-relaxed) trace, never one per
    # epoch.
    model.fit(x[:60], y[:60], batch_size=16, epochs=5, verbose=0)
    assert len(traces) <= 2


# ----------------------------------------------------------------------
# Gradient pieces, each against the same computation by hand
# ----------------------------------------------------------------------


def _hand_gradients(model, x, y):
    """Gradient of the compiled loss (incl. regularizers) at the weights."""
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = keras.losses.SparseCategoricalCrossentropy()(y, y_pred)
        loss = loss + tf.add_n([tf.zeros(())] + list(model.losses))
    return tape.gradient(loss, model.trainable_weights)


def test_gradient_norm_is_epoch_mean_of_global_norms():
    x, y = make_data(64)
    _, model = make_pair(batchnorm=False)
    # Learning rate 0: weights stay, so every batch's norm is computable by
    # hand from the initial weights.
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=LOSS, log_gradient_norm=True
    )
    history = model.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0
    ).history
    norms = [
        float(
            tf.linalg.global_norm(
                _hand_gradients(model, x[i : i + 16], y[i : i + 16])
            )
        )
        for i in range(0, 64, 16)
    ]
    assert len(set(round(n, 4) for n in norms)) > 1
    np.testing.assert_allclose(
        history["gradient_norm"], [np.mean(norms)], rtol=1e-5
    )


def _one_sgd_step(model, x, y, **compile_kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), loss=LOSS, **compile_kwargs
    )
    before = trainable(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [b - a for a, b in zip(trainable(model), before)]


def test_clip_by_global_norm_matches_hand_clipping():
    x, y = make_data(32)
    _, model = make_pair(batchnorm=False)
    grads = _hand_gradients(model, x, y)
    raw_norm = float(tf.linalg.global_norm(grads))
    max_norm = raw_norm / 4  # clipping is active
    expected, _ = tf.clip_by_global_norm(grads, max_norm)
    applied = _one_sgd_step(
        model, x, y, gradient_transforms=[fitcustom.ClipByGlobalNorm(max_norm)]
    )
    assert_weights_close([g.numpy() for g in expected], applied, atol=1e-6)
    assert float(tf.linalg.global_norm(applied)) == pytest.approx(
        max_norm, rel=1e-5
    )


def test_clipping_after_all_reduce_is_replica_independent(two_replicas):
    """ClipByGlobalNorm: 1 and 2 replicas take the same step; Keras'
    `global_clipnorm` (applied per replica, before the all-reduce) does not.
    """
    x, y = make_data(32)
    _, single = make_pair(batchnorm=False)
    init = single.get_weights()
    max_norm = float(tf.linalg.global_norm(_hand_gradients(single, x, y))) / 4
    _, mirrored = make_pair(two_replicas, batchnorm=False)
    mirrored.set_weights(init)
    transforms = [fitcustom.ClipByGlobalNorm(max_norm)]
    step_1 = _one_sgd_step(single, x, y, gradient_transforms=transforms)
    with two_replicas.scope():
        step_2 = _one_sgd_step(mirrored, x, y, gradient_transforms=transforms)
    assert_weights_close(step_1, step_2, atol=1e-6)

    # The optimizer's own clipping differs between 1 and 2 replicas.
    _, single = make_pair(batchnorm=False)
    single.set_weights(init)
    _, mirrored = make_pair(two_replicas, batchnorm=False)
    mirrored.set_weights(init)

    def keras_clip_step(model):
        model.compile(
            optimizer=keras.optimizers.SGD(1.0, global_clipnorm=max_norm),
            loss=LOSS,
        )
        before = trainable(model)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        return update_size(before, trainable(model))

    size_1 = keras_clip_step(single)
    with two_replicas.scope():
        size_2 = keras_clip_step(mirrored)
    assert abs(size_1 - size_2) > 0.1 * size_1


def test_nonfinite_guard_skips_step_and_keeps_optimizer_state():
    x, y = make_data(64)
    x_bad = x.copy()
    x_bad[16:32] = np.nan  # the second batch is poisoned
    _, guarded = make_pair(batchnorm=False)
    init = guarded.get_weights()
    _, clean = make_pair(batchnorm=False)
    clean.set_weights(init)
    guarded.compile(
        optimizer="adam", loss=LOSS, metrics=["accuracy"], skip_nonfinite=True
    )
    clean.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    h_guarded = guarded.fit(
        x_bad, y, batch_size=16, epochs=2, shuffle=False, verbose=0
    ).history
    keep = np.r_[0:16, 32:64]
    h_clean = clean.fit(
        tf.data.Dataset.from_tensor_slices((x[keep], y[keep])).batch(16),
        epochs=2,
        verbose=0,
    ).history
    assert h_guarded["nonfinite_steps"] == [1.0, 1.0]
    assert guarded.optimizer.iterations.numpy() == 6
    # Skipping the poisoned batch == never seeing it: weights, optimizer
    # state (Adam moments, iterations) and the logged loss/accuracy.
    assert_weights_close(clean.get_weights(), guarded.get_weights())
    assert_weights_close(
        [v.numpy() for v in clean.optimizer.variables],
        [v.numpy() for v in guarded.optimizer.variables],
    )
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(h_guarded[key], h_clean[key], rtol=1e-6)


def test_nonfinite_guard_on_two_replicas(two_replicas):
    x, y = make_data(32)
    x[3] = np.inf  # one sample on the first replica only
    _, model = make_pair(two_replicas, batchnorm=False)
    init = model.get_weights()
    with two_replicas.scope():
        model.compile(optimizer="adam", loss=LOSS, skip_nonfinite=True)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert history["nonfinite_steps"] == [1.0]
    assert_weights_close(init, model.get_weights(), atol=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_nonfinite_guard_with_mixed_precision_keeps_loss_scale():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(32)
    x[0] = np.nan
    _, model = make_pair(batchnorm=False)
    init = model.get_weights()
    model.compile(optimizer="sgd", loss=LOSS, skip_nonfinite=True)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert history["nonfinite_steps"] == [1.0]
    assert_weights_close(init, model.get_weights(), atol=0)
    # A NaN input is not an overflow: the loss scale must not be halved.
    assert float(model.optimizer.dynamic_scale.numpy()) == 32768.0


def test_without_guard_nan_reaches_the_weights():
    """The guard's test can fail: without it the same batch corrupts."""
    x, y = make_data(32)
    x[0] = np.nan
    _, model = make_pair(batchnorm=False)
    model.compile(optimizer="adam", loss=LOSS)
    # (fit() would put the last finite weights back at the epoch's end.)
    model.train_on_batch(x, y)
    assert not all(np.isfinite(w).all() for w in model.get_weights())


def test_transforms_compose_in_order():
    x, y = make_data(32)
    _, model = make_pair(batchnorm=False)
    grads = _hand_gradients(model, x, y)
    first = model.layers[1].name  # the hidden Dense
    max_norm = float(tf.linalg.global_norm(grads)) / 10
    scaled = [g * (0.0 if i < 2 else 1.0) for i, g in enumerate(grads)]
    expected, _ = tf.clip_by_global_norm(scaled, max_norm)
    applied = _one_sgd_step(
        model,
        x,
        y,
        gradient_transforms=[
            fitcustom.ScaleByLayer({first: 0.0}),
            fitcustom.ClipByGlobalNorm(max_norm),
        ],
    )
    assert np.all(applied[0] == 0) and np.all(applied[1] == 0)
    assert_weights_close([g.numpy() for g in expected], applied, atol=1e-6)


# ----------------------------------------------------------------------
# Bad input: a clear ValueError before any weight changes
# ----------------------------------------------------------------------


def test_fit_before_compile_is_refused():
    x, y = make_data(16)
    _, model = make_pair()
    init = model.get_weights()
    with pytest.raises(ValueError, match=r"fit\(\) was called before compile"):
        model.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"evaluate\(\) was called before"):
        model.evaluate(x, y, verbose=0)
    assert_weights_close(init, model.get_weights(), atol=0)


def test_compile_without_loss_is_refused():
    """Keras' own message reaches the user, before any weight changes."""
    x, y = make_data(16)
    _, model = make_pair(regularizer=False)
    init = model.get_weights()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="^No loss to compute. Provide a `lo"):
        model.fit(x, y, verbose=0)
    assert_weights_close(init, model.get_weights(), atol=0)


def test_compute_loss_returning_none_is_refused():
    class NoLoss(fitcustom.TapeModel):
        def compute_loss(self, *args, **kwargs):
            return None

    x, y = make_data(16)
    inputs = keras.Input((x.shape[1],))
    model = NoLoss(inputs, keras.layers.Dense(1)(inputs))
    init = model.get_weights()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"NoLoss.compute_loss\(\) returned "):
        model.fit(x, y, verbose=0)
    assert_weights_close(init, model.get_weights(), atol=0)


def test_batch_that_cannot_be_unpacked_is_refused():
    x, y = make_data(16)
    _, model = make_pair()
    init = model.get_weights()
    model.compile(optimizer="adam", loss=LOSS)
    ds = tf.data.Dataset.from_tensor_slices((x, y, y, y)).batch(8)
    with pytest.raises(ValueError, match="cannot unpack a batch of 4"):
        model.fit(ds, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    with pytest.raises(ValueError, match="without targets"):
        model.fit(ds, verbose=0)
    assert_weights_close(init, model.get_weights(), atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gradient_transforms=[lambda g, v, m: g]), "GradientTransform"),
        (dict(gradient_transforms="clip"), "must be a list"),
        (dict(log_gradient_norm="yes"), "log_gradient_norm"),
        (dict(skip_nonfinite=1), "skip_nonfinite"),
    ],
    ids=["lambda_transform", "string_transforms", "log_flag", "guard_flag"],
)
def test_bad_compile_options_are_refused(kwargs, match):
    _, model = make_pair()
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="adam", loss=LOSS, **kwargs)


@pytest.mark.parametrize("value", [0, -1.0, "1", None, True])
def test_clip_by_global_norm_refuses_bad_norm(value):
    with pytest.raises(ValueError, match="max_norm"):
        fitcustom.ClipByGlobalNorm(value)


# ----------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------


@pytest.mark.parametrize("construction", ["functional", "wrapped"])
def test_save_and_load_keeps_training_exactly(tmp_path, construction):
    x, y = make_data(64)
    reference, model = make_pair()
    if construction == "wrapped":
        model = fitcustom.TapeModel(network=reference)
    model.compile(
        optimizer="adam",
        loss=LOSS,
        metrics=["accuracy"],
        gradient_transforms=[fitcustom.ClipByGlobalNorm(0.5)],
        log_gradient_norm=True,
        skip_nonfinite=True,
    )
    kwargs = dict(batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.fit(x, y, **kwargs)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, fitcustom.TapeModel)
    assert repr(loaded.gradient_transforms) == repr(model.gradient_transforms)
    h_model = model.fit(x, y, **kwargs).history
    h_loaded = loaded.fit(x, y, **kwargs).history
    assert_weights_close(model.get_weights(), loaded.get_weights(), atol=0)
    assert_history_close(h_model, h_loaded, rtol=0, atol=0)
