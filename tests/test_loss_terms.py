"""Extra loss terms (`add_loss_term` / `loss_terms`): added to the loss,
logged as epoch means, right on any number of replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import strategy_scope
from test_testing import ScalesTwice

import fitcustom
from fitcustom import distribute

N, BATCH = 48, 12


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = (np.arange(N) % 3).astype("int32")
    return x, y


def _graph():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return inputs, keras.layers.Dense(3)(h)


class WithTerms(fitcustom.TapeModel):
    """A penalty on large logits (raw ops) and a pull towards uniform
    predictions (a Keras loss, unreduced)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_loss_term("logit_penalty")
        self.add_loss_term("uniform_loss")
        self.uniform = keras.losses.KLDivergence(reduction=None)

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        probabilities = tf.nn.softmax(y_pred)
        uniform = tf.fill(tf.shape(probabilities), 1.0 / 3.0)
        return {
            "logit_penalty": 1e-2 * tf.reduce_sum(tf.square(y_pred), -1),
            "uniform_loss": 0.1 * self.uniform(uniform, probabilities),
        }


class ByHand(keras.Model):
    """The same terms written into Keras' compute_loss as a reference
    (scaled once, by hand, as the engine does)."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        probabilities = tf.nn.softmax(y_pred)
        uniform = tf.fill(tf.shape(probabilities), 1.0 / 3.0)
        penalty = 1e-2 * tf.reduce_mean(tf.reduce_sum(tf.square(y_pred), -1))
        kl = 0.1 * tf.reduce_mean(
            keras.losses.KLDivergence(reduction=None)(uniform, probabilities)
        )
        return loss + distribute.scale_loss_for_replicas(penalty + kl)


def _initial():
    keras.utils.set_random_seed(0)
    return keras.Model(*_graph()).get_weights()


def _train(cls, strategy=None):
    """Trains `cls` from the shared initial weights."""
    initial = _initial()
    scope = strategy_scope(strategy)
    with scope:
        model = cls(*_graph())
        model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    x, y = _data()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
    ).history
    return model, history


def test_terms_are_added_and_logged():
    ours, history = _train(WithTerms)
    reference, h_ref = _train(ByHand)
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert sorted(history) == [
        "logit_penalty",
        "loss",
        "uniform_loss",
        "val_logit_penalty",
        "val_loss",
        "val_uniform_loss",
    ]
    assert_history_close(
        {k: h_ref[k] for k in ("loss", "val_loss")},
        {k: history[k] for k in ("loss", "val_loss")},
    )
    assert all(
        v > 0 for v in history["logit_penalty"] + history["uniform_loss"]
    )
    # The evaluation terms are the terms of the trained model.
    x, y = _data()
    logs = ours.evaluate(x, y, batch_size=7, verbose=0, return_dict=True)
    for name in ("loss", "logit_penalty", "uniform_loss"):
        assert logs[name] == pytest.approx(history[f"val_{name}"][-1], rel=1e-5)


@pytest.mark.parametrize("guard", [False, True], ids=["plain", "guarded"])
def test_two_replicas_train_what_one_device_trains(two_replicas, guard):
    # With the guard, the terms are logged after the update's all-reduce,
    # where the replicas' threads take turns: each must log its own.
    x, y = _data()

    def make(cls):
        def build():
            model = cls(*_graph())
            model.compile(
                optimizer=keras.optimizers.SGD(0.5),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                skip_nonfinite=guard,
            )
            return model

        return build

    kwargs = dict(strategy=two_replicas, batch_size=BATCH, epochs=2)
    report = fitcustom.testing.check_replicas(make(WithTerms), x, y, **kwargs)
    report.assert_ok()
    logged = {"logit_penalty", "loss", "uniform_loss"}
    assert set(report.log_diffs) - {"nonfinite_steps"} == logged
    # Control: a reduced Keras loss divided again counts half on two
    # replicas, and the same comparison sees it.
    wrong = fitcustom.testing.check_replicas(make(ScalesTwice), x, y, **kwargs)
    assert not wrong.ok


class ReducedTerm(WithTerms):
    def loss_terms(self, x, y, y_pred, sample_weight, training):
        terms = super().loss_terms(x, y, y_pred, sample_weight, training)
        terms["uniform_loss"] = tf.reduce_mean(terms["uniform_loss"])
        return terms


class MissingTerm(WithTerms):
    def loss_terms(self, x, y, y_pred, sample_weight, training):
        return {"logit_penalty": tf.reduce_sum(tf.square(y_pred), -1)}


@pytest.mark.parametrize(
    "cls, match",
    [
        (
            ReducedTerm,
            r"'uniform_loss' must give one value per sample.*"
            r"reduction=None",
        ),
        (
            MissingTerm,
            r"Received: \['logit_penalty'\]\. Expected keys: "
            r"\['logit_penalty', 'uniform_loss'\]",
        ),
    ],
    ids=["scalar", "missing"],
)
def test_bad_terms_are_refused(cls, match):
    with pytest.raises(ValueError, match=match):
        _train(cls)


@pytest.mark.parametrize("name", ["loss", "two words", 3])
def test_bad_term_names_are_refused(name):
    class Named(fitcustom.TapeModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_loss_term(name)

    with pytest.raises(ValueError, match="name"):
        Named(*_graph())


class TermsOnly(fitcustom.TapeModel):
    """An autoencoder whose loss is only its terms (a VAE's shape): no
    compiled loss, no targets, and `call()` returns a tuple that only
    `loss_terms` reads."""

    def __init__(self, kl_weight=0.5, **kwargs):
        super().__init__(**kwargs)
        self.kl_weight = kl_weight
        self.encoder = keras.layers.Dense(3, activation="tanh")
        self.decoder = keras.layers.Dense(5)
        self.add_loss_term("reconstruction")
        self.add_loss_term("kl")

    def call(self, x):
        codes = self.encoder(x)
        return self.decoder(codes), codes

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        reconstruction, codes = y_pred
        return {
            "reconstruction": tf.square(reconstruction - x),  # (batch, 5)
            "kl": self.kl_weight * tf.reduce_sum(tf.square(codes), -1),
        }


class TermsByHand(keras.Model):
    """The same loss in Keras' own `compute_loss`."""

    def __init__(self, kl_weight=0.5, **kwargs):
        super().__init__(**kwargs)
        self.kl_weight = kl_weight
        self.encoder = keras.layers.Dense(3, activation="tanh")
        self.decoder = keras.layers.Dense(5)

    def call(self, x):
        codes = self.encoder(x)
        return self.decoder(codes), codes

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        reconstruction, codes = y_pred
        loss = tf.reduce_mean(tf.square(reconstruction - x)) + (
            self.kl_weight * tf.reduce_mean(tf.reduce_sum(tf.square(codes), -1))
        )
        return distribute.scale_loss_for_replicas(loss)


def _train_terms_only(cls, kl_weight=0.5):
    keras.utils.set_random_seed(0)
    model = cls(kl_weight=kl_weight)
    x, _ = _data()
    model(x[:1])
    initial = [w.numpy() for w in model.weights]
    keras.utils.set_random_seed(0)
    model = cls(kl_weight=kl_weight)
    model(x[:1])
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(
        x, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    ).history
    return model, history


def test_a_loss_made_only_of_terms_trains_like_keras():
    ours, history = _train_terms_only(TermsOnly)
    reference, h_ref = _train_terms_only(TermsByHand)
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close({"loss": h_ref["loss"]}, {"loss": history["loss"]})
    assert sorted(history) == ["kl", "loss", "reconstruction"]
    np.testing.assert_allclose(
        history["loss"],
        np.add(history["kl"], history["reconstruction"]),
        rtol=1e-5,
    )
    # Control: another weight of one term, and the comparison fails.
    other, _ = _train_terms_only(TermsByHand, kl_weight=1.0)
    with pytest.raises(AssertionError):
        assert_weights_close(other.get_weights(), ours.get_weights())


def test_a_loss_made_only_of_terms_on_two_replicas(two_replicas):
    x, _ = _data()

    def build():
        model = TermsOnly()
        model(x[:1])  # built under the run's strategy
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model

    report = fitcustom.testing.check_replicas(
        build, x, strategy=two_replicas, batch_size=BATCH, epochs=2
    )
    report.assert_ok()
    assert set(report.log_diffs) == {"kl", "loss", "reconstruction"}
