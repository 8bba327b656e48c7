"""`TapeModel`: a `keras.Model` whose steps are written with
`tf.GradientTape`, split into pieces that can be overridden one at a time.
"""

import warnings
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from fitcustom import _args
from fitcustom import _compat
from fitcustom import checkpoints
from fitcustom import checks
from fitcustom import distribute
from fitcustom import step_functions
from fitcustom import transforms as transforms_lib
from fitcustom._version import __version__

#: The weights a piece takes (Keras variables), and their gradients
#: (`None` where a weight gets none).
Variables = Sequence[keras.Variable]
Gradients = list[tf.Tensor | None]


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
    | `loss_terms(...)` | `{}`; extra terms, see `add_loss_term` |
    | `track_loss(loss, x)` | the `loss` metric, as `fit()` logs it |
    | `scale_loss(loss)` | the optimizer's loss scale (mixed precision) |
    | `trained_weights(forward_weights)` | the weights `call()` uses |
    | `compute_gradients(tape, loss, variables)` | `tape.gradient` |
    | `transform_gradients(grads, variables)` | `gradient_transforms` |
    | `apply_gradients(grads, variables)` | `optimizer.apply_gradients` |
    | `compute_metrics(...)` | Keras' compiled metrics |

    `loss_and_gradients` (forward pass under the tape to scaled gradients)
    and `update_and_report` (transforms, guarded update, logs) group these
    for steps that take more than one gradient, like SAM in
    `TapeClassifier`. `update(tape, scaled_loss, loss, variables,
    optimizer)` (gradients, guard, transforms, optimizer) and
    `track_mean(tracker, value, batch_size)` (a loss logged as `fit()`
    logs its loss) serve steps with several networks and optimizers, like
    `TapeGAN`'s.

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

    def __new__(cls, *args, **kwargs):
        # Built from inputs and outputs: a real Keras functional model
        # (see `_compat.functional_class`).
        if _compat.functional_init_arguments(args, kwargs):
            cls = _compat.functional_class(cls)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, network=None, **kwargs):
        functional = _compat.functional_init_arguments(args, kwargs)
        if network is not None and functional:
            raise ValueError(
                "Pass either `network=` (to wrap an existing model) or "
                "`inputs`/`outputs` (to build a functional model), not both. "
                f"Received: network={network!r} and inputs/outputs."
            )
        if network is not None and not isinstance(network, keras.Layer):
            raise ValueError(
                "`network` must be a keras.Model or keras.Layer. "
                f"Received: network={network!r} of type "
                f"{type(network).__name__}."
            )
        if functional:
            inputs, outputs, kwargs = _split_functional_args(args, kwargs)
            _compat.init_functional(self, inputs, outputs, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self.network = network
        self._gradient_norm_tracker = keras.metrics.Mean(name="gradient_norm")
        self._nonfinite_tracker = keras.metrics.Sum(name="nonfinite_steps")
        self._gradient_transforms = ()
        self._log_gradient_norm = False
        self._skip_nonfinite = False
        self._loss_term_trackers = {}
        self.__dict__["_step_terms"] = {}
        if network is not None and network.built:
            self.built = True

    def add_loss_term(self, name: str):
        """Declares an extra loss term that `loss_terms` returns.

        Call it in `__init__`. The term is added to the loss, and logged as
        `name` (and `val_name`): its epoch mean, as the loss is. Return its
        values from `loss_terms` one per sample, unreduced: the engine
        takes the (sample-weighted) mean over the batch and divides it by
        the number of replicas, once, as Keras does for the compiled loss.
        So a term is right on any number of replicas whether computed with
        raw ops or with a Keras loss (`keras.losses.KLDivergence(
        reduction=None)`); an already reduced scalar is refused.

        Args:
            name: The term's name in the logs, e.g. `"distillation_loss"`.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                "A loss term's name must be an identifier such as "
                f"'distillation_loss'. Received: name={name!r}."
            )
        taken = {m.name for m in self.metrics} | {"loss"}
        if name in taken or name in self._loss_term_trackers:
            raise ValueError(
                f"A loss term needs a name of its own. Received: "
                f"name={name!r}, already a logged name ({sorted(taken)})."
            )
        self._loss_term_trackers[name] = keras.metrics.Mean(name=name)

    def loss_terms(
        self, x, y, y_pred, sample_weight, training: bool
    ) -> dict[str, tf.Tensor]:
        """Extra loss terms of a step: `{name: per-sample values}`.

        Override it (with `add_loss_term` for each name) to add terms to
        the compiled loss, e.g. a distillation or consistency term. Each
        value has the batch as its first axis and is not reduced; further
        axes are averaged. Runs in training and in evaluation (`training`
        tells which), after `forward`.

        Returns:
            A dict with one entry per declared term. Defaults to `{}`.
        """
        return {}

    # ------------------------------------------------------------------
    # Model plumbing
    # ------------------------------------------------------------------

    def _graph_model(self):
        """The functional graph behind this model, or `None`.

        The model itself when it was built from inputs and outputs, the
        wrapped network when it was given one (`network=`), else `None`
        (a subclassed model: its graph is its `call()`). A method, not
        a property: Keras' saving walks every attribute, and one that
        returns the model itself would never end.
        """
        network = self.__dict__.get("network")
        if network is not None:
            return network
        return self if _compat.is_functional(self) else None

    def call(self, inputs, training=None, mask=None, **kwargs):
        network = self.__dict__.get("network")
        if mask is not None:
            kwargs["mask"] = mask
        if network is not None:
            return network(inputs, training=training, **kwargs)
        if _compat.is_functional(self):
            return super().call(inputs, training=training, **kwargs)
        raise NotImplementedError(
            f"{type(self).__name__} has no network to run. Build it "
            "functionally (TapeModel(inputs, outputs)), wrap a model "
            "(TapeModel(network=model)), or subclass it and define "
            "call()."
        )

    @property
    def layers(self):
        network = self.__dict__.get("network")
        if network is not None and hasattr(network, "layers"):
            return network.layers
        return super().layers

    @layers.setter
    def layers(self, value):
        keras.Model.layers.fset(self, value)

    @property
    def inputs(self):
        """The functional graph's inputs (see `_graph_model`)."""
        return self._graph_attribute("inputs")

    @property
    def outputs(self):
        """The functional graph's outputs (see `_graph_model`)."""
        return self._graph_attribute("outputs")

    @property
    def output_names(self):
        network = self.__dict__.get("network")
        if network is not None:
            return self._graph_attribute("output_names")
        names = self.__dict__.get("_functional_output_names")
        if names is None:
            raise AttributeError(
                f"{type(self).__name__} has no attribute 'output_names': "
                "it is not built from inputs and outputs."
            )
        return names

    @output_names.setter
    def output_names(self, value):
        # Set by `Functional.__init__`.
        self.__dict__["_functional_output_names"] = value

    def _graph_attribute(self, name):
        network = self.__dict__.get("network")
        if network is None and _compat.is_functional(self):
            return getattr(super(), name)
        if network is None or not hasattr(network, name):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: it is "
                "not built from inputs and outputs."
            )
        return getattr(network, name)

    #: Constructor arguments that are models (or layers), read from the
    #: attributes of the same names: saved in the config and rebuilt on
    #: loading, so a subclass that holds sub-models needs no
    #: `get_config` / `from_config` of its own.
    config_models: tuple = ()
    #: Constructor arguments that are plain values (numbers, strings),
    #: read from the attributes of the same names and saved likewise.
    config_values: tuple = ()

    def get_config(self):
        config = super().get_config()
        config["fitcustom_version"] = __version__
        if self.network is not None:
            config["network"] = keras.saving.serialize_keras_object(
                self.network
            )
        for name in self.config_models:
            config[name] = keras.saving.serialize_keras_object(
                getattr(self, name)
            )
        for name in self.config_values:
            config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = check_saved_version(config, cls.__name__)
        models = [k for k in ("network", *cls.config_models) if k in config]
        if not models:
            # A functional config (layers and their connections), or a
            # subclass's own arguments: Keras' `Model.from_config`.
            return super().from_config(config, custom_objects)
        for key in models:
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the model as a `.keras` file; see `keras.Model.save`.

        Written atomically (`fitcustom.checkpoints.save_model`): a kill or
        a full disk during the save leaves the previous file intact.
        """
        checkpoints.save_model(self, filepath, overwrite, zipped, **kwargs)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights; see `keras.Model.save_weights`.

        Written atomically (`fitcustom.checkpoints.save_weights`).
        """
        checkpoints.save_weights(self, filepath, overwrite, max_shard_size)

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

    def get_metrics_result(self):
        """The metrics' current results, as `fit()` logs them.

        With `skip_nonfinite`, a loss or metric that no applied step has
        updated yet in this epoch (every step so far was skipped) is NaN,
        not Keras' 0.0 of an empty mean, so `EarlyStopping` and
        `ModelCheckpoint(save_best_only=True)` never take a broken epoch
        for the best one. `nonfinite_steps` keeps its count.
        """
        results = super().get_metrics_result()
        tracker = _compat.loss_tracker(self)
        if not self._may_skip_steps() or tracker is None:
            return results
        # A mean of its own (loss, d_loss, gradient_norm) is NaN while it
        # has counted nothing; compiled metrics follow the loss.
        counts = {
            m.name: m.count
            for m in self.metrics
            if isinstance(m, keras.metrics.Mean)
        }
        counted = self._nonfinite_tracker.name

        def honest(name, value):
            if name == counted or not _is_float(value):
                return value
            applied = counts.get(name, tracker.count) > 0
            nan = tf.constant(float("nan"), tf.convert_to_tensor(value).dtype)
            return tf.where(applied, value, nan)

        return {name: honest(name, v) for name, v in results.items()}

    def _may_skip_steps(self):
        """Whether a step can leave the metrics alone (then an epoch
        without an applied step logs NaN)."""
        return self._skip_nonfinite

    # ------------------------------------------------------------------
    # compile / fit entry points
    # ------------------------------------------------------------------

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
        *,
        gradient_transforms=None,
        log_gradient_norm=False,
        skip_nonfinite=False,
    ):
        """Configures the model for training.

        Takes the arguments of `keras.Model.compile`, in Keras' order and
        with Keras' defaults, plus the engine's options (keyword only).

        Args:
            optimizer: As in `keras.Model.compile`. Defaults to `"rmsprop"`.
            loss: As in `keras.Model.compile`: one loss, or a list or dict
                with one per output.
            loss_weights: As in `keras.Model.compile`.
            metrics: As in `keras.Model.compile`.
            weighted_metrics: As in `keras.Model.compile`.
            run_eagerly: As in `keras.Model.compile`. Defaults to `False`.
            steps_per_execution: As in `keras.Model.compile`. Defaults
                to `1`.
            jit_compile: As in `keras.Model.compile`. Defaults to `"auto"`.
            auto_scale_loss: As in `keras.Model.compile`. Defaults to
                `True`.
            gradient_transforms: List of `fitcustom.GradientTransform`
                applied in order to the unscaled gradients. Defaults to
                `None` (none).
            log_gradient_norm: Log `gradient_norm`, the epoch mean of the
                global norm of the (replica-summed, unscaled) gradients
                before the transforms. Defaults to `False`.
            skip_nonfinite: Skip steps whose loss or gradients are not
                finite and count them in the `nonfinite_steps` metric.
                Defaults to `False`.
        """
        _args.boolean("log_gradient_norm", log_gradient_norm)
        _args.boolean("skip_nonfinite", skip_nonfinite)
        steps_per_execution = _args.whole(
            "steps_per_execution",
            steps_per_execution,
            hint=" It is the number of steps run per call of the compiled "
            "step.",
        )
        gradient_transforms = transforms_lib.validate_transforms(
            gradient_transforms
        )
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        # Not tracked by Keras (a metric object in it would be counted as
        # one of the model's own metrics too).
        self.__dict__["_compiled_by_name"] = (
            loss,
            (metrics, weighted_metrics),
        )
        self._gradient_transforms = gradient_transforms
        self._log_gradient_norm = log_gradient_norm
        self._skip_nonfinite = skip_nonfinite
        if self.optimizer is not None:
            self.check_transforms(self.optimizer)
        self.keep_compile_arguments(
            gradient_transforms=list(gradient_transforms),
            log_gradient_norm=log_gradient_norm,
            skip_nonfinite=skip_nonfinite,
        )

    @property
    def gradient_transforms(self):
        """The compiled gradient transforms (a tuple)."""
        return self._gradient_transforms

    @property
    def skip_nonfinite(self) -> bool:
        """Whether steps with a non-finite loss or gradient are skipped
        (the compiled `skip_nonfinite`)."""
        return self._skip_nonfinite

    @property
    def log_gradient_norm(self) -> bool:
        """Whether `gradient_norm` is logged (the compiled option)."""
        return self._log_gradient_norm

    def check_transforms(self, *optimizers):
        """Lets each gradient transform warn about an optimizer it cannot
        work with (`GradientTransform.check_optimizer`). `compile()`
        calls it with the model's optimizer; a model with optimizers of
        its own (`TapeGAN`) calls it with them."""
        for optimizer in optimizers:
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            for transform in self._gradient_transforms:
                transform.check_optimizer(inner)

    def keep_compile_arguments(self, **arguments):
        """Saves `compile()` arguments with the model.

        A subclass whose `compile()` takes arguments of its own calls it
        with them (as the user passed them: `None` for a default that
        `compile()` fills in). `get_compile_config` writes them beside
        Keras' own (replacing an entry of the same name), and loading a
        saved model passes them back to `compile()`; Keras objects
        (optimizers, losses, gradient transforms) are serialized. So a
        task model needs no `get_compile_config` / `compile_from_config`
        of its own.

        Args:
            **arguments: `compile()`'s arguments by name.
        """
        # Not tracked by Keras (a metric object in it would be counted as
        # one of the model's own metrics too).
        self.__dict__.setdefault("_kept_compile_arguments", {}).update(
            arguments
        )

    @property
    def compile_arguments(self):
        """The `compile()` arguments kept with the model (a new dict)."""
        return dict(self.__dict__.get("_kept_compile_arguments", {}))

    def get_compile_config(self):
        config = super().get_compile_config()
        kept = self.__dict__.get("_kept_compile_arguments")
        if config and kept:
            config.update(keras.saving.serialize_keras_object(kept))
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
            self, batch, strict=_compat.created_under_strategy(self)
        )

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self._resumable(
                step_functions.make_step_function(self, self.train_step)
            )
        return self.train_function

    def resume_within_epoch(self, batches_done, metric_values=None):
        """Makes the next `fit()` skip batches of its first epoch.

        Called by `fitcustom.BackupAndRestore` after it restored a backup
        taken in the middle of an epoch: the first `batches_done` batches
        of the epoch that `fit()` starts with are read and skipped (their
        steps are in the restored weights already), and the metrics take
        the restored running values, so the epoch's logs cover all its
        batches. Callbacks still see every batch index, so batch-level
        schedules stay where they were.

        Args:
            batches_done: Batches of the epoch already trained.
            metric_values: The values of `self.metrics_variables` when the
                backup was taken, or `None` to keep the metrics.
        """
        self.__dict__["_resume_skip"] = (int(batches_done), metric_values)

    def _resumable(self, function):
        """`function` (a train function) that first skips the batches
        `resume_within_epoch` asked for."""

        def train_function(iterator):
            pending = self.__dict__.get("_resume_skip")
            if not pending:
                return function(iterator)
            remaining, metric_values = pending
            variables = self.metrics_variables
            if metric_values is not None and len(metric_values) == len(
                variables
            ):
                for variable, value in zip(variables, metric_values):
                    variable.assign(value)
            skipped = min(remaining, self.steps_per_execution)
            _compat.skip_batches(iterator, skipped)
            remaining -= skipped
            self.__dict__["_resume_skip"] = (
                (remaining, None) if remaining else None
            )
            return self.get_metrics_result()

        return train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = step_functions.make_step_function(
                self, self.test_step
            )
        return self.test_function

    def _training_optimizers(self):
        """The optimizers a training step updates (their state is saved
        and restored with the weights)."""
        return [] if self.optimizer is None else [self.optimizer]

    def _require_compiled(self, method):
        if not self.compiled:
            raise ValueError(
                f"{type(self).__name__}.{method}() was called before "
                "compile(). Received: a model that was never compiled. "
                "Call model.compile(optimizer=..., loss=...) first, e.g. "
                "model.compile(optimizer='adam', loss='mse')."
            )

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        validation_steps=None,
        validation_batch_size=None,
        validation_freq=1,
    ):
        """Trains the model; see `keras.Model.fit` (same arguments).

        Without `skip_nonfinite`, the weights are checked once per epoch
        (no cost per step): if a step made them NaN or inf, training stops
        with a warning instead of going on silently. With oneDNN (the CPU
        default) NaN inputs can give a finite loss while the gradients
        corrupt the weights, so `TerminateOnNaN` alone does not see it.
        """
        self._require_compiled("fit")
        if not self._training_optimizers():
            raise ValueError(
                f"{type(self).__name__}.fit() needs an optimizer. Received: "
                "compile(optimizer=None). Pass one to compile(), e.g. "
                "optimizer='adam'."
            )
        checks.check_batch_size(batch_size)
        checks.check_batch_size(validation_batch_size, "validation_batch_size")
        checks.check_not_endless(x, steps_per_epoch)
        checks.check_class_weight(class_weight, y)
        self.check_fit_data(x, y, sample_weight, validation_data, batch_size)
        if not self._skip_nonfinite and not isinstance(
            callbacks, keras.callbacks.CallbackList
        ):
            # (A ready-made CallbackList is the caller's to fill.)
            # First, so that checkpoints see the restored weights.
            callbacks = [_StopOnNonFinite()] + list(callbacks or [])
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
        )

    def evaluate(
        self,
        x=None,
        y=None,
        batch_size=None,
        verbose="auto",
        sample_weight=None,
        steps=None,
        callbacks=None,
        return_dict=False,
        **kwargs,
    ):
        """Evaluates the model; see `keras.Model.evaluate` (same
        arguments)."""
        self._require_compiled("evaluate")
        checks.check_batch_size(batch_size)
        checks.check_not_endless(x, steps, "x")
        self.check_evaluate_data(x, y, sample_weight)
        return super().evaluate(
            x=x,
            y=y,
            batch_size=batch_size,
            verbose=verbose,
            sample_weight=sample_weight,
            steps=steps,
            callbacks=callbacks,
            return_dict=return_dict,
            **kwargs,
        )

    def check_fit_data(
        self, x, y, sample_weight, validation_data, batch_size=None
    ):
        """Checks `fit()`'s data before any step; see `check_data`.

        Called with `fit()`'s own arguments; `validation_data` is checked
        here too, so that bad validation data is refused before epoch 1
        trains.
        """
        self.check_data(x, y, sample_weight)
        if isinstance(validation_data, tf.data.Dataset):
            self.check_data(validation_data)
        elif isinstance(validation_data, (list, tuple)) and validation_data:
            self.check_data(*validation_data[:3])

    def check_evaluate_data(self, x, y, sample_weight):
        """Checks `evaluate()`'s data before any step; see `check_data`."""
        self.check_data(x, y, sample_weight)

    def check_data(self, x, y=None, sample_weight=None):
        """Checks data for this model before any step uses it.

        The engine checks structure: dict or list inputs against the
        model's inputs (keys or count), and dict targets against the
        outputs given a loss or metric in `compile()` as dicts. Reads
        only the element spec of a `tf.data.Dataset`. Task models add
        their own checks (a subclass calls `super().check_data(...)`).

        Raises:
            ValueError: Naming the keys or structure received and
                expected.
        """
        checks.check_sample_weight(sample_weight, y)
        name = f"{type(self).__name__} {self.name!r}"
        graph = self._graph_model()
        try:
            expected = None if graph is None else graph.input
        except (AttributeError, ValueError):  # an unbuilt network
            expected = None
        if expected is not None:
            checks.check_input_structure(x, expected, name)
        targeted = self._targeted_outputs()
        if targeted is not None:
            checks.check_target_structure(
                x if y is None else y, self.output_names, targeted, name
            )

    def _targeted_outputs(self):
        """The outputs given a loss or metric by name in `compile()`, or
        `None` when the loss is not a dict (then Keras matches targets
        by position or applies the loss to every output)."""
        loss, metrics = self.__dict__.get("_compiled_by_name", (None, ()))
        if not isinstance(loss, dict):
            return None
        named = set(loss)
        for m in metrics:
            if isinstance(m, dict):
                named.update(m)
        return sorted(named)

    def train_on_batch(
        self,
        x,
        y=None,
        sample_weight=None,
        class_weight=None,
        return_dict=False,
    ):
        """One training step on one batch; see `keras.Model.train_on_batch`."""
        self._require_compiled("train_on_batch")
        return super().train_on_batch(
            x,
            y=y,
            sample_weight=sample_weight,
            class_weight=class_weight,
            return_dict=return_dict,
        )

    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """One test step on one batch; see `keras.Model.test_on_batch`."""
        self._require_compiled("test_on_batch")
        return super().test_on_batch(
            x, y=y, sample_weight=sample_weight, return_dict=return_dict
        )

    # ------------------------------------------------------------------
    # The pieces of a step
    # ------------------------------------------------------------------

    def unpack_data(self, data) -> tuple:
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

    def forward(self, x, training: bool):
        """Runs the model on `x` (the forward pass of a step)."""
        if _compat.call_takes_training(self):
            return self(x, training=training)
        return self(x)

    def forward_and_loss(self, x, y, sample_weight, training: bool) -> tuple:
        """`forward` then `compute_loss`; returns `(y_pred, loss)`."""
        if training and self._probe_forward():
            # Which trainable weights the forward pass reads: those are
            # the ones a step trains by default (`trained_weights`).
            with tf.GradientTape() as probe:
                y_pred = self.forward(x, training=training)
            read = {id(v) for v in probe.watched_variables()}
            self.__dict__["_forward_weights"] = (
                self._weights_key(),
                [v for v in self.trainable_weights if _reads(v, read)],
            )
        else:
            y_pred = self.forward(x, training=training)
        loss = self._compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
        self._check_loss(loss)
        terms = self._reduced_loss_terms(x, y, y_pred, sample_weight, training)
        for value in terms.values():
            loss = loss + tf.cast(value, loss.dtype)
        # Tracked with the loss (`track_loss`), under the same guard.
        self.__dict__["_step_terms"] = terms
        return y_pred, loss

    def _reduced_loss_terms(self, x, y, y_pred, sample_weight, training):
        """`loss_terms`, checked, each reduced to its per-replica mean."""
        terms = self.loss_terms(x, y, y_pred, sample_weight, training)
        declared = set(self._loss_term_trackers)
        if not isinstance(terms, dict) or set(terms) != declared:
            got = sorted(terms) if isinstance(terms, dict) else terms
            raise ValueError(
                f"{type(self).__name__}.loss_terms() must return a dict with "
                f"one entry per term declared with add_loss_term(). "
                f"Received: {got!r}. Expected keys: {sorted(declared)}."
            )
        weights = sample_weight if tf.is_tensor(sample_weight) else None
        reduced = {}
        for name, values in terms.items():
            values = tf.convert_to_tensor(values)
            if values.shape.rank == 0:
                raise ValueError(
                    f"Loss term {name!r} must give one value per sample "
                    "(the engine averages over the batch and the replicas). "
                    "Received: a scalar, already reduced. Return the "
                    "unreduced values, e.g. keras.losses.KLDivergence("
                    "reduction=None)(...), or raw ops without the final "
                    "mean."
                )
            w = weights
            if w is not None and w.shape.rank != 1:
                w = None
            reduced[name] = distribute.mean_loss(tf.cast(values, tf.float32), w)
        return reduced

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

    def track_loss(
        self, loss: tf.Tensor, x, finite: tf.Tensor | None = None
    ) -> None:
        """Updates the `loss` metric the way built-in `fit()` does.

        The per-replica loss is multiplied back by the number of replicas
        and weighted by the local batch size, so the epoch value is the
        sample-weighted mean over all batches, short last batch included.

        The terms of `loss_terms` computed with this loss (by
        `forward_and_loss`) go to their own metrics the same way.

        Args:
            loss: The scalar loss returned by `compute_loss`.
            x: The batch's inputs (for its size).
            finite: Optional boolean tensor; when `False` the step adds
                nothing (the non-finite guard).
        """
        terms = self.__dict__.get("_step_terms", {})
        self.__dict__["_step_terms"] = {}
        trackers = [(_compat.loss_tracker(self), loss)] + [
            (self._loss_term_trackers[name], value)
            for name, value in terms.items()
        ]
        batch_size = tf.shape(_first_tensor(x))[0]
        for tracker, value in trackers:
            if tracker is not None:
                self.track_mean(tracker, value, batch_size, finite)

    def track_mean(
        self,
        tracker: keras.metrics.Mean,
        value: tf.Tensor,
        batch_size,
        finite: tf.Tensor | None = None,
    ) -> None:
        """Adds a per-replica loss value to a `Mean` metric, as `fit()`
        adds its loss: multiplied back by the number of replicas and
        weighted by the replica's batch size (so the epoch value is the
        mean over samples). Nothing is added when `finite` is `False`.

        Args:
            tracker: A `keras.metrics.Mean`.
            value: A scalar, divided by the number of replicas (as a loss
                for `tape.gradient` is).
            batch_size: Number of samples behind `value` on this replica.
            finite: Optional boolean tensor, the guard's verdict.
        """
        value = distribute.unscale_loss_for_replicas(value)
        if finite is not None:
            value = tf.where(finite, value, tf.zeros_like(value))
            batch_size = tf.where(finite, batch_size, 0)
        tracker.update_state(value, sample_weight=batch_size)

    def update(
        self,
        tape: tf.GradientTape,
        scaled_loss: tf.Tensor,
        loss: tf.Tensor,
        variables: Variables,
        optimizer: keras.optimizers.Optimizer | None = None,
    ) -> tf.Tensor | None:
        """One update of `variables` from a tape: `compute_gradients` of
        `scaled_loss`, the non-finite guard on `loss` and the gradients
        (with `skip_nonfinite`), `transform_gradients`, then
        `apply_gradients`. For steps with several networks and optimizers
        (a GAN's discriminator and generator updates).

        Returns:
            The guard's verdict (`None` without `skip_nonfinite`).
        """
        grads = self.compute_gradients(tape, scaled_loss, variables)
        finite = None
        if self._skip_nonfinite:
            finite = self.check_finite(loss, grads, optimizer)
        grads = self.transform_gradients(grads, variables, optimizer)
        self.apply_gradients(grads, variables, optimizer, finite)
        return finite

    def scale_loss(
        self,
        loss: tf.Tensor,
        optimizer: keras.optimizers.Optimizer | None = None,
    ) -> tf.Tensor:
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

    def compute_gradients(
        self, tape: tf.GradientTape, loss: tf.Tensor, variables: Variables
    ) -> Gradients:
        """Returns `tape.gradient(loss, variables)`."""
        return tape.gradient(loss, variables)

    def transform_gradients(
        self,
        grads: Gradients,
        variables: Variables,
        optimizer: keras.optimizers.Optimizer | None = None,
    ) -> Gradients:
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

    def check_finite(
        self,
        loss: tf.Tensor,
        grads: Gradients,
        optimizer: keras.optimizers.Optimizer | None = None,
    ) -> tf.Tensor:
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

    def apply_gradients(
        self,
        grads: Gradients,
        variables: Variables,
        optimizer: keras.optimizers.Optimizer | None = None,
        finite: tf.Tensor | None = None,
    ) -> None:
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

    def loss_and_gradients(
        self, x, y, sample_weight, track: bool = True
    ) -> tuple:
        """One training forward pass under a tape: `(y_pred, loss, grads)`.

        `grads` are the loss-scaled gradients of the weights the step
        trains (`step_weights()`; `None`, with a warning, when there are
        none). With `track` and no
        `skip_nonfinite`, `loss` goes to the `loss` metric here; the guard
        tracks it only once the step is known to be finite.
        """
        pending = self.__dict__.get("_step_terms", {})
        check = self._check_untrained()
        with tf.GradientTape(persistent=check) as tape:
            y_pred, loss = self.forward_and_loss(x, y, sample_weight, True)
            if not track:  # the terms of the pass that is tracked stay
                self.__dict__["_step_terms"] = pending
            elif not self._skip_nonfinite:
                self.track_loss(loss, x)
            scaled_loss = self.scale_loss(loss)
        variables = self.step_weights()
        if not variables:
            warnings.warn(
                f"{type(self).__name__} has no trainable weights that its "
                "forward pass uses: train_step updates only the metrics.",
                stacklevel=3,
            )
            return y_pred, loss, None
        grads = self.compute_gradients(tape, scaled_loss, variables)
        if check:
            # Do the loss's gradients reach trainable weights that the
            # step leaves alone? Asked once per trace (a compiled step
            # prunes the unused gradients from its graph), or in the first
            # eager step.
            self.__dict__["_untrained_checked"] = True
            trained = {id(v) for v in variables}
            untrained = [
                v for v in self.trainable_weights if id(v) not in trained
            ]
            if untrained:
                reach = tape.gradient(scaled_loss, untrained)
                self._warn_untrained(untrained, reach)
        return y_pred, loss, grads

    def trained_weights(self, forward_weights: list) -> Variables:
        """The weights a training step updates (a piece).

        Args:
            forward_weights: The trainable weights that the forward pass
                (`forward`, that is `call()`) read in this step.

        Returns:
            A list of weights. Defaults to `forward_weights`: a model
            that holds a sub-model it does not run in `call()` (a teacher,
            a feature extractor used in the loss) does not train it, and
            a warning names such weights when the loss's gradients reach
            them. Every weight `call()` uses is trained, as in
            `keras.Model.fit()`. Return `self.trainable_weights` to train
            all trainable weights as `fit()` does, or add the weights a
            loss uses (`forward_weights + [self.log_variance]`).
        """
        return forward_weights

    def step_weights(self) -> list:
        """The weights this training step updates: `trained_weights` of
        what the step's forward pass read."""
        cached = self.__dict__.get("_forward_weights")
        if cached is None or cached[0] != self._weights_key():
            forward = list(self.trainable_weights)  # no forward pass yet
        else:
            forward = list(cached[1])
        return list(self.trained_weights(forward))

    def _weights_key(self):
        return tuple(id(v) for v in self.trainable_weights)

    def _probe_forward(self):
        # Traced steps look at every trace; eager ones once while the
        # weights stay the same (a probing tape doubles eager work).
        if tf.inside_function():
            return True
        cached = self.__dict__.get("_forward_weights")
        return cached is None or cached[0] != self._weights_key()

    def _check_untrained(self):
        return tf.inside_function() or not self.__dict__.get(
            "_untrained_checked"
        )

    def _warn_untrained(self, untrained, grads):
        reached = [v.path for v, g in zip(untrained, grads) if g is not None]
        if not reached or self.__dict__.get("_warned_untrained"):
            return
        self.__dict__["_warned_untrained"] = True
        shown = ", ".join(reached[:6]) + (" ..." if len(reached) > 6 else "")
        warnings.warn(
            f"The loss of {type(self).__name__} has gradients for "
            f"{len(reached)} trainable weights that the training step does "
            f"not update, because call() does not use them: {shown}. "
            "They stay as they are (a teacher, a feature extractor in a "
            "loss). To say so and save the work, set `trainable = False` "
            "on that model (or wrap its output in tf.stop_gradient). To "
            "train them, override `trained_weights` (return "
            "self.trainable_weights to train every weight, as "
            "keras.Model.fit() does).",
            stacklevel=4,
        )

    def update_and_report(
        self, grads, finite, x, y, y_pred, sample_weight, loss
    ):
        """The end of a step: transforms, guarded update, logs.

        `grads` (loss-scaled, of the trainable weights) go through
        `transform_gradients` and `apply_gradients`; `finite` is the
        guard's verdict (`None` without `skip_nonfinite`). Returns the
        step's logs; a skipped step leaves loss and metrics as they were.
        """
        variables = self.step_weights()
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
    """Stops `fit()` at the end of an epoch whose weights are not finite,
    and puts back the last finite weights and optimizer state.

    Keeps a copy of the model's variables and its optimizers' (on the
    host) from the start of training and the end of every finite epoch.
    Runs first among the epoch-end callbacks, so that checkpoints written
    at that epoch's end see the restored weights, never the broken ones.
    """

    def _variables(self):
        variables = list(self.model.weights)
        for optimizer in self.model._training_optimizers():
            variables.extend(optimizer.variables)
        return variables

    def _snapshot(self):
        self._saved = [v.numpy() for v in self._variables()]

    def on_train_begin(self, logs=None):
        self._saved, self._saved_epoch = None, None

    def on_epoch_begin(self, epoch, logs=None):
        # Taken here, after every on_train_begin: a restored backup is
        # what training starts from.
        if self._saved is None:
            self._snapshot()

    def on_epoch_end(self, epoch, logs=None):
        variables = self._variables()
        values = [v.numpy() for v in variables]
        if all(np.isfinite(w).all() for w in values if w.dtype.kind in "fc"):
            self._saved = values
            self._saved_epoch = epoch + 1
            return
        self.model.stop_training = True
        restored = self._saved is not None and len(self._saved) == len(
            variables
        )
        if restored:
            for variable, value in zip(variables, self._saved):
                variable.assign(value)
        where = (
            "the start of training"
            if self._saved_epoch is None
            else f"the end of epoch {self._saved_epoch}"
        )
        warnings.warn(
            f"Epoch {epoch + 1}: the weights of {self.model.name} contain NaN "
            "or inf; training stopped"
            + (
                f" and the weights and optimizer state of {where} (the last "
                "finite ones) were put back"
                if restored
                else ""
            )
            + ". A batch with non-finite values (or an exploding step) "
            "reached them. Compile with skip_nonfinite=True to skip such "
            "steps, and check the input data.",
            stacklevel=2,
        )


def check_saved_version(config, class_name):
    """Removes the fitcustom version from a saved config; warns when the
    file was written by another version of fitcustom."""
    config = dict(config)
    saved = config.pop("fitcustom_version", None)
    if saved is not None and saved != __version__:
        warnings.warn(
            f"This {class_name} was saved by fitcustom {saved}; the "
            f"installed fitcustom is {__version__}. If loading fails or the "
            f"model behaves differently, install fitcustom=={saved} "
            "(pip install 'fitcustom==" + saved + "').",
            stacklevel=3,
        )
    return config


def _reads(variable, read):
    """Whether a watched set (ids from `tape.watched_variables()`)
    holds the Keras `variable` (it watches the backend variable)."""
    return id(variable) in read or id(variable.value) in read


def _is_float(value):
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return isinstance(value, float)
    return tf.as_dtype(dtype).is_floating


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

    `finite` must be equal on all replicas
    (`fitcustom.distribute.all_finite` ensures it).
    """

    def apply(grads_, variables_):
        optimizer.apply_gradients(zip(grads_, variables_))

    run_if(finite, apply, list(grads), list(variables))


def run_if(condition, fn, *args):
    """Calls `fn(*args)` in the replica context only where `condition`.

    Under a strategy that needs `merge_call` (MirroredStrategy on CPUs), a
    `tf.cond` around cross-replica work (`apply_gradients`) is not allowed
    in a replica context; the condition is then evaluated in the
    cross-replica context and `fn` runs on every replica from there, as
    Keras' `LossScaleOptimizer` does. `condition` must be equal on all
    replicas; `fn` returns nothing.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or not _compat.needs_merge_call():
        tf.cond(condition, lambda: fn(*args), lambda: None)
        return

    def merged(strategy, condition_, *args_):
        first = strategy.experimental_local_results(condition_)[0]

        def run():
            strategy.extended.call_for_each_replica(fn, args=args_)

        tf.cond(first, run, lambda: None)

    ctx.merge_call(merged, args=(condition,) + tuple(args))
