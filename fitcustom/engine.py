"""`TapeModel`: a `keras.Model` whose steps are written with
`tf.GradientTape`, split into pieces that can be overridden one at a time.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from fitcustom import _compat
from fitcustom import distribute
from fitcustom import transforms as transforms_lib

_ENGINE_COMPILE_KEYS = (
    "gradient_transforms",
    "log_gradient_norm",
    "skip_nonfinite",
)


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeModel(keras.Model):
    """A `keras.Model` trained by an explicit `tf.GradientTape` step.

    `train_step` does what Keras' built-in step does (same numbers, proven by
    the test suite) in pieces that a subclass can replace one at a time:

    | piece | default |
    | --- | --- |
    | `unpack_data(data)` | `(x, y, sample_weight)`, clear error otherwise |
    | `forward(x, training)` | `self(x, training=training)` |
    | `compute_loss(...)` | Keras' compiled loss + regularizers |
    | `track_loss(loss, x)` | the `loss` metric, as `fit()` logs it |
    | `scale_loss(loss)` | the optimizer's loss scale (mixed precision) |
    | `compute_gradients(tape, loss, variables)` | `tape.gradient` |
    | `transform_gradients(grads, variables)` | `gradient_transforms` |
    | `apply_gradients(grads, variables)` | `optimizer.apply_gradients` |
    | `compute_metrics(...)` | Keras' compiled metrics |

    `loss_and_gradients` (forward pass under the tape to scaled gradients)
    and `update_and_report` (transforms, guarded update, logs) group these
    for steps that take more than one gradient, like SAM in
    `TapeClassifier`.

    It can be built three ways, like `keras.Model`: functionally
    (`TapeModel(inputs, outputs)`), by subclassing with a `call()`, or by
    wrapping an existing model (`TapeModel(network=model)`).

    `compile()` takes Keras' arguments plus:

    - `gradient_transforms`: list of `fitcustom.GradientTransform`, applied
      in order to the unscaled gradients (e.g. `ClipByGlobalNorm`, which,
      unlike `clipnorm`, clips the gradient summed over replicas).
    - `log_gradient_norm`: log `gradient_norm`, the epoch mean of the global
      gradient norm before the transforms. Defaults to `False`.
    - `skip_nonfinite`: skip any step whose loss or gradients contain NaN or
      inf, leaving weights and optimizer state untouched, and log
      `nonfinite_steps`, the number of skipped steps in the epoch. A skipped
      step adds nothing to the epoch's loss and metrics. Defaults to `False`.

    Args:
        network: Optional `keras.Model` (or layer) to wrap. Its weights are
            the `TapeModel`'s weights; `call()` runs it.
        *args, **kwargs: Passed to `keras.Model` (`inputs`, `outputs`,
            `name`, ...).

    Example:

    ```python
    import keras
    import numpy as np
    import fitcustom

    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(3)(inputs)
    model = fitcustom.TapeModel(inputs, outputs)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
        log_gradient_norm=True,
    )
    x = np.random.rand(64, 8).astype("float32")
    y = np.random.randint(0, 3, size=(64,))
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert "gradient_norm" in history.history
    ```
    """

    def __init__(self, *args, network=None, **kwargs):
        functional = _is_functional_call(args, kwargs)
        if network is not None and functional:
            raise ValueError(
                "Pass either `network=` (to wrap an existing model) or "
                "`inputs`/`outputs` (to build a functional model), not both. "
                f"Received: network={network!r} and inputs/outputs."
            )
        if functional:
            # Built by composition: the graph lives in a plain functional
            # keras.Model. (Keras' own route, injecting `Functional` into
            # the class's bases at run time, would change TapeModel for
            # every later subclass.)
            inputs, outputs, kwargs = _split_functional_args(args, kwargs)
            network = keras.Model(inputs, outputs, name="network")
            args = ()
        if network is not None and not isinstance(network, keras.Layer):
            raise ValueError(
                "`network` must be a keras.Model or keras.Layer. "
                f"Received: network={network!r} of type "
                f"{type(network).__name__}."
            )
        super().__init__(*args, **kwargs)
        self.network = network
        self._gradient_norm_tracker = keras.metrics.Mean(name="gradient_norm")
        self._nonfinite_tracker = keras.metrics.Sum(name="nonfinite_steps")
        self._gradient_transforms = ()
        self._log_gradient_norm = False
        self._skip_nonfinite = False
        if network is not None and network.built:
            self.built = True

    # ------------------------------------------------------------------
    # Model plumbing
    # ------------------------------------------------------------------

    def call(self, inputs, training=None, **kwargs):
        if self.network is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no network to run. Build it "
                "functionally (TapeModel(inputs, outputs)), wrap a model "
                "(TapeModel(network=model)), or subclass it and define "
                "call()."
            )
        return self.network(inputs, training=training, **kwargs)

    @property
    def layers(self):
        if self.network is not None and hasattr(self.network, "layers"):
            return self.network.layers
        return super().layers

    @property
    def inputs(self):
        """The wrapped functional network's inputs."""
        return self._network_attribute("inputs")

    @property
    def outputs(self):
        """The wrapped functional network's outputs."""
        return self._network_attribute("outputs")

    @property
    def output_names(self):
        return self._network_attribute("output_names")

    def _network_attribute(self, name):
        network = self.__dict__.get("network")
        if network is None or not hasattr(network, name):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: it is "
                "not built from inputs and outputs."
            )
        return getattr(network, name)

    def get_config(self):
        config = super().get_config()
        if self.network is not None:
            config["network"] = keras.saving.serialize_keras_object(
                self.network
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "network" in config:
            config["network"] = keras.saving.deserialize_keras_object(
                config["network"], custom_objects=custom_objects
            )
        return cls(**config)

    _SEED_KEY = "seed_generator_state_"

    def save_own_variables(self, store):
        """Keras' variables plus the RNG states of every SeedGenerator.

        Keras keeps neither in `save()` nor in `BackupAndRestore` the state
        of a SeedGenerator (e.g. Dropout's); without it a resumed run
        draws other masks than the uninterrupted one would have.
        """
        super().save_own_variables(store)
        for i, generator in enumerate(_compat.seed_generators(self)):
            store[f"{self._SEED_KEY}{i}"] = keras.ops.convert_to_numpy(
                generator.state.value
            )

    def load_own_variables(self, store):
        keys = [k for k in store.keys() if k.startswith(self._SEED_KEY)]
        if not keys:
            return super().load_own_variables(store)
        super().load_own_variables(
            {k: store[k] for k in store.keys() if k not in keys}
        )
        generators = _compat.seed_generators(self)
        for i, generator in enumerate(generators):
            key = f"{self._SEED_KEY}{i}"
            if key in keys:
                generator.state.assign(store[key])

    @property
    def metrics(self):
        hidden = []
        if not self._log_gradient_norm:
            hidden.append(self._gradient_norm_tracker)
        if not self._skip_nonfinite:
            hidden.append(self._nonfinite_tracker)
        return [m for m in super().metrics if not any(m is h for h in hidden)]

    # ------------------------------------------------------------------
    # compile / fit entry points
    # ------------------------------------------------------------------

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        *,
        gradient_transforms=None,
        log_gradient_norm=False,
        skip_nonfinite=False,
        **kwargs,
    ):
        """Configures the model for training.

        Takes every argument of `keras.Model.compile` plus the engine's
        options.

        Args:
            optimizer: As in `keras.Model.compile`. Defaults to `"rmsprop"`.
            loss: As in `keras.Model.compile`.
            gradient_transforms: List of `fitcustom.GradientTransform`
                applied in order to the unscaled gradients. Defaults to
                `None` (none).
            log_gradient_norm: Log `gradient_norm`, the epoch mean of the
                global norm of the (replica-summed, unscaled) gradients
                before the transforms. Defaults to `False`.
            skip_nonfinite: Skip steps whose loss or gradients are not
                finite and count them in the `nonfinite_steps` metric.
                Defaults to `False`.
            **kwargs: Other arguments of `keras.Model.compile` (`metrics`,
                `run_eagerly`, `steps_per_execution`, `jit_compile`, ...).
        """
        for name, value in (
            ("log_gradient_norm", log_gradient_norm),
            ("skip_nonfinite", skip_nonfinite),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{name}` must be True or False. "
                    f"Received: {name}={value!r}."
                )
        gradient_transforms = transforms_lib.validate_transforms(
            gradient_transforms
        )
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        self._gradient_transforms = gradient_transforms
        self._log_gradient_norm = log_gradient_norm
        self._skip_nonfinite = skip_nonfinite
        self._engine_compile_config = {
            "gradient_transforms": list(gradient_transforms),
            "log_gradient_norm": log_gradient_norm,
            "skip_nonfinite": skip_nonfinite,
        }

    @property
    def gradient_transforms(self):
        """The compiled gradient transforms (a tuple)."""
        return self._gradient_transforms

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and hasattr(self, "_engine_compile_config"):
            config.update(
                keras.saving.serialize_keras_object(self._engine_compile_config)
            )
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds symbolically only under a strategy, and under a
        # multi-worker one it fails (it all-reduces the data batch). Build
        # here in every case, from this replica's part of the first batch,
        # and only while something is unbuilt: no variable is then created
        # while tracing (one trace instead of two, an optimizer that exists
        # before step one), and later fit() calls skip the extra read.
        if not self._needs_build():
            return
        batch = data_batch
        if batch is None and iterator is not None:
            batch = _compat.first_batch(iterator)
        if batch is None:
            return
        batch = _compat.local_batch(batch, self.distribute_strategy)
        with self.distribute_strategy.scope():
            self.build_from_batch(batch)

    def _needs_build(self):
        return self.compiled and not _compat.fully_built(self)

    def build_from_batch(self, batch):
        """Builds model, metrics and optimizer from one (local) batch.

        Called by `fit()` / `evaluate()` before the first trace, under the
        strategy's scope; validates the batch structure first.
        """
        _, y, _ = self.unpack_data(batch)
        self._check_targets(y)
        _compat.symbolic_build(
            self, batch, strict=self._distribute_strategy is not None
        )

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = _compat.make_step_function(
                self, self.train_step
            )
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = _compat.make_step_function(
                self, self.test_step
            )
        return self.test_function

    def _require_compiled(self, method):
        if not self.compiled:
            raise ValueError(
                f"{type(self).__name__}.{method}() was called before "
                "compile(). Received: a model that was never compiled. "
                "Call model.compile(optimizer=..., loss=...) first, e.g. "
                "model.compile(optimizer='adam', loss='mse')."
            )

    def fit(self, *args, **kwargs):
        """Trains the model; see `keras.Model.fit`.

        Without `skip_nonfinite`, the weights are checked once per epoch
        (no cost per step): if a step made them NaN or inf, training stops
        with a warning instead of going on silently. With oneDNN (the CPU
        default) NaN inputs can give a finite loss while the gradients
        corrupt the weights, so `TerminateOnNaN` alone does not see it.
        """
        self._require_compiled("fit")
        if not self._skip_nonfinite:
            args, kwargs = _add_callback(args, kwargs, _StopOnNonFinite())
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """Evaluates the model; see `keras.Model.evaluate`."""
        self._require_compiled("evaluate")
        return super().evaluate(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        """One training step on one batch; see `keras.Model.train_on_batch`."""
        self._require_compiled("train_on_batch")
        return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        """One test step on one batch; see `keras.Model.test_on_batch`."""
        self._require_compiled("test_on_batch")
        return super().test_on_batch(*args, **kwargs)

    # ------------------------------------------------------------------
    # The pieces of a step
    # ------------------------------------------------------------------

    def unpack_data(self, data):
        """Splits a batch into `(x, y, sample_weight)`.

        Accepts what `fit()` accepts: `x`, `(x,)`, `(x, y)` or
        `(x, y, sample_weight)`; `fit()` has already turned `class_weight`
        into a `sample_weight`.
        """
        if isinstance(data, (list, tuple)) and not 1 <= len(data) <= 3:
            raise ValueError(
                f"{type(self).__name__} cannot unpack a batch of "
                f"{len(data)} elements. Expected `x`, `(x,)`, `(x, y)` or "
                "`(x, y, sample_weight)`. Received a "
                f"{type(data).__name__} of {len(data)} elements. If your "
                "model has several inputs, pack them in one tuple or dict: "
                "`((x1, x2), y)`."
            )
        return keras.utils.unpack_x_y_sample_weight(data)

    def forward(self, x, training):
        """Runs the model on `x` (the forward pass of a step)."""
        if self._call_has_training_arg:
            return self(x, training=training)
        return self(x)

    def forward_and_loss(self, x, y, sample_weight, training):
        """`forward` then `compute_loss`; returns `(y_pred, loss)`."""
        y_pred = self.forward(x, training=training)
        loss = self._compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
        self._check_loss(loss)
        return y_pred, loss

    def count_nonfinite(self, verdicts):
        """Adds the steps the guard skipped to the `nonfinite_steps` metric.

        Args:
            verdicts: Booleans from `check_finite` (True: applied). Each
                replica adds its share, so the epoch sum counts steps.
        """
        skipped = tf.add_n(
            [tf.cast(tf.logical_not(v), tf.float32) for v in verdicts]
        )
        self._nonfinite_tracker.update_state(
            skipped / float(distribute.num_replicas())
        )

    def track_loss(self, loss, x, finite=None):
        """Updates the `loss` metric the way built-in `fit()` does.

        The per-replica loss is multiplied back by the number of replicas
        and weighted by the local batch size, so the epoch value is the
        sample-weighted mean over all batches, short last batch included.

        Args:
            loss: The scalar loss returned by `compute_loss`.
            x: The batch's inputs (for its size).
            finite: Optional boolean tensor; when `False` the step adds
                nothing (the non-finite guard).
        """
        tracker = _compat.loss_tracker(self)
        if tracker is None:
            return
        batch_size = tf.shape(_first_tensor(x))[0]
        value = distribute.unscale_loss_for_replicas(loss)
        if finite is not None:
            value = tf.where(finite, value, tf.zeros_like(value))
            batch_size = tf.where(finite, batch_size, 0)
        tracker.update_state(value, sample_weight=batch_size)

    def scale_loss(self, loss, optimizer=None):
        """Multiplies the loss by the optimizer's loss scale, if any.

        Under `mixed_float16`, `compile()` wraps the optimizer in a
        `LossScaleOptimizer`, which divides the gradients by its scale: a
        step that skipped this would take steps ~32768 times too small.
        Must be called inside the tape.
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        if optimizer is None:
            return loss
        return optimizer.scale_loss(loss)

    def compute_gradients(self, tape, loss, variables):
        """Returns `tape.gradient(loss, variables)`."""
        return tape.gradient(loss, variables)

    def transform_gradients(self, grads, variables, optimizer=None):
        """Applies the compiled gradient transforms (and gradient logging).

        Transforms see unscaled gradients: under mixed precision the loss
        scale is divided out before and multiplied back after (exact, the
        scale is a power of two).
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        if not (self._gradient_transforms or self._log_gradient_norm):
            return grads
        scale = _loss_scale(optimizer)
        if scale is not None:
            grads = [
                None if g is None else g / tf.cast(scale, g.dtype)
                for g in grads
            ]
        if self._log_gradient_norm:
            norm = distribute.global_norm(grads)
            ok = tf.math.is_finite(norm)
            self._gradient_norm_tracker.update_state(
                tf.where(ok, norm, 0.0), sample_weight=tf.cast(ok, tf.float32)
            )
        grads = transforms_lib.apply_transforms(
            self._gradient_transforms, grads, variables, self
        )
        if scale is not None:
            grads = [
                None if g is None else g * tf.cast(scale, g.dtype)
                for g in grads
            ]
        return grads

    def check_finite(self, loss, grads, optimizer=None):
        """Whether the step may be applied (the non-finite guard).

        True when the loss and the gradients are finite on every replica.
        Under a `LossScaleOptimizer` only the loss is checked: gradients
        that overflow are the optimizer's business (it skips the step and
        lowers its scale).
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        tensors = [loss]
        if _loss_scale(optimizer) is None:
            tensors.extend(grads)
        return distribute.all_finite(tensors)

    def apply_gradients(self, grads, variables, optimizer=None, finite=None):
        """Applies the gradients with the optimizer.

        The optimizer unscales (mixed precision), all-reduces over replicas,
        clips, decays weights, accumulates and keeps EMA as configured.

        Args:
            grads: Gradients, one per variable.
            variables: The variables to update.
            optimizer: Defaults to `self.optimizer`.
            finite: Optional boolean tensor from `check_finite`; when
                `False` nothing is applied and the optimizer state stays.
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        if finite is None:
            optimizer.apply_gradients(zip(grads, variables))
            return
        if not optimizer.built:
            optimizer.build(variables)
        apply_if(finite, optimizer, grads, variables)

    def train_step(self, data):
        x, y, sample_weight = self.unpack_data(data)
        self._check_targets(y)
        y_pred, loss, grads = self.loss_and_gradients(x, y, sample_weight)
        if grads is None:
            return self.compute_metrics(x, y, y_pred, sample_weight)
        finite = None
        if self._skip_nonfinite:
            finite = self.check_finite(loss, grads)
        return self.update_and_report(
            grads, finite, x, y, y_pred, sample_weight, loss
        )

    def loss_and_gradients(self, x, y, sample_weight, track=True):
        """One training forward pass under a tape: `(y_pred, loss, grads)`.

        `grads` are the loss-scaled gradients of the trainable weights
        (`None`, with a warning, when there are none). With `track` and no
        `skip_nonfinite`, `loss` goes to the `loss` metric here; the guard
        tracks it only once the step is known to be finite.
        """
        with tf.GradientTape() as tape:
            y_pred, loss = self.forward_and_loss(x, y, sample_weight, True)
            if track and not self._skip_nonfinite:
                self.track_loss(loss, x)
            scaled_loss = self.scale_loss(loss)
        variables = self.trainable_weights
        if not variables:
            warnings.warn(
                f"{type(self).__name__} has no trainable weights: "
                "train_step updates only the metrics.",
                stacklevel=3,
            )
            return y_pred, loss, None
        grads = self.compute_gradients(tape, scaled_loss, variables)
        return y_pred, loss, grads

    def update_and_report(
        self, grads, finite, x, y, y_pred, sample_weight, loss
    ):
        """The end of a step: transforms, guarded update, logs.

        `grads` (loss-scaled, of the trainable weights) go through
        `transform_gradients` and `apply_gradients`; `finite` is the
        guard's verdict (`None` without `skip_nonfinite`). Returns the
        step's logs; a skipped step leaves loss and metrics as they were.
        """
        variables = self.trainable_weights
        grads = self.transform_gradients(grads, variables)
        self.apply_gradients(grads, variables, finite=finite)
        if finite is None:
            return self.compute_metrics(x, y, y_pred, sample_weight)
        self.track_loss(loss, x, finite)
        self.count_nonfinite([finite])
        _compat.build_compiled_metrics(self, y, y_pred)
        return tf.cond(
            finite,
            lambda: self.compute_metrics(x, y, y_pred, sample_weight),
            self.get_metrics_result,
        )

    def test_step(self, data):
        x, y, sample_weight = self.unpack_data(data)
        self._check_targets(y)
        y_pred, loss = self.forward_and_loss(x, y, sample_weight, False)
        self.track_loss(loss, x)
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        # The gradient trackers describe training steps only.
        train_only = (self._gradient_norm_tracker, self._nonfinite_tracker)
        names = {m.name for m in train_only}
        return {k: v for k, v in logs.items() if k not in names}

    def predict_step(self, data):
        x, _, _ = self.unpack_data(data)
        return self.forward(x, training=False)

    # ------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------

    def _check_targets(self, y):
        if y is None and _compat.has_compiled_loss(self):
            raise ValueError(
                f"{type(self).__name__} received a batch without targets "
                "(y is None), but compile() was given a loss, which needs "
                "them. Pass `fit(x, y)`, or make your dataset yield "
                "`(x, y)` or `(x, y, sample_weight)` tuples."
            )

    def _check_loss(self, loss):
        if loss is None:
            raise ValueError(
                f"{type(self).__name__}.compute_loss() returned None. "
                "Received: no loss. Pass `loss=` to compile(), add losses "
                "with `add_loss()`, or override `compute_loss()` to return "
                "a scalar tensor."
            )


class _StopOnNonFinite(keras.callbacks.Callback):
    """Stops `fit()` at the end of an epoch whose weights are not finite."""

    def on_epoch_end(self, epoch, logs=None):
        weights = self.model.get_weights()
        if all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
            return
        self.model.stop_training = True
        warnings.warn(
            f"Epoch {epoch + 1}: the weights of {self.model.name} contain NaN "
            "or inf; training stopped. A batch with non-finite values (or an "
            "exploding step) reached them. Compile with "
            "skip_nonfinite=True to skip such steps, and check the input "
            "data.",
            stacklevel=2,
        )


def _add_callback(args, kwargs, callback):
    """Adds `callback` to fit()'s callbacks, positional or keyword."""
    position = 5  # fit(x, y, batch_size, epochs, verbose, callbacks, ...)
    given = args[position] if len(args) > position else kwargs.get("callbacks")
    if isinstance(given, keras.callbacks.CallbackList):
        return args, kwargs  # a ready-made list is the caller's to fill
    if len(args) > position:
        args = list(args)
        args[position] = list(args[position] or []) + [callback]
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [callback]
    return args, kwargs


def _is_functional_call(args, kwargs):
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


def _split_functional_args(args, kwargs):
    kwargs = dict(kwargs)
    if len(args) == 2:
        inputs, outputs = args
    elif len(args) == 1:
        inputs, outputs = args[0], kwargs.pop("outputs")
    else:
        inputs, outputs = kwargs.pop("inputs"), kwargs.pop("outputs")
    return inputs, outputs, kwargs


def _first_tensor(x):
    for t in tf.nest.flatten(x):
        if t is not None:
            return t
    raise ValueError(
        "The batch has no input tensor. Received: x with only None "
        "entries. Expected at least one array or tensor."
    )


def _loss_scale(optimizer):
    """The dynamic loss scale of a `LossScaleOptimizer`, else `None`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if optimizer.built:
            return optimizer.dynamic_scale
        return tf.constant(optimizer.initial_scale, tf.float32)
    return None


def apply_if(finite, optimizer, grads, variables):
    """`optimizer.apply_gradients` only where `finite` is True.

    Under a strategy that needs `merge_call` (MirroredStrategy on CPUs), a
    `tf.cond` around `apply_gradients` is not allowed in a replica context;
    the condition is then evaluated in the cross-replica context, as Keras'
    `LossScaleOptimizer` does. `finite` must be equal on all replicas
    (`fitcustom.distribute.all_finite` ensures it).
    """
    grads = list(grads)
    variables = list(variables)

    def apply(grads_, variables_):
        optimizer.apply_gradients(zip(grads_, variables_))

    ctx = tf.distribute.get_replica_context()
    if ctx is None or not _compat.needs_merge_call():
        tf.cond(finite, lambda: apply(grads, variables), lambda: None)
        return

    def merged(strategy, finite_, grads_, variables_):
        first = strategy.experimental_local_results(finite_)[0]

        def run():
            strategy.extended.call_for_each_replica(
                apply, args=(grads_, variables_)
            )

        tf.cond(first, run, lambda: None)

    ctx.merge_call(merged, args=(finite, grads, variables))
