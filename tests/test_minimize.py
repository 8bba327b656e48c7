"""What `minimize` promises beyond the two-network step of
test_custom_steps: sample weights as built-in `fit()` weighs them,
gradient transforms on the global gradients with several replicas, the
regularization losses of every sub-model an optimizer trains, an update
written with `update()` logged like one of `minimize`, and callbacks that
reach a named optimizer.

Each comparison trains both ways from the same initial weights on the
same data, with a control that it can fail.
"""

import keras
import numpy as np
import tensorflow as tf

import fitcustom
from fitcustom import distribute
from fitcustom.testing import check_replicas


def regression(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x[:, :2] * 0.7 + 0.1).astype("float32")
    w = rng.uniform(0.0, 2.0, size=(n,)).astype("float32")
    return x, y, w


def _max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


class WeightedStep(fitcustom.TapeModel):
    """Minimises the per-sample squared error with the batch's sample
    weights (or, the control, without them)."""

    def __init__(self, *args, use_weights=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_weights = use_weights

    def train_step(self, data):
        x, y, sample_weight = self.unpack_data(data)
        with tf.GradientTape() as tape:
            out = self(x, training=True)
            per_sample = tf.reduce_mean(tf.square(out - y), axis=-1)
            self.minimize(
                tape,
                per_sample,
                sample_weight=sample_weight if self.use_weights else None,
            )


def _dense_model(cls, **kwargs):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(8)(inputs))
    return cls(inputs, outputs, **kwargs)


def test_sample_weight_in_minimize_trains_like_builtin_fit():
    x, y, w = regression()
    fit = dict(sample_weight=w, batch_size=16, epochs=2, shuffle=False)
    builtin = _dense_model(keras.Model)
    builtin.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    reference = builtin.fit(x, y, verbose=0, **fit).history
    runs = {}
    for use in (True, False):
        model = _dense_model(WeightedStep, use_weights=use)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        logs = model.fit(x, y, verbose=0, **fit).history
        runs[use] = (model.get_weights(), logs)
    weights, logs = runs[True]
    assert _max_diff(weights, builtin.get_weights()) < 1e-6
    np.testing.assert_allclose(logs["loss"], reference["loss"], rtol=1e-6)
    # Control: without the weights the same comparison fails.
    assert _max_diff(runs[False][0], builtin.get_weights()) > 1e-3


class TwoNets(fitcustom.TapeModel):
    """An encoder and a head, both regularized, trained by one named
    optimizer that says it trains both (`optimizer_variables`), or by the
    model's own optimizer."""

    def __init__(self, named=True, head_l2=0.05, **kwargs):
        super().__init__(**kwargs)
        self.named = named
        reg = keras.regularizers.L2
        self.encoder = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, kernel_regularizer=reg(0.05)),
            ]
        )
        self.head = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(
                    2, kernel_regularizer=reg(head_l2) if head_l2 else None
                ),
            ]
        )

    def call(self, x, training=False):
        return self.head(self.encoder(x, training=training), training=training)

    def optimizer_variables(self, name):
        return self.encoder.trainable_weights + self.head.trainable_weights

    def train_step(self, data):
        x, y, _ = self.unpack_data(data)
        with tf.GradientTape() as tape:
            out = self(x, training=True)
            error = tf.reduce_mean(tf.square(out - y), axis=-1)
            self.minimize(
                tape, {"error": error}, optimizer="both" if self.named else None
            )


def _two_nets(named, head_l2=0.05):
    keras.utils.set_random_seed(7)
    model = TwoNets(named=named, head_l2=head_l2)
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer={"both": optimizer} if named else optimizer)
    return model


def test_a_named_optimizer_adds_the_regularization_of_what_it_trains():
    x, y, _ = regression()
    runs = {}
    for kind, named, head_l2 in (
        ("own optimizer", False, 0.05),
        ("named", True, 0.05),
        ("head unregularized", True, None),
    ):
        model = _two_nets(named, head_l2)
        logs = model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
        ).history
        runs[kind] = (model.get_weights(), logs)
    (own, own_logs), (named, logs) = runs["own optimizer"], runs["named"]
    # The model's own optimizer adds all of self.losses; the named one
    # trains the same weights and adds the same losses.
    assert _max_diff(own, named) < 1e-6
    np.testing.assert_allclose(logs["loss"], own_logs["loss"], rtol=1e-6)
    # The loss is the term plus the regularization.
    assert min(np.subtract(logs["loss"], logs["error"])) > 1e-3
    # Control: the head's regularizer makes a difference the comparison
    # sees.
    assert _max_diff(named, runs["head unregularized"][0]) > 1e-4


class ByHand(fitcustom.TapeModel):
    """The same update written with `minimize`, or with `update()` and
    `follow_emas` (the pieces `minimize` is made of), with an EMA copy."""

    def __init__(self, by_hand, **kwargs):
        super().__init__(**kwargs)
        self.by_hand = by_hand
        self.net = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(2)]
        )
        self.ema = self.track_ema(self.net, 0.9)

    def call(self, x, training=False):
        return self.net(x, training=training)

    def train_step(self, data):
        x, y, _ = self.unpack_data(data)
        with tf.GradientTape() as tape:
            per_sample = tf.reduce_mean(
                tf.square(self.net(x, training=True) - y), axis=-1
            )
            if not self.by_hand:
                self.minimize(tape, per_sample)
                return
            loss = distribute.mean_loss(per_sample)
            scaled = self.scale_loss(loss)
        finite = self.update(
            tape, scaled, loss, self.net.trainable_weights, self.optimizer
        )
        self.follow_emas(None, finite)


def test_an_update_written_by_hand_logs_its_loss_as_minimize_does():
    x, y, _ = regression()
    runs = {}
    for by_hand in (False, True):
        keras.utils.set_random_seed(11)
        model = ByHand(by_hand)
        model.compile(optimizer=keras.optimizers.SGD(0.1), skip_nonfinite=True)
        logs = model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
        ).history
        runs[by_hand] = (model.get_weights(), logs)
    (weights, logs), (hand, hand_logs) = runs[False], runs[True]
    assert _max_diff(weights, hand) < 1e-6  # the EMA copy included
    # Never a silent 0.0: the step's loss is what its update minimised.
    assert min(hand_logs["loss"]) > 0.01
    np.testing.assert_allclose(hand_logs["loss"], logs["loss"], rtol=1e-6)


class Pair(fitcustom.TapeModel):
    """Two networks with an optimizer each: `left` fits the targets,
    `right` fits `left`'s output."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.left = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(4, activation="tanh")]
        )
        self.right = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(4)]
        )

    def call(self, x, training=False):
        return self.right(self.left(x, training=training), training=training)

    def train_step(self, data):
        x, y, _ = self.unpack_data(data)
        with tf.GradientTape(persistent=True) as tape:
            h = self.left(x, training=True)
            fit = tf.reduce_sum(tf.square(h[:, :2] - y), axis=-1)
            self.minimize(tape, {"fit": fit}, optimizer="left")
            match = tf.square(
                self.right(h, training=True) - tf.stop_gradient(h)
            )
            self.minimize(tape, {"match": match}, optimizer="right")


def pair(threshold=None, seed=1):
    keras.utils.set_random_seed(seed)
    model = Pair()
    transforms = [fitcustom.ClipByGlobalNorm(threshold)] if threshold else []
    model.compile(
        optimizer={
            "left": keras.optimizers.SGD(0.1),
            "right": keras.optimizers.SGD(0.2, momentum=0.5),
        },
        gradient_transforms=transforms,
    )
    return model


def test_clipping_in_minimize_on_two_replicas_clips_the_global_gradients(
    two_replicas,
):
    x, y, _ = regression(64)
    report = check_replicas(
        lambda: pair(0.05),
        x,
        y,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
    )
    assert report.weight_change > 0.01, report
    report.assert_ok()
    # The clip is active: unclipped training from the same weights ends
    # elsewhere.
    clipped, free = pair(0.05), pair(None)
    free.set_weights(clipped.get_weights())
    for model in (clipped, free):
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert _max_diff(clipped.get_weights(), free.get_weights()) > 1e-3


class FreezeLeft(keras.callbacks.Callback):
    """Sets the named optimizer `left`'s learning rate to 0 from epoch 1."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.optimizers["left"].learning_rate.assign(0.0)


def test_a_callback_reaches_a_named_optimizer():
    x, y, _ = regression()
    frozen, free = pair(), pair()
    free.set_weights(frozen.get_weights())
    after_one = {}

    class Remember(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                after_one[id(self.model)] = [
                    w.numpy() for w in self.model.left.weights
                ]

    for model, extra in ((frozen, [FreezeLeft()]), (free, [])):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=extra + [Remember()],
        )
    left_frozen = [w.numpy() for w in frozen.left.weights]
    assert _max_diff(left_frozen, after_one[id(frozen)]) == 0.0
    # Control: without the callback the second epoch moves `left`.
    left_free = [w.numpy() for w in free.left.weights]
    assert _max_diff(left_free, after_one[id(free)]) > 1e-3
