"""`TapeClassifier`: a classifier on the step engine.

May import: the engine, the ground floor and `_keras`.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from fitcustom import _args
from fitcustom import checks
from fitcustom import distribute
from fitcustom._engine_state import EngineState
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat
from fitcustom.engine import TapeModel
from fitcustom.networks import outputs_logits


@keras.saving.register_keras_serializable(package="fitcustom")
class ClassifierLoss(keras.losses.Loss):
    """Cross-entropy that follows the labels: class ids or one-hot.

    Class ids use Keras' sparse categorical cross-entropy; one-hot labels
    (last axis as wide as the output) its categorical cross-entropy; a
    single output its binary cross-entropy. With `label_smoothing`, class
    ids are one-hot encoded first, so both formats are smoothed alike.

    Args:
        from_logits: Whether the predictions are logits. Defaults to `True`.
        label_smoothing: Float in [0, 1). Defaults to `0.0`.
        name: Defaults to `"classifier_crossentropy"`.
    """

    #: Class ids (one label per sample) are checked against the output's
    #: width in every step (`TapeModel.check_class_ids`).
    takes_class_ids = True

    def __init__(
        self,
        from_logits: bool = True,
        label_smoothing: float = 0.0,
        name: str = "classifier_crossentropy",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        label_smoothing = _args.number(
            "label_smoothing", label_smoothing, low=0, high=1, high_open=True
        )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        width = y_pred.shape[-1]
        rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
        if width == 1:
            y_true = tf.reshape(tf.cast(y_true, y_pred.dtype), tf.shape(y_pred))
            return keras.losses.binary_crossentropy(
                y_true,
                y_pred,
                from_logits=self.from_logits,
                label_smoothing=self.label_smoothing,
            )
        if rank is None or (rank == pred_rank and y_true.shape[-1] is None):
            # Shapes relaxed by a retrace: tell the formats apart at run
            # time, and use the one-hot form for both.
            y_true = tf.cond(
                tf.logical_and(
                    tf.equal(tf.rank(y_true), tf.rank(y_pred)),
                    tf.equal(tf.shape(y_true)[-1], width),
                ),
                lambda: tf.reshape(
                    tf.cast(y_true, y_pred.dtype), tf.shape(y_pred)
                ),
                lambda: self._one_hot(y_true, y_pred),
            )
            one_hot = True
        else:
            one_hot = rank == pred_rank and y_true.shape[-1] == width
        if not one_hot and self.label_smoothing:
            y_true = self._one_hot(y_true, y_pred)
            one_hot = True
        if one_hot:
            return keras.losses.categorical_crossentropy(
                y_true,
                y_pred,
                from_logits=self.from_logits,
                label_smoothing=self.label_smoothing,
            )
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=self.from_logits
        )

    @staticmethod
    def _one_hot(ids, y_pred):
        ids = tf.cast(tf.reshape(ids, tf.shape(y_pred)[:-1]), tf.int32)
        return tf.one_hot(ids, y_pred.shape[-1], dtype=y_pred.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )
        return config


@dataclasses.dataclass
class _TapeClassifierState(EngineState):
    """The engine's record, and the label format (`"sparse"` or
    `"one_hot"`) the compiled metrics were built for."""

    label_kind: str | None = None


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeClassifier(TapeModel):
    """A classifier trained by the `TapeModel` step engine.

    Three ways to build one:

    - functionally: `TapeClassifier(inputs, outputs)` or
      `TapeClassifier(inputs=..., outputs=...)`;
    - by subclassing with a `call()`;
    - by wrapping a Keras model: `TapeClassifier(network=model)` when the
      model is already a classifier, or
      `TapeClassifier(backbone=model, num_classes=10)` to put a `Dense`
      head (named `"classifier_head"`, logits) on a feature extractor.

    `compile()` fills in what is omitted (anything passed wins): Adam, a
    `ClassifierLoss` that follows the labels (class ids or one-hot) and the
    output (logits or probabilities: read from the operation making the
    output, or `from_logits=`), and accuracy (on logits for a
    single-unit output). Extra options: `label_smoothing` (both label
    formats), `sam_rho` (sharpness-aware minimization) and `check_inputs`.
    Per-layer gradient control is a gradient transform:
    `gradient_transforms=[fitcustom.ScaleByLayer({"backbone": 0.1})]`.

    `predict()` returns probabilities even when the network outputs
    logits; `predict_classes()` returns class ids.

    Before `fit()` and `evaluate()`, in-memory data is checked and refused
    with a `ValueError`, before any weight changes: labels outside
    `[0, num_classes)`, fractional labels for class ids, one-hot labels of
    the wrong width, NaN/inf in `x`, `y` or `sample_weight`, empty data,
    samples whose shape (e.g. channel axis) does not match the model's
    input. A `tf.data.Dataset` is checked without being read: its element
    shapes, and emptiness when its cardinality is known; values are not
    scanned. See `fitcustom.checks`.

    Args:
        backbone: Optional model to put a classification head on.
        num_classes: Width of that head. Required with `backbone`.
        from_logits: Whether the network outputs logits. Defaults to
            `None`: read from the output (logits when it cannot be read,
            e.g. for subclassed models).
        *args: `inputs, outputs` for a functional classifier.
        **kwargs: As for `fitcustom.TapeModel` (`network`, `name`, ...).

    Example:

    ```python
    import keras
    import numpy as np
    import fitcustom

    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(32, activation="relu")(
        keras.layers.Flatten()(inputs))
    model = fitcustom.TapeClassifier(inputs, keras.layers.Dense(10)(hidden))
    model.compile()  # Adam, cross-entropy from logits, accuracy
    x = np.random.rand(64, 8, 8, 1).astype("float32")
    y = np.random.randint(0, 10, size=64)
    model.fit(x, y, epochs=1, verbose=0)
    probabilities = model.predict(x, verbose=0)  # rows sum to 1
    classes = model.predict_classes(x)
    ```
    """

    _engine_state_type = _TapeClassifierState

    def __init__(
        self,
        *args,
        backbone: keras.Layer | None = None,
        num_classes: int | None = None,
        from_logits: bool | None = None,
        **kwargs,
    ):
        if backbone is not None:
            _args.model("backbone", backbone)
            num_classes = _args.whole(
                "num_classes",
                num_classes,
                hint=" A backbone needs the number of classes of its head.",
            )
            if "network" in kwargs or args:
                raise ValueError(
                    "Pass `backbone=` alone, not with `network=` or "
                    "inputs/outputs. Received: backbone and "
                    f"{'network' if 'network' in kwargs else 'inputs'}."
                )
            kwargs["network"] = keras.Sequential(
                [
                    backbone,
                    keras.layers.Dense(num_classes, name="classifier_head"),
                ],
                name="network",
            )
            if from_logits is None:
                from_logits = True
        elif num_classes is not None:
            raise ValueError(
                "`num_classes` is only used with `backbone=`. Received: "
                f"num_classes={num_classes!r} without a backbone."
            )
        if from_logits is not None and not isinstance(from_logits, bool):
            raise ValueError(
                "`from_logits` must be True, False or None. "
                f"Received: from_logits={from_logits!r}."
            )
        super().__init__(*args, **kwargs)
        if from_logits is None:
            graph = self._graph_model()
            from_logits = outputs_logits(graph) if graph is not None else True
        self.from_logits = from_logits
        self._probed_output_shape = None

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config

    # ------------------------------------------------------------------
    # compile
    # ------------------------------------------------------------------

    def compile(
        self,
        optimizer="adam",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
        *,
        label_smoothing: float = 0.0,
        sam_rho: float | None = None,
        check_inputs: bool = True,
        **engine_options,
    ):
        """Configures training; fills in what is omitted.

        Args:
            optimizer: Defaults to `"adam"` (Keras' Adam, learning rate
                0.001).
            loss: Defaults to `ClassifierLoss(from_logits=self.from_logits,
                label_smoothing=label_smoothing)`, which follows the label
                format. An explicit loss wins.
            metrics: Defaults to accuracy (`["accuracy"]`, or a
                `BinaryAccuracy(threshold=0)` for one logit); pass `[]`
                for none.
            label_smoothing: Float in [0, 1) for the default loss (both
                label formats). Defaults to `0.0`.
            sam_rho: Turns on sharpness-aware minimization with this
                neighbourhood radius: two forward/backward passes per step,
                the update uses the gradient at `w + rho * g / ||g||`
                (global norm over replicas). Defaults to `None` (off).
            check_inputs: Check in-memory data before `fit()` /
                `evaluate()` (see `fitcustom.checks`). Defaults to `True`.
            **engine_options: The keyword options of
                `fitcustom.TapeModel.compile` (`gradient_transforms`,
                `log_gradient_norm`, `skip_nonfinite`).

        The other arguments (`loss_weights`, `weighted_metrics`,
        `run_eagerly`, `steps_per_execution`, `jit_compile`,
        `auto_scale_loss`) are Keras' own, in Keras' order.
        """
        if loss is not None and label_smoothing:
            raise ValueError(
                "`label_smoothing` applies to the default loss only. "
                f"Received: loss={loss!r} and label_smoothing="
                f"{label_smoothing}. Set the smoothing on your loss, or "
                "drop `loss=`."
            )
        sam_rho = _args.number(
            "sam_rho",
            sam_rho,
            low=0,
            low_open=True,
            none_ok=True,
            hint=" A radius such as 0.05 turns SAM on.",
        )
        _args.boolean("check_inputs", check_inputs)
        arguments = {
            "loss": loss,
            "metrics": metrics,
            "label_smoothing": label_smoothing,
            "sam_rho": sam_rho,
            "check_inputs": check_inputs,
        }
        if loss is None:
            loss = ClassifierLoss(
                from_logits=self.from_logits, label_smoothing=label_smoothing
            )
        if metrics is None:
            metrics = self._default_metrics()
        super().compile(
            optimizer,
            loss,
            loss_weights,
            metrics,
            weighted_metrics,
            run_eagerly,
            steps_per_execution,
            jit_compile,
            auto_scale_loss,
            **engine_options,
        )
        self.keep_compile_arguments(**arguments)

    def _default_metrics(self):
        shape = self._output_shape()
        if self.from_logits and shape is not None and shape[-1] == 1:
            # Keras' "accuracy" thresholds a single output at 0.5, which is
            # wrong for a logit.
            return [keras.metrics.BinaryAccuracy("accuracy", threshold=0.0)]
        return ["accuracy"]

    @property
    def sam_rho(self):
        """The compiled SAM radius, or `None` when SAM is off."""
        return self.compile_arguments.get("sam_rho")

    # ------------------------------------------------------------------
    # Shapes and input checks
    # ------------------------------------------------------------------

    @property
    def num_classes(self):
        """Width of the output (None while it is unknown)."""
        shape = self._output_shape()
        return None if shape is None else shape[-1]

    def _output_shape(self):
        outputs = getattr(self._graph_model(), "outputs", None)
        if outputs and len(outputs) == 1:
            return tuple(outputs[0].shape[1:])
        return self._probed_output_shape

    def _input_shape(self):
        inputs = getattr(self._graph_model(), "inputs", None)
        if inputs:
            if len(inputs) != 1:
                return None
            return tuple(inputs[0].shape[1:])
        if self.built:
            shape = _compat.build_input_shape(self)
            return None if shape is None else shape[1:]
        return None

    def _probe_output_shape(self, x):
        """Runs one sample through the model to learn its output shape."""
        if self._output_shape() is not None or not checks.is_array(x):
            return
        if len(x) == 0:
            return
        out = self(x[:1], training=False)
        if checks.is_array(out):
            self._probed_output_shape = tuple(out.shape[1:])

    def check_data(self, x, y=None, sample_weight=None):
        """Runs the input checks (`fitcustom.checks`) on data for this model.

        In-memory arrays are checked fully; a `tf.data.Dataset` only by
        its element spec and known cardinality. Generators and
        `keras.utils.PyDataset` are not checked.

        Args:
            x: Inputs: arrays, or a `tf.data.Dataset` of batches.
            y: Labels (arrays only).
            sample_weight: Optional per-sample weights.

        Raises:
            ValueError: Naming what was received and how to fix it.
        """
        if not self.compile_arguments.get("check_inputs", True):
            return
        x, y, sample_weight = (
            checks.as_arrays(d) for d in (x, y, sample_weight)
        )
        if isinstance(x, list) and self._input_shape() is not None:
            if not all(checks.is_array(v) for v in x):
                raise ValueError(
                    f"{type(self).__name__} takes one input array. "
                    f"Received: x as a Python list of {len(x)} "
                    f"{type(x[0]).__name__ if x else 'items'}. Pass "
                    "np.asarray(x, dtype='float32')."
                )
        super().check_data(x, y, sample_weight)
        if isinstance(x, tf.data.Dataset):
            checks.check_dataset(x, self._input_shape(), self._output_shape())
            return
        if not checks.is_array(x) and not isinstance(x, (list, tuple, dict)):
            return
        checks.check_numeric(x)
        if y is not None and not checks.is_array(y):
            y = np.asarray(y) if isinstance(y, (list, tuple)) else y
        expected = self._input_shape()
        if expected is not None and checks.is_array(x):
            checks.check_input_shape(x.shape[1:], expected)
        self._probe_output_shape(x)
        checks.check_arrays(
            x,
            y,
            sample_weight,
            input_shape=self._input_shape(),
            output_shape=self._output_shape(),
        )
        self._check_label_format(y)

    def _check_label_format(self, y):
        """Refuses labels of another format (class ids vs one-hot) than
        the compiled accuracy metric was built for (it would fail inside
        TensorFlow)."""
        shape = self._output_shape()
        if not checks.is_array(y) or shape is None or shape[-1] == 1:
            return
        kind = checks.label_format(np.shape(y)[1:], shape, n=len(y))
        built = _compat.compiled_metrics_built(self)
        before = engine_state(self).label_kind
        if built and before is not None and kind != before:
            names = {"sparse": "class ids", "one_hot": "one-hot rows"}
            raise ValueError(
                f"The labels are {names.get(kind, kind)} now, but the "
                "metrics were built for "
                f"{names.get(before, before)} in an earlier fit(). Call "
                "compile() again to rebuild them, or convert the labels "
                "(np.argmax(y, -1) gives class ids)."
            )
        engine_state(self).label_kind = kind

    # ------------------------------------------------------------------
    # Prediction
    # ------------------------------------------------------------------

    def predict_step(self, data):
        y_pred = super().predict_step(data)
        if not self.from_logits:
            return y_pred
        if y_pred.shape[-1] == 1:
            return tf.sigmoid(y_pred)
        return tf.nn.softmax(y_pred, axis=-1)

    def predict_classes(self, x, **kwargs) -> np.ndarray:
        """Class ids: the argmax, or probability > 0.5 for one output.

        Args:
            x: Inputs, as for `predict()`.
            **kwargs: Passed to `predict()` (`verbose` defaults to 0).

        Returns:
            An int64 array of class ids.
        """
        kwargs.setdefault("verbose", 0)
        probabilities = self.predict(x, **kwargs)
        if probabilities.shape[-1] == 1:
            return (probabilities[..., 0] > 0.5).astype("int64")
        return np.argmax(probabilities, axis=-1)

    # ------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------

    def train_step(self, data):
        if self.sam_rho is None:
            return super().train_step(data)
        return self.sam_train_step(data)

    def sam_perturbation(self, grads):
        """SAM's `e = rho * g / ||g||` from the (loss-scaled) gradients.

        `g` is the gradient summed over replicas and unscaled, `||g||` its
        global norm, so one and several replicas perturb alike. Zero where
        `g` is not finite (a mixed-precision overflow, a NaN batch), so the
        weights are never moved to NaN.
        """
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        summed = distribute.all_reduce_sum(grads)
        scale = distribute.loss_scale(self.optimizer)
        scale = tf.constant(1.0) if scale is None else tf.cast(scale, "float32")
        norm = distribute.global_norm_of(summed) / scale
        ok = tf.logical_and(tf.math.is_finite(norm), norm > 0.0)
        factor = tf.where(ok, self.sam_rho / (norm + 1e-12) / scale, 0.0)
        return [
            None
            if g is None
            else tf.where(ok, g * tf.cast(factor, g.dtype), tf.zeros_like(g))
            for g in summed
        ]

    def sam_train_step(self, data):
        """Sharpness-aware minimization (Foret et al., 2021), one step.

        1. loss and gradient `g` at the weights `w` (this pass is what the
           `loss` metric and the compiled metrics report, and the only one
           that updates BatchNormalization's moving statistics);
        2. `e = sam_perturbation(g)`;
        3. gradient at `w + e`; then `w` (and the moving statistics) are
           restored exactly, and that gradient goes through the engine's
           gradient transforms, non-finite guard and optimizer.
        """
        x, y, sample_weight = self.unpack_data(data)
        self._check_targets(y)
        y_pred, loss, grads = self.loss_and_gradients(x, y, sample_weight)
        grads = self.check_class_ids(y, y_pred, grads)  # before the update
        if grads is None:
            return self.compute_metrics(x, y, y_pred, sample_weight)
        variables = self.step_weights()
        perturbation = self.sam_perturbation(grads)
        stats = list(self.non_trainable_weights)
        saved = [tf.identity(v.value) for v in variables + stats]
        distribute.assign_add_everywhere(variables, perturbation)
        _, sharp_loss, sharp_grads = self.loss_and_gradients(
            x, y, sample_weight, track=False
        )
        distribute.assign_everywhere(variables + stats, saved)
        finite = None
        if self.skip_nonfinite:
            finite = tf.logical_and(
                self.check_finite(loss, grads),
                self.check_finite(sharp_loss, sharp_grads),
            )
        return self.update_and_report(
            sharp_grads, finite, x, y, y_pred, sample_weight, loss
        )
