"""The entry points of training (`fit`, `evaluate`, `train_on_batch`,
`test_on_batch`), the data checks before any step, building a model from
its first batch, its step functions and mid-epoch resume (a mixin of
`TapeModel`), and the callback that stops on non-finite weights.

May import: the ground floor, `_keras`; `checkpoints` inside a function (to
name `fitcustom.BackupAndRestore` when Keras' own is passed).
"""

import contextlib
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from fitcustom import checks
from fitcustom._engine_state import engine_state
from fitcustom._engine_state import fit_callbacks_of
from fitcustom._keras import compat as _compat
from fitcustom._keras import step_functions


class FitMixin(_compat.BuildHook):
    """`fit()` / `evaluate()` and what runs before their first step
    (part of `fitcustom.TapeModel`)."""

    def _build_before_first_step(self, iterator=None, data_batch=None):
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
        return self.compiled and (
            not _compat.fully_built(self) or self._named_unbuilt()
        )

    def build_from_batch(self, batch):
        """Builds model, metrics and optimizer from one (local) batch.

        Called by `fit()` / `evaluate()` before the first trace, under the
        strategy's scope; validates the batch structure first. A model
        whose sub-models are all built (made with `keras.Input`) counts as
        built from them: it is not called on the batch, so the `call()` of
        a model with a step of its own keeps its natural signature (a
        compiled loss or metric still needs `call(x)`).
        """
        _, y, _ = self.unpack_data(batch)
        self._check_targets(y)
        self._build_from_sublayers()
        _compat.symbolic_build(
            self, batch, strict=_compat.created_under_strategy(self)
        )
        self._build_named_optimizers()

    def _build_from_sublayers(self):
        """Marks the model built when every sub-model is (see
        `build_from_batch`)."""
        layers = _compat.sublayers(self)
        if not self.built and layers and all(lay.built for lay in layers):
            self.built = True

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            step = self._in_step_context(self.train_step)
            self.train_function = self._resumable(
                step_functions.make_step_function(self, step)
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
        engine_state(self).resume_skip = (int(batches_done), metric_values)

    def _resumable(self, function):
        """`function` (a train function) that first skips the batches
        `resume_within_epoch` asked for."""

        def train_function(iterator):
            pending = engine_state(self).resume_skip
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
            engine_state(self).resume_skip = (
                (remaining, None) if remaining else None
            )
            return self.get_metrics_result()

        return train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = step_functions.make_step_function(
                self, self._in_step_context(self.test_step)
            )
        return self.test_function

    def _training_optimizers(self):
        """The optimizers a training step updates (their state is saved
        and restored with the weights)."""
        optimizers = [] if self.optimizer is None else [self.optimizer]
        return optimizers + list(engine_state(self).named_optimizers.values())

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
        if (
            verbose != 0
            and not isinstance(callbacks, keras.callbacks.CallbackList)
            and not any(
                isinstance(c, keras.callbacks.ProgbarLogger)
                for c in callbacks or []
            )
        ):
            # Keras' progress bar, its epoch line without the values that
            # callbacks mark as sparse or constant (`_EpochLine`).
            callbacks = list(callbacks or []) + [_EpochLine()]
        # Seen by fitcustom.BackupAndRestore, which keeps the state of the
        # callbacks beside it (EarlyStopping's wait and best) in a backup.
        engine_state(self).fit_callbacks = list(
            callbacks.callbacks
            if isinstance(callbacks, keras.callbacks.CallbackList)
            else callbacks or []
        )
        _warn_about_keras_backup(engine_state(self).fit_callbacks)
        with _clear_step_errors(self, "fit"):
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
        with _clear_step_errors(self, "evaluate"):
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
            if len(validation_data) == 1 and _compat.has_compiled_loss(self):
                raise ValueError(
                    "validation_data has no targets: received a tuple of "
                    "one element (x only), but compile() was given a "
                    "loss, which needs them. Pass validation_data=(x_val, "
                    "y_val) or (x_val, y_val, sample_weight_val)."
                )
            self._check_input_shapes(validation_data[0], "validation_data x")
            self.check_data(*validation_data[:3])

    def check_evaluate_data(self, x, y, sample_weight):
        """Checks `evaluate()`'s data before any step; see `check_data`."""
        self.check_data(x, y, sample_weight)

    def check_data(self, x, y=None, sample_weight=None):
        """Checks data for this model before any step uses it.

        The engine checks structure: dict or list inputs against the
        model's inputs (keys or count; not for a model with a
        `train_step` of its own), and dict targets against the
        outputs given a loss or metric in `compile()` as dicts. Reads
        only the element spec of a `tf.data.Dataset`. Task models add
        their own checks (a subclass calls `super().check_data(...)`).

        Raises:
            ValueError: Naming the keys or structure received and
                expected.
        """
        checks.check_sample_weight(sample_weight, y)
        checks.check_not_empty(x)
        name = f"{type(self).__name__} {self.name!r}"
        # A step of your own reads its batch as it likes: the data need
        # not be what call() takes.
        graph = None if self._has_own_train_step() else self._graph_model()
        try:
            expected = None if graph is None else graph.input
        except (AttributeError, ValueError):  # an unbuilt network
            expected = None
        if expected is not None:
            checks.check_input_structure(x, expected, name)
            self._check_input_shapes(x, "x")
        targeted = self._targeted_outputs()
        outputs = self._flat_output_names(graph)
        if targeted is not None and outputs:
            checks.check_target_structure(
                x if y is None else y, outputs, targeted, name
            )

    def _flat_output_names(self, graph):
        """The names a dict of targets is keyed by: the output names of a
        model whose outputs are tensors side by side, or `None` for
        nested outputs (`{"a": (y1, y2), ...}`: Keras matches a nested
        structure of targets and losses, left to it) and a subclassed
        model not called yet (it names its outputs only then)."""
        struct = None
        if graph is not None:
            try:
                struct = graph.output
            except (AttributeError, ValueError):
                struct = None
        if isinstance(struct, dict):
            struct = list(struct.values())
        if isinstance(struct, (list, tuple)) and any(
            isinstance(s, (dict, list, tuple)) for s in struct
        ):
            return None
        return getattr(self, "output_names", None)

    def _check_input_shapes(self, x, what):
        """Refuses arrays whose sample shape is not the (functional)
        model's input shape, before any step (a wrong validation width
        would otherwise fail only after the first epoch trained)."""
        graph = None if self._has_own_train_step() else self._graph_model()
        try:
            inputs = [] if graph is None else list(graph.inputs)
        except (AttributeError, ValueError):
            return
        pairs = []
        if len(inputs) == 1 and checks.is_array(x):
            pairs.append((x, inputs[0], what))
        elif isinstance(x, dict):
            by_name = {t.name: t for t in inputs}
            pairs += [
                (value, by_name[key], f"{what}[{key!r}]")
                for key, value in x.items()
                if key in by_name and checks.is_array(value)
            ]
        for value, tensor, label in pairs:
            if not _numeric(value):
                continue  # refused later, with a message about its dtype
            got, expected = tuple(value.shape[1:]), tuple(tensor.shape[1:])
            # Keras adds or drops a last axis of size 1 itself.
            if got + (1,) == expected or got == expected + (1,):
                continue
            checks.check_input_shape(got, expected, label)

    def _has_own_train_step(self):
        """Whether `train_step` is a user's (defined outside fitcustom)."""
        step = type(self).train_step
        return not getattr(step, "__module__", "").startswith("fitcustom.")

    def _targeted_outputs(self):
        """The outputs given a loss or metric by name in `compile()`, or
        `None` when the loss is not a dict (then Keras matches targets
        by position or applies the loss to every output)."""
        loss, metrics = engine_state(self).compiled_by_name
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


@contextlib.contextmanager
def _clear_step_errors(model, method):
    """Turns a step's failure on class ids outside the output's range
    (`check_class_ids`, or TensorFlow's cross-entropy on a CPU), or on a
    `checks.step_check` (a loss term's batch size), into a `ValueError`
    that says what was received and how to fix it."""
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        message = e.message or ""
        text = checks.step_check_message(message)
        if text is not None:
            raise ValueError(text) from None
        found = None
        if checks.CLASS_ID_MARKER in message:
            numbers = re.findall(
                r"\[(-?\d+)\]", message.split(checks.CLASS_ID_MARKER, 1)[1]
            )
            if len(numbers) >= 3:
                low, high, width = map(int, numbers[:3])
                found = (low if low < 0 else high, width)
        else:
            match = re.search(
                r"label value of (-?\d+) which is outside the valid range "
                r"of \[0, (\d+)\)",
                message,
            )
            if match:
                found = (int(match.group(1)), int(match.group(2)))
        if found is None:
            raise
        label, width = found
        raise ValueError(
            f"{type(model).__name__}.{method}() was given a class id outside "
            f"[0, {width}): the model's output has {width} classes. "
            f"Received: the label {label} in a batch (that batch made no "
            "update; the batches before it did). Expected: class ids 0 to "
            f"{width - 1}. Fix the labels (1-based ids need `y - 1`), or "
            f"give the output layer {max(label + 1, width)} units."
        ) from None


class _EpochLine(keras.callbacks.ProgbarLogger):
    """Keras' progress bar (what `fit()` shows by default), whose epoch
    line leaves out what the fit's callbacks mark in an `epoch_line`
    attribute, `{log name: "when_computed" | "first_epoch"}`: a value
    computed on some epochs only (NaN on the others, as `GANQuality`'s
    scores), shown where it was computed, and a constant (its
    real-vs-real baselines), shown on the fit's first epoch. History,
    CSVLogger and TensorBoard still get every value."""

    # As the progress bar Keras adds itself, it does not keep Keras from
    # dispatching batch ends asynchronously (on the backends that do).
    async_safe = True

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first = True

    def on_epoch_end(self, epoch, logs=None):
        marks = {}
        for callback in fit_callbacks_of(self.model):
            marks.update(getattr(callback, "epoch_line", None) or {})
        shown = {}
        for key, value in (logs or {}).items():
            mark = marks.get(key)
            if mark == "first_epoch" and not self._first:
                continue
            if mark == "when_computed" and _is_nan(value):
                continue
            shown[key] = value
        self._first = False
        super().on_epoch_end(epoch, shown)


def _is_nan(value):
    try:
        return bool(np.isnan(np.asarray(value, np.float64)))
    except (TypeError, ValueError):
        return False


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


def _numeric(value):
    try:
        return (
            np.dtype(getattr(value.dtype, "as_numpy_dtype", value.dtype)).kind
            in "biufc"
        )
    except TypeError:
        return False


def _warn_about_keras_backup(callbacks):
    """Warns when Keras' own `BackupAndRestore` is among `callbacks`: it
    trains an interrupted epoch's batches again, silently, where
    `fitcustom.BackupAndRestore` (same arguments) resumes exactly."""
    from fitcustom import checkpoints

    for callback in callbacks:
        if isinstance(
            callback, keras.callbacks.BackupAndRestore
        ) and not isinstance(callback, checkpoints.BackupAndRestore):
            warnings.warn(
                "keras.callbacks.BackupAndRestore resumes an interrupted "
                "epoch from its first batch (the batches already trained "
                "are trained again), rewrites its backup in place (a kill "
                "during the write leaves one that cannot be read) and "
                "saves nothing on a preemption notice. "
                "fitcustom.BackupAndRestore takes the same arguments and "
                "resumes at the exact batch: replace "
                "keras.callbacks.BackupAndRestore(...) with "
                "fitcustom.BackupAndRestore(...).",
                stacklevel=3,
            )
            return
