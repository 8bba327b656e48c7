"""Steps written by hand with the engine's tools: named optimizers,
`minimize`, `log_loss` / `log_mean`, EMA copies and `all_gather`.

Each claim of parity trains both ways from the same weights on the same
data and compares weights and logs, with a control that the comparison
fails for the mistake it is there to catch.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from task_harness import Interrupt

import fitcustom
from fitcustom import distribute
from fitcustom.testing import check_replicas


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class TwoPlayers(fitcustom.TapeModel):
    """Two networks, two optimizers, terms of different shapes: `left`
    fits the targets, `right` fits `left`'s output per pixel (a term of
    shape (batch, 2, 2)), and an EMA copy follows `right`."""

    config_models = ("left", "right")

    def __init__(
        self,
        left,
        right,
        ema_decay=0.5,
        twice=False,
        match_weight=None,
        by_hand=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.left = left
        self.right = right
        self.twice = twice
        self.match_weight = match_weight
        self.by_hand = by_hand
        self.ema_right = self.track_ema(self.right, ema_decay, "right")

    def call(self, x, training=False):
        return self.right(self.left(x, training=training), training=training)

    def train_step(self, data):
        x, y, sample_weight = self.unpack_data(data)
        with tf.GradientTape(persistent=True) as tape:
            h = self.left(x, training=True)
            y = tf.cast(y, h.dtype)
            fit = tf.reduce_sum(tf.square(h - y), axis=-1)
            patches = tf.reshape(self.right(h, training=True), [-1, 2, 2])
            target = tf.reshape(tf.stop_gradient(h[:, :4]), [-1, 2, 2])
            match = tf.square(patches - target)
            if self.twice:  # the mistake: dividing by the replicas again
                match = match / distribute.num_replicas()
            self.minimize(tape, {"fit": fit}, optimizer="left")
            weights = None
            if self.match_weight and self.by_hand:
                match = match * self.match_weight
            elif self.match_weight:
                weights = {"match": self.match_weight}
            self.minimize(
                tape, {"match": match}, optimizer="right", loss_weights=weights
            )

    def test_step(self, data):
        x, y, _ = self.unpack_data(data)
        h = self.left(x)
        self.log_loss({"fit": tf.reduce_sum(tf.square(h - y), axis=-1)})
        self.log_mean("output_mean", self(x))


def two_players(twice=False, decay=0.5, **kwargs):
    a = keras.Input((6,))
    left = keras.Model(a, keras.layers.Dense(4, activation="tanh")(a))
    b = keras.Input((4,))
    right = keras.Model(b, keras.layers.Dense(4)(keras.layers.Dense(8)(b)))
    model = TwoPlayers(left, right, ema_decay=decay, twice=twice, **kwargs)
    model.compile(
        optimizer={
            "left": keras.optimizers.SGD(0.1),
            "right": keras.optimizers.SGD(0.2, momentum=0.5),
        }
    )
    return model


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.tanh(x[:, :4] + 0.3).astype("float32")
    return x, y


def test_two_optimizers_on_two_replicas_train_what_one_device_trains(
    two_replicas,
):
    x, y = data()
    report = check_replicas(
        two_players,
        x,
        y,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
    )
    assert report.weight_change > 0.05, report
    report.assert_ok()


def test_a_term_divided_twice_fails_the_replica_comparison(two_replicas):
    x, y = data()
    report = check_replicas(
        lambda: two_players(twice=True),
        x,
        y,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
    )
    assert not report.ok and report.weight_diff > 1e-3, report


def test_loss_log_is_the_sum_of_the_minimised_terms():
    x, y = data()
    model = two_players()
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert sorted(logs) == ["fit", "loss", "match"]
    total = np.add(logs["fit"], logs["match"])
    np.testing.assert_allclose(logs["loss"], total, rtol=1e-6)
    assert min(logs["loss"]) > 0.01


def test_a_weighted_term_is_minimised_weighted_and_logged_unweighted():
    x, y = data()
    runs = {}
    for kind in ("loss_weights", "by_hand", "unweighted"):
        keras.utils.set_random_seed(3)  # the same initial weights
        model = two_players(
            match_weight=None if kind == "unweighted" else 4.0,
            by_hand=kind == "by_hand",
        )
        logs = model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
        ).history
        runs[kind] = (model.get_weights(), logs)
    (weights, logs), (hand, hand_logs) = runs["loss_weights"], runs["by_hand"]
    for u, v in zip(weights, hand):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    # Logged unweighted: a quarter of the term multiplied by hand.
    np.testing.assert_allclose(
        logs["match"], np.divide(hand_logs["match"], 4.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        logs["loss"],
        np.add(logs["fit"], np.multiply(4.0, logs["match"])),
        rtol=1e-6,
    )
    np.testing.assert_allclose(logs["loss"], hand_logs["loss"], rtol=1e-6)
    # Control: without the weight the update is another one.
    far = max(
        np.abs(u - v).max() for u, v in zip(weights, runs["unweighted"][0])
    )
    assert far > 1e-3


def test_terms_and_logged_values_reach_the_validation_logs():
    x, y = data()
    model = two_players()
    logs = model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y)
    ).history
    assert {"val_loss", "val_fit", "val_output_mean"} <= set(logs)
    evaluated = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    # The epoch mean over samples, whatever the batching.
    np.testing.assert_allclose(
        evaluated["output_mean"],
        np.mean(model.predict(x, verbose=0)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(evaluated["fit"], evaluated["loss"])


def test_each_optimizer_updates_its_own_network_and_the_ema_follows():
    x, y = data()
    model = two_players(decay=0.5)
    left0 = [w.numpy() for w in model.left.weights]
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizers["left"].iterations) == 1
    assert int(model.optimizers["right"].iterations) == 1
    assert any(
        np.abs(w.numpy() - w0).max() > 0
        for w, w0 in zip(model.left.weights, left0)
    )
    # First applied update: the copy equals the network.
    for e, w in zip(model.ema_right.weights, model.right.weights):
        np.testing.assert_array_equal(e.numpy(), w.numpy())
    before = [e.numpy() for e in model.ema_right.weights]
    model.fit(x[16:32], y[16:32], batch_size=16, epochs=1, verbose=0)
    for e, e0, w in zip(model.ema_right.weights, before, model.right.weights):
        np.testing.assert_allclose(
            e.numpy(), 0.5 * e0 + 0.5 * w.numpy(), rtol=1e-6, atol=1e-7
        )
    assert not model.ema_right.trainable_weights


def test_named_optimizers_are_saved_and_loaded(tmp_path):
    x, y = data()
    model = two_players()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "two.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert sorted(loaded.optimizers) == ["left", "right"]
    for name in ("left", "right"):
        a = [v.numpy() for v in model.optimizers[name].variables]
        b = [v.numpy() for v in loaded.optimizers[name].variables]
        assert len(a) == len(b) > 1
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for u, v in zip(model.ema_right.weights, loaded.ema_right.weights):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for u, v in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_backup_resumes_two_optimizers_and_the_ema_exactly(tmp_path):
    x, y = data()
    keras.utils.set_random_seed(3)
    whole = two_players()
    initial = whole.get_weights()
    whole_logs = whole.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False
    ).history
    keras.utils.set_random_seed(3)
    model = two_players()
    model.set_weights(initial)
    backup = fitcustom.BackupAndRestore(str(tmp_path / "b"), save_freq=2)
    with pytest.raises(KeyboardInterrupt):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[backup, Interrupt(4)],
        )
    keras.utils.set_random_seed(3)
    resumed = two_players()
    logs = resumed.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[
            fitcustom.BackupAndRestore(str(tmp_path / "b"), save_freq=2)
        ],
    ).history
    for u, v in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(u, v)
    for key in ("loss", "fit", "match"):
        np.testing.assert_allclose(
            logs[key][-1], whole_logs[key][-1], rtol=1e-6
        )


def test_mixed_precision_wraps_every_named_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    model = two_players()
    for optimizer in model.optimizers.values():
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class Contrastive(fitcustom.TapeModel):
    """Two noisy views of each sample, an InfoNCE loss with every other
    sample of the global batch as negatives (or of this replica's part of
    it, the mistake)."""

    def __init__(self, encoder, gather=True, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.gather = gather

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    def train_step(self, data):
        x, _, _ = self.unpack_data(data)
        views = x[:, :6], x[:, 6:]
        with tf.GradientTape() as tape:
            a, b = (
                tf.math.l2_normalize(self.encoder(v, training=True), axis=1)
                for v in views
            )
            keys = distribute.all_gather(b) if self.gather else b
            rows = (
                distribute.local_rows(tf.shape(a)[0])
                if self.gather
                else tf.range(tf.shape(a)[0])
            )
            logits = tf.matmul(a, keys, transpose_b=True) / 0.2
            nce = tf.nn.sparse_softmax_cross_entropy_with_logits(rows, logits)
            self.minimize(tape, {"nce": nce})


def contrastive(gather=True):
    inputs = keras.Input((6,))
    encoder = keras.Model(inputs, keras.layers.Dense(5)(inputs))
    model = Contrastive(encoder, gather=gather)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model


def contrastive_data():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 6))
    views = np.concatenate(
        [
            base + 0.1 * rng.normal(size=base.shape),
            base + 0.1 * rng.normal(size=base.shape),
        ],
        axis=1,
    )
    return views.astype("float32")


def test_contrastive_negatives_over_the_global_batch(two_replicas):
    report = check_replicas(
        contrastive,
        contrastive_data(),
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
    )
    assert report.weight_change > 0.05, report
    report.assert_ok()


def test_contrasting_per_replica_fails_the_comparison(two_replicas):
    report = check_replicas(
        lambda: contrastive(gather=False),
        contrastive_data(),
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
    )
    assert not report.ok and report.weight_diff > 1e-3, report


# ----------------------------------------------------------------------
# Bad input: a clear ValueError before any weight changes
# ----------------------------------------------------------------------


class BadStep(fitcustom.TapeModel):
    def __init__(
        self,
        make_terms,
        optimizer_name="main",
        variables=None,
        loss_weights=None,
        minimize_kwargs=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.term_weights = loss_weights
        self.minimize_kwargs = minimize_kwargs or {}
        self.net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        self.other = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2)]
        )
        self.make_terms = make_terms
        self.optimizer_name = optimizer_name
        self.use_variables = variables

    def call(self, x, training=False):
        return self.net(x)

    def optimizer_variables(self, name):
        return self.net.trainable_weights if name == "main" else None

    def train_step(self, data):
        x, _, _ = self.unpack_data(data)
        variables = None
        if self.use_variables == "other":
            variables = self.other.trainable_weights
        with tf.GradientTape() as tape:
            terms = self.make_terms(self.net(x, training=True))
            self.minimize(
                tape,
                terms,
                variables=variables,
                optimizer=self.optimizer_name,
                loss_weights=self.term_weights,
                **{
                    k: v(x) if callable(v) else v
                    for k, v in self.minimize_kwargs.items()
                },
            )


BAD_STEPS = {
    "unknown optimizer": (
        dict(
            make_terms=lambda p: {"a": tf.reduce_sum(p, 1)},
            optimizer_name="nope",
        ),
        "no optimizer named 'nope'.*Expected one of.*'main'",
    ),
    "scalar term": (
        dict(make_terms=lambda p: {"a": tf.reduce_mean(p)}),
        "'a' must give one value per sample.*a scalar",
    ),
    "other batch size": (
        dict(make_terms=lambda p: {"a": p[:, 0], "b": p[:4, 0]}),
        "same batch size.*'b' with 4 values and 'a' with 8",
    ),
    "term without the batch axis": (
        # A per-feature mean over the batch: 2 values, not 8.
        dict(make_terms=lambda p: {"a": tf.reduce_mean(p, axis=0)}),
        "'a' has 2 values on its first axis, which is no size of the "
        "step's batch.*8 samples.*batch_size=N",
    ),
    "term of another size than batch_size": (
        dict(
            make_terms=lambda p: {"a": p[:, 0]},
            minimize_kwargs={"batch_size": 4},
        ),
        "'a' has 8 values.*the update's batch_size is 4",
    ),
    "sample_weight of another size": (
        dict(
            make_terms=lambda p: {"a": p[:, 0]},
            minimize_kwargs={"sample_weight": lambda x: tf.ones([3])},
        ),
        "`sample_weight` needs one weight per sample.*3 weights for terms "
        "of 8 values",
    ),
    "integer term": (
        dict(make_terms=lambda p: {"a": tf.cast(p[:, 0] > 0, tf.int32)}),
        "takes float values.*'a' of dtype int32",
    ),
    "weight of a term not there": (
        dict(
            make_terms=lambda p: {"a": tf.reduce_sum(p, 1)},
            loss_weights={"b": 2.0},
        ),
        "names a term the update does not have: 'b'.*\\['a'\\]",
    ),
    "weight not a number": (
        dict(
            make_terms=lambda p: {"a": tf.reduce_sum(p, 1)},
            loss_weights={"a": "big"},
        ),
        "loss_weights\\['a'\\]",
    ),
    "variables of another network": (
        dict(
            make_terms=lambda p: {"a": tf.reduce_sum(p, 1)}, variables="other"
        ),
        "2 weights that optimizer was not built for",
    ),
}


@pytest.mark.parametrize("data", ["arrays", "dataset", "eager"])
@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_minimize_is_refused_before_any_update(case, data):
    """The same error whether the trace knows the batch size (arrays of
    one batch), only the running step does (a dataset whose last batch
    is short: batch size None in the trace) or the step runs eagerly."""
    kwargs, message = BAD_STEPS[case]
    model = BadStep(**kwargs)
    model.compile(optimizer={"main": "sgd"}, run_eagerly=data == "eager")
    before = model.get_weights()
    x = np.ones((8, 3), "float32")
    if data == "dataset":
        x = tf.data.Dataset.from_tensor_slices(np.ones((11, 3), "float32"))
        x = x.batch(8)
        assert x.element_spec.shape[0] is None
    with pytest.raises(ValueError, match=message):
        model.fit(x, batch_size=None if data == "dataset" else 8, verbose=0)
    for u, v in zip(before, model.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_terms_of_a_part_of_the_batch_with_their_batch_size():
    # The control of the size checks: an update of half the batch that
    # says so trains (and logs the half's mean).
    model = BadStep(
        make_terms=lambda p: {"a": tf.square(p[::2, 0])},
        minimize_kwargs={"batch_size": lambda x: tf.shape(x)[0] // 2},
    )
    model.compile(optimizer={"main": "sgd"})
    x = tf.data.Dataset.from_tensor_slices(np.ones((12, 3), "float32"))
    logs = model.fit(x.batch(8), verbose=0).history
    assert logs["a"][0] > 0
    assert int(model.optimizers["main"].iterations) == 2


def test_ema_of_a_network_outside_the_model_is_refused():
    class Foreign(fitcustom.TapeModel):
        def __init__(self):
            super().__init__()
            stranger = keras.Sequential(
                [keras.Input((2,)), keras.layers.Dense(1)]
            )
            self.track_ema(stranger, 0.9)

    with pytest.raises(ValueError, match="not one of its layers"):
        Foreign()


def test_log_mean_outside_a_step_is_refused():
    model = two_players()
    with pytest.raises(ValueError, match="outside fit"):
        model.log_mean("x", tf.ones([3]))


def test_minimize_outside_a_step_is_refused_before_it_updates():
    model = two_players()
    x, _ = data(8)
    model.left(x)
    before = model.get_weights()
    with tf.GradientTape() as tape:
        out = model.left(x)
        with pytest.raises(ValueError, match="outside fit"):
            model.minimize(tape, {"a": tf.reduce_sum(out, 1)}, optimizer="left")
    for u, v in zip(before, model.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_minimize_after_the_tape_block_is_refused():
    # A term computed after the `with` block is not recorded on the tape:
    # its gradient would be missing, silently.
    class AfterTheBlock(fitcustom.TapeModel):
        def __init__(self):
            super().__init__()
            self.net = keras.Sequential(
                [keras.Input((3,)), keras.layers.Dense(2)]
            )

        def call(self, x, training=False):
            return self.net(x)

        def train_step(self, data):
            x, _, _ = self.unpack_data(data)
            with tf.GradientTape() as tape:
                out = self.net(x, training=True)
            self.minimize(tape, {"a": tf.reduce_sum(tf.square(out), 1)})

    model = AfterTheBlock()
    model.compile(optimizer="sgd")
    before = model.get_weights()
    with pytest.raises(ValueError, match="inside the tape's `with` block"):
        model.fit(np.ones((8, 3), "float32"), batch_size=8, verbose=0)
    for u, v in zip(before, model.get_weights()):
        np.testing.assert_array_equal(u, v)


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class BuiltByTraining(fitcustom.TapeModel):
    """Sub-models made in `__init__` without an input shape: `encoder`
    is built by `call()`, `probe` (used by the step only, as in a
    SimCLR-style step) by calling it once before `fit()`, under a name
    Keras' saving visits after `layers`; with `in_list`, the probe sits
    in a list instead."""

    def __init__(self, in_list=False, **kwargs):
        super().__init__(**kwargs)
        self.in_list = in_list
        self.encoder = keras.Sequential([keras.layers.Dense(8, "relu")])
        probe = keras.Sequential([keras.layers.Dense(3)])
        if in_list:
            self.stages = [probe]
        else:
            self.probe = probe

    def get_probe(self):
        return self.stages[0] if self.in_list else self.probe

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    def train_step(self, data):
        x, y, _ = self.unpack_data(data)
        with tf.GradientTape() as tape:
            z = self.encoder(x, training=True)
            out = self.get_probe()(z, training=True)
            fit = tf.reduce_sum(tf.square(out - y[:, :3]), -1)
            self.minimize(tape, {"fit": fit})

    def get_config(self):
        return {**super().get_config(), "in_list": self.in_list}


def _built_by_training(in_list=False):
    keras.utils.set_random_seed(3)
    model = BuiltByTraining(in_list=in_list)
    model.compile(optimizer="adam")
    x, y = data(32)
    model.get_probe()(model(x[:1]))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return model, x


def test_sub_models_built_by_training_load_with_their_weights(tmp_path):
    model, x = _built_by_training()
    path = str(tmp_path / "built_by_training.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.probe.built
    assert len(loaded.weights) == len(model.weights) == 4
    for u, v in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    np.testing.assert_allclose(
        loaded.probe(loaded(x)), model.probe(model(x)), atol=1e-6
    )
    # Control: a probe built the same way, never trained, is far away.
    fresh = BuiltByTraining()
    fresh.get_probe()(fresh(x[:1]))
    moved = np.abs(model.probe(model(x)) - fresh.probe(model(x))).max()
    assert moved > 1e-1


def test_a_sub_model_that_cannot_be_rebuilt_fails_to_load_loudly(tmp_path):
    # Keras itself skips the weights of a sub-model that is not built when
    # they are read, silently: the loaded probe would have fresh weights.
    model, x = _built_by_training(in_list=True)
    path = str(tmp_path / "in_list.keras")
    model.save(path)
    with pytest.raises(ValueError, match="has 4 weights; this one has 2"):
        keras.saving.load_model(path)
    weights = str(tmp_path / "in_list.weights.h5")
    model.save_weights(weights)
    fresh = BuiltByTraining(in_list=True)
    fresh(x[:1])
    with pytest.raises(ValueError, match=r"Not built: .*sequential"):
        fresh.load_weights(weights)


def test_a_sub_model_first_built_by_the_step_is_refused_with_the_fix():
    model = BuiltByTraining()
    model.compile(optimizer="sgd")
    x, y = data(16)
    with pytest.raises(ValueError, match="a sub-model that the step builds"):
        model.fit(x, y, epochs=1, verbose=0)
