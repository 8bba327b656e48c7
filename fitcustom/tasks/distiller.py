"""`TapeDistiller`: a student trained on labels and on a teacher's outputs.

May import: the engine and the ground floor.
"""

import dataclasses
import typing

import keras
import tensorflow as tf

from fitcustom import _args
from fitcustom import checks
from fitcustom._engine_state import EngineState
from fitcustom._engine_state import engine_state
from fitcustom.engine import TapeModel
from fitcustom.networks import outputs_logits


@dataclasses.dataclass
class _TapeDistillerState(EngineState):
    """The engine's record, and the student's loss per sample (the
    compiled loss unreduced)."""

    student_loss: typing.Any = None


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeDistiller(TapeModel):
    """Knowledge distillation (Hinton et al., 2015) with `fit()`.

    The loss is `alpha * student_loss + distillation_loss`, where
    `student_loss` is the compiled loss on the labels and
    `distillation_loss = (1 - alpha) * temperature**2 * KL(teacher || student)`
    on the outputs softened by `temperature` (an extra loss term of the
    engine: averaged and divided by the number of replicas once). Logged:
    `loss`, `student_loss` (unweighted), `distillation_loss` (as it enters
    the loss) and the compiled metrics, all on the student's outputs.

    The teacher is never trained: it is frozen at construction, called in
    inference mode (BatchNormalization and Dropout as at test time), and
    its weights are saved with the distiller but left out of every update.
    `call()` (hence `predict()`) runs the student.

    Args:
        student: `keras.Model` mapping inputs to class logits (or
            probabilities).
        teacher: `keras.Model` with the same inputs and classes.
        alpha: Weight of the student loss, in [0, 1]; the distillation
            term gets `1 - alpha`. Defaults to 0.1.
        temperature: Softening of both networks' outputs, > 0. Defaults
            to 3.

    Example:

    ```python
    import keras
    import numpy as np
    import fitcustom

    def net(width):
        inputs = keras.Input((8,))
        h = keras.layers.Dense(width, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(h))

    x = np.random.rand(64, 8).astype("float32")
    y = np.random.randint(0, 3, 64)
    teacher = net(32)
    distiller = fitcustom.TapeDistiller(student=net(4), teacher=teacher)
    distiller.compile(optimizer="adam")
    history = distiller.fit(x, y, epochs=1, verbose=0)
    print(sorted(history.history))
    ```
    """

    _engine_state_type = _TapeDistillerState

    config_models = ("student", "teacher")
    config_values = ("alpha", "temperature")

    def __init__(self, student, teacher, alpha=0.1, temperature=3.0, **kwargs):
        _args.model("student", student)
        _args.model("teacher", teacher)
        alpha = _args.number("alpha", alpha, low=0, high=1)
        temperature = _args.number(
            "temperature", temperature, low=0, low_open=True
        )
        kwargs.setdefault("name", "tape_distiller")
        super().__init__(**kwargs)
        teacher.trainable = False
        self.student = student
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.add_loss_term("distillation_loss")
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        if student.built and teacher.built:
            self.built = True

    def call(self, inputs, training=None):
        """The student's outputs."""
        return self.student(inputs, training=training)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Configures training: `keras.Model.compile`'s arguments (and the
        engine's options) without `loss_weights` (`alpha` sets them).

        Args:
            optimizer: Defaults to `"adam"`.
            loss: The student's loss on the labels. Defaults to sparse
                categorical cross-entropy (from logits if the student
                outputs logits).
            metrics: Defaults to `["accuracy"]`. `student_loss` (the
                loss, unweighted) is logged besides.
            **kwargs: Other `fitcustom.TapeModel.compile` arguments.
        """
        weights = kwargs.pop("loss_weights", None)
        if weights is not None and weights != self.alpha:
            raise ValueError(
                "TapeDistiller weighs its student loss with `alpha`. "
                f"Received: loss_weights={weights!r}. Set alpha= instead."
            )
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=outputs_logits(self.student)
            )
        if metrics is None:
            metrics = ["accuracy"]
        per_sample = keras.losses.get(loss)
        if isinstance(per_sample, keras.losses.Loss):
            per_sample = per_sample.call  # unreduced
        engine_state(self).student_loss = per_sample
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=self.alpha,
            metrics=metrics,
            **kwargs,
        )

    def check_data(self, x, y=None, sample_weight=None):
        """The engine's checks, then the student's: in-memory inputs of
        its input shape, finite, and labels that fit its output (class
        ids in range, or one-hot rows). A `tf.data.Dataset` is checked
        by its element spec.

        Raises:
            ValueError: Naming what was received and how to fix it.
        """
        super().check_data(x, y, sample_weight)
        x, y, sample_weight = (
            checks.as_arrays(d) for d in (x, y, sample_weight)
        )
        input_shape = _single_shape(self.student, "inputs")
        output_shape = _single_shape(self.student, "outputs")
        if isinstance(x, tf.data.Dataset):
            checks.check_dataset(x, input_shape, output_shape)
        elif checks.is_array(x):
            checks.check_numeric(x)
            checks.check_arrays(
                x,
                y,
                sample_weight,
                input_shape=input_shape,
                output_shape=output_shape,
            )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The compiled metrics and `student_loss` (the mean per sample of
        the loss on the labels, unweighted by `alpha`)."""
        values = engine_state(self).student_loss(y, y_pred)
        weights = sample_weight if tf.is_tensor(sample_weight) else None
        self.student_loss_tracker.update_state(values, sample_weight=weights)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def loss_terms(self, x, y, y_pred, sample_weight, training):
        teacher = tf.stop_gradient(self.teacher(x, training=False))
        t = self.temperature
        soft_teacher = tf.nn.softmax(self._logits(teacher, self.teacher) / t)
        soft_student = tf.nn.softmax(self._logits(y_pred, self.student) / t)
        kl = keras.losses.KLDivergence(reduction=None)(
            soft_teacher, soft_student
        )
        return {"distillation_loss": (1.0 - self.alpha) * t * t * kl}

    @staticmethod
    def _logits(outputs, network):
        outputs = tf.cast(outputs, tf.float32)
        if outputs_logits(network):
            return outputs
        return tf.math.log(tf.maximum(outputs, 1e-7))


def _single_shape(network, which):
    """The sample shape of the network's one input (or output), or
    `None` when it has several or is not built from inputs."""
    tensors = getattr(network, which, None)
    if not tensors or len(tensors) != 1:
        return None
    return tuple(tensors[0].shape[1:])
