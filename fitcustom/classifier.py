"""`TapeClassifier`: a classifier on the step engine."""

import keras
import numpy as np
import tensorflow as tf

from fitcustom import checks
from fitcustom import distribute
from fitcustom.engine import TapeModel
from fitcustom.engine import _loss_scale


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

    def __init__(
        self,
        from_logits: bool = True,
        label_smoothing: float = 0.0,
        name: str = "classifier_crossentropy",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(
                "`label_smoothing` must be in [0, 1). "
                f"Received: label_smoothing={label_smoothing!r}."
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        width = y_pred.shape[-1]
        if width == 1:
            return keras.losses.binary_crossentropy(
                y_true,
                y_pred,
                from_logits=self.from_logits,
                label_smoothing=self.label_smoothing,
            )
        one_hot = (
            len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == width
        )
        if not one_hot and self.label_smoothing:
            ids = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
            y_true = tf.one_hot(ids, width, dtype=y_pred.dtype)
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

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )
        return config


_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "log_softmax")


def outputs_logits(network) -> bool:
    """Whether a network's last layer outputs logits (no softmax/sigmoid)."""
    layers = getattr(network, "layers", None) or [network]
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return False
    activation = getattr(last, "activation", None)
    if activation is None:
        return True
    name = getattr(activation, "__name__", str(activation))
    return name not in _PROBABILITY_ACTIVATIONS


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeClassifier(TapeModel):
    """A classifier trained by the `TapeModel` step engine.

    Built functionally (`TapeClassifier(inputs, outputs)`), by subclassing
    with a `call()`, by wrapping a whole classifier
    (`TapeClassifier(network=model)`), or by putting a head on a backbone
    (`TapeClassifier(backbone=model, num_classes=10)`: a `Dense` head
    named `"classifier_head"` that outputs logits).

    `compile()` fills in what is omitted: Adam, a cross-entropy that
    follows the labels (class ids or one-hot) and the output (logits or
    probabilities, detected from the last layer's activation unless
    `from_logits` is given), and accuracy. `predict()` always returns
    probabilities; `predict_classes()` returns class ids. Array inputs are
    checked before training (labels in range and whole, one-hot width,
    NaN/inf, empty data, input shape); pass `check_inputs=False` to
    `compile()` to skip the scans.

    Args:
        backbone: Optional model to put a classification head on.
        num_classes: Number of classes of that head. Required with
            `backbone`.
        from_logits: Whether the network outputs logits. Defaults to
            detection from the last layer.
        *args, **kwargs: As for `fitcustom.TapeModel`.

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

    def __init__(
        self,
        *args,
        backbone=None,
        num_classes=None,
        from_logits=None,
        **kwargs,
    ):
        if backbone is not None:
            if not isinstance(backbone, keras.Layer):
                raise ValueError(
                    "`backbone` must be a keras.Model or keras.Layer. "
                    f"Received: backbone={backbone!r}."
                )
            if (
                isinstance(num_classes, bool)
                or not isinstance(num_classes, int)
                or num_classes < 1
            ):
                raise ValueError(
                    "`num_classes` must be an int >= 1 when a backbone is "
                    f"given. Received: num_classes={num_classes!r}."
                )
            if "network" in kwargs or args:
                raise ValueError(
                    "Pass `backbone=` alone, not with `network=` or "
                    "inputs/outputs."
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
        super().__init__(*args, **kwargs)
        if from_logits is None:
            from_logits = (
                outputs_logits(self.network)
                if self.network is not None
                else True
            )
        self.from_logits = bool(from_logits)
        self._classifier_compile_args = {}
        self._sam_rho = None
        self._check_inputs = True

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
        metrics=None,
        *,
        label_smoothing: float = 0.0,
        sam_rho: float | None = None,
        check_inputs: bool = True,
        **kwargs,
    ):
        """Configures training; fills in what is omitted.

        Args:
            optimizer: Defaults to `"adam"`.
            loss: Defaults to `ClassifierLoss(from_logits=self.from_logits,
                label_smoothing=label_smoothing)`, which follows the label
                format. An explicit loss wins.
            metrics: Defaults to `["accuracy"]`; pass `[]` for none.
            label_smoothing: Float in [0, 1) for the default loss (both
                label formats). Defaults to `0.0`.
            sam_rho: Turns on sharpness-aware minimization with this
                neighbourhood radius (two forward/backward passes per
                step). Defaults to `None` (off).
            check_inputs: Check array inputs before `fit()`/`evaluate()`.
                Defaults to `True`.
            **kwargs: Other arguments of `fitcustom.TapeModel.compile`.
        """
        if loss is not None and label_smoothing:
            raise ValueError(
                "`label_smoothing` applies to the default loss only. "
                f"Received: loss={loss!r} and label_smoothing="
                f"{label_smoothing}. Set the smoothing on your loss, or "
                "drop `loss=`."
            )
        if sam_rho is not None and (
            isinstance(sam_rho, bool)
            or not isinstance(sam_rho, (int, float))
            or sam_rho <= 0
        ):
            raise ValueError(
                "`sam_rho` must be a positive number (e.g. 0.05) or None. "
                f"Received: sam_rho={sam_rho!r}."
            )
        if not isinstance(check_inputs, bool):
            raise ValueError(
                "`check_inputs` must be True or False. "
                f"Received: check_inputs={check_inputs!r}."
            )
        self._classifier_compile_args = {
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
            metrics = ["accuracy"]
        super().compile(
            optimizer=optimizer, loss=loss, metrics=metrics, **kwargs
        )
        self._sam_rho = None if sam_rho is None else float(sam_rho)
        self._check_inputs = check_inputs

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config.update(
                keras.saving.serialize_keras_object(
                    self._classifier_compile_args
                )
            )
        return config

    # ------------------------------------------------------------------
    # fit / evaluate with input checks
    # ------------------------------------------------------------------

    @property
    def num_classes(self):
        """Width of the output (None until the network is built)."""
        network = self.network
        if network is None:
            return None
        outputs = getattr(network, "outputs", None)
        if outputs:
            return outputs[0].shape[-1]
        if network.built:
            try:
                return network.layers[-1].units
            except AttributeError:
                return None
        return None

    def _input_shape(self):
        inputs = getattr(self.network, "inputs", None)
        if inputs:
            return tuple(inputs[0].shape[1:])
        return None

    def check_data(self, x, y=None):
        """Runs the input checks on arrays (or a `tf.data` spec).

        Raises:
            ValueError: Naming what was received and how to fix it.
        """
        if isinstance(x, tf.data.Dataset):
            checks.check_element_spec(
                x.element_spec, self._input_shape(), self.num_classes
            )
            return
        if not checks._is_array(x):
            return
        checks.check_not_empty(x)
        if not self.built and self.network is not None and len(x):
            self(x[:1], training=False)  # builds: shapes become known
        expected = self._input_shape()
        if expected is not None:
            checks.check_input_shape(x.shape[1:], expected)
        checks.check_finite("x", x)
        if y is not None and checks._is_array(y):
            checks.check_finite("y", y)
            if self.num_classes:
                checks.check_labels(y, self.num_classes)

    def fit(self, x=None, y=None, *args, **kwargs):
        """Trains; see `keras.Model.fit`. Checks array inputs first."""
        self._require_compiled("fit")
        if self._check_inputs:
            self.check_data(x, y)
            validation = kwargs.get("validation_data")
            if isinstance(validation, (list, tuple)) and len(validation) >= 2:
                self.check_data(validation[0], validation[1])
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """Evaluates; see `keras.Model.evaluate`. Checks array inputs."""
        self._require_compiled("evaluate")
        if self._check_inputs:
            self.check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    # ------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------

    def predict_step(self, data):
        y_pred = super().predict_step(data)
        if not self.from_logits:
            return y_pred
        if y_pred.shape[-1] == 1:
            return tf.sigmoid(y_pred)
        return tf.nn.softmax(y_pred, axis=-1)

    def predict_classes(self, x, **kwargs):
        """Class ids (argmax, or probability > 0.5 for one output)."""
        kwargs.setdefault("verbose", 0)
        probabilities = self.predict(x, **kwargs)
        if probabilities.shape[-1] == 1:
            return (probabilities[..., 0] > 0.5).astype("int64")
        return np.argmax(probabilities, axis=-1)

    def train_step(self, data):
        if self._sam_rho is None:
            return super().train_step(data)
        return self._sam_train_step(data)

    def _sam_train_step(self, data):
        """Sharpness-aware minimization (Foret et al., 2021).

        1. gradient g at the weights w (replica-summed, unscaled);
        2. perturbation e = rho * g / ||g|| (global norm, all replicas);
        3. gradient at w + e, then w is restored and that gradient goes
           through the usual transforms, guard and optimizer.
        """
        x, y, sample_weight = self.unpack_data(data)
        self._check_targets(y)
        variables = self.trainable_weights
        with tf.GradientTape() as tape:
            y_pred, loss = self.forward_and_loss(x, y, sample_weight, True)
            scaled = self.scale_loss(loss)
        grads = self.compute_gradients(tape, scaled, variables)
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        scale = _loss_scale(self.optimizer)
        scale = tf.constant(1.0) if scale is None else tf.cast(scale, "float32")
        summed = distribute.all_reduce_sum(grads)
        norm = distribute.global_norm_of(summed) / scale
        factor = self._sam_rho / (norm + 1e-12)
        perturbation = [
            None if g is None else g * tf.cast(factor / scale, g.dtype)
            for g in summed
        ]
        distribute.assign_add_everywhere(variables, perturbation)
        with tf.GradientTape() as tape:
            _, loss_sharp = self.forward_and_loss(x, y, sample_weight, True)
            scaled_sharp = self.scale_loss(loss_sharp)
        sharp_grads = self.compute_gradients(tape, scaled_sharp, variables)
        distribute.assign_add_everywhere(
            variables, [None if e is None else -e for e in perturbation]
        )
        guard = self._skip_nonfinite
        finite = self.check_finite(loss_sharp, sharp_grads) if guard else None
        sharp_grads = self.transform_gradients(sharp_grads, variables)
        self.apply_gradients(sharp_grads, variables, finite=finite)
        self.track_loss(loss, x, finite)
        if guard:
            self.count_nonfinite([finite])
        return self.compute_metrics(x, y, y_pred, sample_weight)
