"""TapeDistiller: the teacher never moves, both terms are logged, one
device == two replicas, mixed precision, save / load / continue."""

from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import assert_weights_close
from helpers import run_python
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
    """The teacher's outputs not cut from the gradient."""

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        teacher = self.teacher(x, training=False)
        kl = keras.losses.KLDivergence(reduction=None)(
            keras.ops.softmax(teacher), keras.ops.softmax(y_pred)
        )
        return {"distillation_loss": kl}


def _make():
    distiller = fitcustom.TapeDistiller(
        student=_net(8, "student"),
        teacher=_net(32, "teacher", teacher=True),
        alpha=0.3,
        temperature=2.0,
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    return distiller


def test_two_replicas_train_what_one_device_trains(two_replicas):
    x, y = _data()
    report = fitcustom.testing.check_replicas(
        _make,
        x,
        y,
        strategy=two_replicas,
        weight_tolerance=1e-6,
        log_tolerance=1e-5,
        batch_size=BATCH,
        epochs=2,
        validation_data=(x, y),
    )
    report.assert_ok()
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
    x, y = _data()
    report = fitcustom.testing.check_mixed_precision(
        _make, x, y, tolerance=0.05, batch_size=BATCH
    )
    report.assert_ok()
    assert keras.config.dtype_policy().name == "float32"  # put back


# Loads the saved distiller in a fresh process, trains one more epoch and
# writes its weights.
CONTINUE = Path(__file__).parent / "programs" / "distiller_continue.py"


@pytest.mark.slow
def test_save_load_and_continue_in_a_fresh_process(tmp_path):
    uninterrupted = _distiller()
    _fit(uninterrupted, epochs=2)
    first = _distiller()
    _fit(first, epochs=1)
    first.save(tmp_path / "distiller.keras")
    run_python(
        CONTINUE, tmp_path / "distiller.keras", tmp_path / "w.weights.h5"
    )
    resumed = _distiller()
    resumed.load_weights(tmp_path / "w.weights.h5")
    assert_weights_close(
        uninterrupted.get_weights(), resumed.get_weights(), atol=1e-6
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
