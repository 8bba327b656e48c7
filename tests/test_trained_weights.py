"""Which weights a training step updates: the ones `call()` uses. A
sub-model that the model holds but runs only in its loss (a teacher) is
left alone, with a warning when the loss's gradients reach it; the
`trained_weights` piece says otherwise."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES as ALL_MODES
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import max_abs_diff

import fitcustom

N, BATCH = 32, 8
MODES = {name: ALL_MODES[name] for name in ("graph", "eager")}


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.normal(size=(N, 3)).astype("float32")
    return x, y


def _net(name):
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name=f"{name}_dense")],
        name=name,
    )


def _pull(y_pred, teacher_out):
    return 0.5 * tf.reduce_mean(tf.square(y_pred - teacher_out), axis=-1)


class WithTeacher(fitcustom.TapeModel):
    """A student trained on its labels and pulled towards a teacher that
    only the loss runs (as keras.io's distiller does, without
    `stop_gradient`)."""

    def __init__(self, student, teacher, stop=False, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.stop = stop
        self.add_loss_term("pull")

    def call(self, x, training=None):
        return self.student(x, training=training)

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        out = self.teacher(x, training=False)
        if self.stop:
            out = tf.stop_gradient(out)
        return {"pull": _pull(y_pred, out)}


class TrainsEveryWeight(WithTeacher):
    def trained_weights(self, forward_weights):
        return self.trainable_weights


class BuiltIn(keras.Model):
    """The same loss in Keras' own step, which trains every weight."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def call(self, x, training=None):
        return self.student(x, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        pull = tf.reduce_mean(_pull(y_pred, self.teacher(x, training=False)))
        return loss + pull


def _train(cls, mode="graph", initial=None, **kwargs):
    keras.utils.set_random_seed(3)
    model = cls(_net("student"), _net("teacher"), **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="mse", **MODES[mode]
    )
    x, y = _data()
    model(x[:1])
    if initial is not None:
        model.set_weights(initial)
    start = [w.numpy() for w in model.teacher.weights]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    return model, start, history.history


def _untrained_warnings(record):
    return [w for w in record if "does not update" in str(w.message)]


@pytest.mark.parametrize("mode", MODES)
def test_teacher_run_only_in_the_loss_is_not_trained(mode):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, start, history = _train(WithTeacher, mode)
    found = _untrained_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    message = str(found[0].message)
    assert "teacher/teacher_dense/kernel" in message
    assert "student" not in message.split("call() does not use them:")[1]
    for a, b in zip(start, model.teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The student's steps are those of a teacher cut from the gradient,
    # which raises no warning.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fresh, _, fresh_history = _train(WithTeacher, mode, stop=True)
    assert not _untrained_warnings(record)
    assert_weights_close(fresh.get_weights(), model.get_weights(), atol=1e-6)
    assert_history_close(fresh_history, history, rtol=1e-6)


def test_training_every_weight_gives_built_in_fit_numbers():
    """`trained_weights` returning every weight is Keras' own step, teacher
    included; the default differs from it only in the teacher."""
    keras.utils.set_random_seed(3)
    reference = BuiltIn(_net("student"), _net("teacher"))
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = _data()
    reference(x[:1])
    initial = reference.get_weights()
    h_ref = reference.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    with pytest.warns(UserWarning, match="does not update"):
        default, _, h_default = _train(WithTeacher, initial=initial)
    every, _, h_every = _train(TrainsEveryWeight, initial=initial)
    assert_weights_close(every.get_weights(), reference.get_weights(), 1e-6)
    np.testing.assert_allclose(
        h_every["loss"], h_ref.history["loss"], rtol=1e-6
    )
    # Control: with the teacher left alone, the weights are not Keras'.
    assert max_abs_diff(default.get_weights(), reference.get_weights()) > 1e-3
    assert_weights_close(
        default.student.get_weights(),
        _train(WithTeacher, initial=initial, stop=True)[
            0
        ].student.get_weights(),
    )


def test_teacher_left_alone_on_two_replicas_as_on_one_device(two_replicas):
    x, y = _data()

    def make_model():
        model = WithTeacher(_net("student"), _net("teacher"), stop=True)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    report = fitcustom.testing.check_replicas(
        make_model, x, y, strategy=two_replicas, batch_size=BATCH
    )
    report.assert_ok()


class LearnsItsLossWeight(fitcustom.TapeModel):
    """A weight that only the loss uses (a learned loss scale)."""

    def __init__(self, train_scale, **kwargs):
        super().__init__(**kwargs)
        self.train_scale = train_scale
        self.dense = keras.layers.Dense(3)
        self.log_scale = self.add_weight(shape=(), initializer="zeros")
        self.add_loss_term("scaled")

    def call(self, x):
        return self.dense(x)

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        error = tf.reduce_mean(tf.square(y_pred - y), axis=-1)
        return {"scaled": tf.exp(-self.log_scale) * error + self.log_scale}

    def trained_weights(self, forward_weights):
        if self.train_scale:
            return forward_weights + [self.log_scale]
        return forward_weights


@pytest.mark.parametrize("train_scale", [True, False], ids=["named", "default"])
def test_weight_used_only_by_the_loss_is_trained_when_named(train_scale):
    x, y = _data()
    model = LearnsItsLossWeight(train_scale)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    scale = float(model.log_scale.numpy())
    if train_scale:
        assert abs(scale) > 1e-3
        assert not _untrained_warnings(record)
    else:
        assert scale == 0.0
        assert len(_untrained_warnings(record)) == 1


def test_a_model_trains_every_weight_its_call_uses():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5)(inputs)
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(h))
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert not _untrained_warnings(record)
    assert [v.path for v in model.step_weights()] == [
        v.path for v in model.trainable_weights
    ]
