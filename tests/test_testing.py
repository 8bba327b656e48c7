"""fitcustom.testing: the checks a user runs on their own step find the
two classic silent failures, and pass a right step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fitcustom
from fitcustom import distribute


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    return x, (np.arange(32) % 3).astype("int32")


class ScalesTwice(fitcustom.TapeModel):
    """Adds a Keras loss object's reduced value (already divided by the
    replica count) divided again: counts half on two replicas."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        probabilities = tf.nn.softmax(y_pred)
        uniform = tf.fill(tf.shape(probabilities), 1.0 / 3.0)
        kl = keras.losses.KLDivergence()(uniform, probabilities)
        return loss + distribute.scale_loss_for_replicas(kl)


class SkipsLossScaling(fitcustom.TapeModel):
    def scale_loss(self, loss, optimizer=None):
        return loss


def _maker(cls):
    def make():
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        model = cls(inputs, keras.layers.Dense(3)(h))
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    return make


def test_check_replicas(two_replicas):
    x, y = _data()
    kwargs = dict(strategy=two_replicas, batch_size=8, epochs=2)
    good = fitcustom.testing.check_replicas(
        _maker(fitcustom.TapeModel), x, y, **kwargs
    )
    good.assert_ok()
    assert good.weight_diff < 1e-6 and sorted(good.log_diffs) == ["loss"]
    # How far training moved the weights, so a check of a model that
    # hardly trained is visible as such.
    assert good.weight_change > 100 * good.weight_diff
    assert "weights moved by up to" in str(good)
    bad = fitcustom.testing.check_replicas(_maker(ScalesTwice), x, y, **kwargs)
    assert not bad.ok and bad.weight_diff > 1e-4
    assert "DISAGREE" in str(bad) and "loss" in str(bad)
    with pytest.raises(AssertionError, match="1 device vs 2 replicas"):
        bad.assert_ok()


def test_check_mixed_precision():
    x, y = _data()
    good = fitcustom.testing.check_mixed_precision(
        _maker(fitcustom.TapeModel), x, y, batch_size=8
    )
    good.assert_ok()
    bad = fitcustom.testing.check_mixed_precision(
        _maker(SkipsLossScaling), x, y, batch_size=8
    )
    assert not bad.ok and bad.weight_diff > 0.99  # updates ~32768x smaller
    assert keras.config.dtype_policy().name == "float32"


def test_split_cpu_after_tensorflow_started():
    fitcustom.testing.split_cpu(2)  # already two: nothing to do
    with pytest.raises(RuntimeError, match="start of the program"):
        fitcustom.testing.split_cpu(8)
