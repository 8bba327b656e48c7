"""TapeDistiller: the teacher never moves, both terms are logged, one
device == two replicas, mixed precision, save / load / continue."""

import keras
import numpy as np
import pytest
import task_harness
from helpers import assert_weights_close
from helpers import strategy_scope
from helpers import update_size

import fitcustom

N, BATCH = 48, 12


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    return x, y


def _net(width, name, teacher=False):
    """A teacher has BatchNormalization and Dropout (both in inference mode
    in the distiller); a student has neither, as BatchNormalization
    normalises each replica's half of the batch on two replicas."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(width, activation="relu")(inputs)
    if teacher:
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Dropout(0.3)(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h), name=name)


def _distiller(strategy=None, cls=fitcustom.TapeDistiller, **compile_kwargs):
    keras.utils.set_random_seed(0)
    scope = strategy_scope(strategy)
    with scope:
        distiller = cls(
            student=_net(8, "student"),
            teacher=_net(32, "teacher", teacher=True),
            alpha=0.3,
            temperature=2.0,
        )
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    return distiller


def _fit(distiller, epochs=2):
    x, y = _data()
    return distiller.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
    ).history


def test_teacher_never_moves_and_both_terms_are_logged():
    distiller = _distiller()
    teacher = [w.copy() for w in distiller.teacher.get_weights()]
    student = distiller.student.get_weights()
    history = _fit(distiller)
    assert_weights_close(teacher, distiller.teacher.get_weights(), atol=0)
    assert update_size(student, distiller.student.get_weights()) > 1e-2
    assert sorted(k for k in history if not k.startswith("val_")) == [
        "accuracy",
        "distillation_loss",
        "loss",
        "student_loss",
    ]
    np.testing.assert_allclose(
        history["loss"],
        0.3 * np.asarray(history["student_loss"])
        + np.asarray(history["distillation_loss"]),
        rtol=1e-5,
    )
    assert min(history["distillation_loss"]) > 0
    x, _ = _data()
    np.testing.assert_array_equal(
        distiller.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
    )
    # Control: a distiller whose teacher is trainable and gets gradients
    # (as in keras.io's example) trains it, and the check above sees it.
    moving = _distiller(cls=LeakyDistiller)
    moving.teacher.trainable = True
    before = [w.copy() for w in moving.teacher.get_weights()]
    _fit(moving, epochs=1)
    assert update_size(before, moving.teacher.get_weights()) > 1e-3


class LeakyDistiller(fitcustom.TapeDistiller):
    """The teacher's outputs not cut from the gradient, and every weight
    trained, as built-in `fit()` trains them."""

    def trained_weights(self, forward_weights):
        return self.trainable_weights

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        teacher = self.teacher(x, training=False)
        kl = keras.losses.KLDivergence(reduction=None)(
            keras.ops.softmax(teacher), keras.ops.softmax(y_pred)
        )
        return {"distillation_loss": kl}


def build(**compile_kwargs):
    """The harness's distiller (see `task_harness`)."""
    keras.utils.set_random_seed(0)
    distiller = fitcustom.TapeDistiller(
        student=_net(8, "student"),
        teacher=_net(32, "teacher", teacher=True),
        alpha=0.3,
        temperature=2.0,
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    return distiller


TASK = task_harness.Task(
    build,
    _data,
    dict(batch_size=BATCH, shuffle=False, validation_data=_data()),
)


class BuiltInDistiller(keras.Model):
    """Distillation written into Keras' own `compute_loss` (the teacher
    frozen), trained by built-in `fit()`: the reference."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher
        teacher.trainable = False

    def call(self, x, training=None):
        return self.student(x, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        hard = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        t = 2.0
        soft = keras.losses.KLDivergence()(
            keras.ops.softmax(self.teacher(x, training=False) / t),
            keras.ops.softmax(y_pred / t),
        )
        return 0.3 * hard(y, y_pred) + 0.7 * t * t * soft


def _built_in(initial):
    reference = BuiltInDistiller(
        _net(8, "student"), _net(32, "teacher", teacher=True)
    )
    reference.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = _data()
    reference(x[:1])
    reference.set_weights(initial)
    history = reference.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return reference.get_weights(), {"loss": history.history["loss"]}


def test_every_mode_trains_what_built_in_fit_trains():
    task_harness.check_reference(TASK, _built_in, atol=1e-6, rtol=1e-5)


def test_two_replicas_train_what_one_device_trains(two_replicas):
    report = task_harness.check_two_replicas(
        TASK, two_replicas, log_tolerance=1e-5, epochs=2
    )
    assert sorted(report.log_diffs) == [
        "accuracy",
        "distillation_loss",
        "loss",
        "student_loss",
        "val_accuracy",
        "val_distillation_loss",
        "val_loss",
        "val_student_loss",
    ]


def test_mixed_precision_update_size_matches_float32():
    task_harness.check_mixed_precision(TASK, tolerance=0.05)


@pytest.mark.slow
def test_save_load_and_continue_in_a_fresh_process(tmp_path):
    result = task_harness.check_continue_in_fresh_process(
        "test_distiller", "TASK", tmp_path
    )
    assert result["steps"] == [2 * N // BATCH]
    assert "val_distillation_loss" in result["logs"]


def test_bad_input_is_refused_before_any_update():
    x, y = _data()
    task_harness.check_bad_input(
        TASK,
        [
            (dict(y=y + 3), r"class ids in \[0, 3\)"),
            (dict(x=x[:, :4]), "shape"),
        ],
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha.*\[0, 1\].*1\.5"),
        (dict(temperature=0), r"temperature.*> 0.*0"),
        (dict(teacher="big"), r"`teacher` must be a keras\.Model"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    arguments = dict(student=_net(4, "s"), teacher=_net(8, "t"))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fitcustom.TapeDistiller(**arguments)
    with pytest.raises(ValueError, match="alpha= instead"):
        _distiller(loss_weights=0.5)


def test_student_and_teacher_can_be_given_by_position():
    """Two models given by position are the distiller's arguments, not a
    functional model's inputs and outputs."""
    distiller = fitcustom.TapeDistiller(_net(4, "s"), _net(8, "t"), alpha=0.5)
    assert distiller.student.name == "s"
    assert distiller.teacher.name == "t"
    assert not distiller.teacher.trainable
