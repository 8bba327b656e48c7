"""The pieces of a training and test step (a mixin of `TapeModel`):
forward pass, loss and loss terms, tracking, loss scaling, gradients,
the non-finite guard, gradient transforms and the update.

May import: the ground floor, `_keras`, `engine.transforms`,
`engine.step_context`.
"""

import typing
import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from fitcustom import checks
from fitcustom import distribute
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat
from fitcustom.engine import step_context
from fitcustom.engine import transforms as transforms_lib

#: The weights a piece takes (Keras variables), and their gradients
#: (`None` where a weight gets none).
Variables = Sequence[keras.Variable]
Gradients = list[tf.Tensor | None]


class StepPieces:
    """The step pieces `train_step` and `test_step` are made of (part of
    `fitcustom.TapeModel`; see its docstring for the table)."""

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
            engine_state(self).forward_weights = _ForwardWeights(
                self._weights_key(),
                [v for v in self.trainable_weights if _reads(v, read)],
            )
        else:
            y_pred = self.forward(x, training=training)
        if self._loss_only_of_terms():
            # No compiled loss, no layer losses: the terms are the loss
            # (Keras would refuse: "No loss to compute").
            loss = tf.zeros((), tf.float32)
        else:
            loss = _compat.compute_loss(
                self, x, y, y_pred, sample_weight, training
            )
        self._check_loss(loss)
        terms = self._reduced_loss_terms(x, y, y_pred, sample_weight, training)
        for value in terms.values():
            loss = loss + tf.cast(value, loss.dtype)
        # Tracked with the loss (`track_loss`), under the same guard.
        step_context.scratch().terms = terms
        return y_pred, loss

    def _loss_only_of_terms(self):
        """Whether the loss is only the declared loss terms: a model
        compiled without `loss=` (a VAE's reconstruction and KL terms)."""
        return (
            bool(self._loss_term_trackers)
            and not _compat.has_compiled_loss(self)
            and not _compat.overrides_compute_loss(self)
            and not self.losses
        )

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

    def check_class_ids(self, y, y_pred, grads=None):
        """Stops the step when class ids are outside the output's range.

        For a sparse cross-entropy (`"sparse_categorical_crossentropy"`,
        `keras.losses.SparseCategoricalCrossentropy`, a `TapeClassifier`
        given class ids) of an output of `k > 1` classes (each output of
        a dict or list of losses on its own): every label must be in
        `[0, k)` (or the loss's `ignore_class`). A step with
        another label fails before its update, and `fit()` /
        `evaluate()` raise a `ValueError` naming the label and `k`. On a
        CPU TensorFlow's cross-entropy fails on such labels too, inside
        the graph; on a GPU it gives NaN, silently. This guards the data
        that is not scanned before `fit()` (`tf.data`, generators); its
        cost is one min and max of the batch's labels.

        Args:
            y: The batch's targets.
            y_pred: The model's outputs for it.
            grads: The step's gradients, or `None`.

        Returns:
            `grads`, computed only once the check has passed (in a traced
            step nothing else orders the check before the update).
        """
        found = []
        for loss, y_k, y_pred_k in _per_output(self.loss, y, y_pred):
            width = _class_id_width(loss, y_k, y_pred_k)
            if width is None:
                continue
            ids = tf.cast(y_k, tf.int64)
            bad = tf.logical_or(ids < 0, ids >= width)
            ignore = getattr(loss, "ignore_class", None)
            if ignore is not None:
                bad = tf.logical_and(bad, tf.not_equal(ids, int(ignore)))
            shown = tf.where(bad, ids, tf.zeros_like(ids))
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(bad)),
                [
                    checks.CLASS_ID_MARKER,
                    tf.reduce_min(shown),
                    tf.reduce_max(shown),
                    tf.constant(width, tf.int64),
                ],
            )
            if check is not None:  # None when it ran eagerly and passed
                found.append(check)
        if grads is None or not found:
            return grads
        with tf.control_dependencies(found):
            return [None if g is None else tf.identity(g) for g in grads]

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
        scratch = step_context.scratch()
        terms, scratch.terms = scratch.terms, {}
        trackers = [(_compat.loss_tracker(self), loss)] + [
            (self._loss_term_trackers[name], value)
            for name, value in terms.items()
        ]
        batch_size = tf.shape(step_context.first_tensor(x))[0]
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

        Called by a step of your own (not through `minimize`), it adds
        `loss` (divided by the number of replicas, as `minimize`'s terms
        are) to the step's `loss` log; several updates of one optimizer
        in a step count with their mean.

        Returns:
            The guard's verdict (`None` without `skip_nonfinite`).
        """
        grads = self.compute_gradients(tape, scaled_loss, variables)
        finite = None
        if self._skip_nonfinite:
            finite = self.check_finite(loss, grads, optimizer)
        self._transform_and_apply(grads, variables, optimizer, finite)
        context = step_context.current()
        if context is not None and not context.minimizing:
            context.used = True
            context.verdicts.append(finite)
            key = ("update", id(optimizer or self.optimizer))
            context.add(key, tf.cast(loss, tf.float32))
        return finite

    def _transform_and_apply(self, grads, variables, optimizer, finite):
        """The end of every update: `transform_gradients`, then
        `apply_gradients` under the guard's verdict."""
        grads = self.transform_gradients(grads, variables, optimizer)
        self.apply_gradients(grads, variables, optimizer, finite)

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
        scale = distribute.loss_scale(optimizer)
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
        if distribute.loss_scale(optimizer) is None:
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
        distribute.apply_if(finite, optimizer, grads, variables)

    def train_step(self, data):
        x, y, sample_weight = self.unpack_data(data)
        self._check_targets(y)
        y_pred, loss, grads = self.loss_and_gradients(x, y, sample_weight)
        grads = self.check_class_ids(y, y_pred, grads)  # before the update
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
        pending = step_context.scratch().terms
        check = self._check_untrained()
        with tf.GradientTape(persistent=check) as tape:
            y_pred, loss = self.forward_and_loss(x, y, sample_weight, True)
            if not track:  # the terms of the pass that is tracked stay
                step_context.scratch().terms = pending
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
            engine_state(self).untrained_checked = True
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
        cached = engine_state(self).forward_weights
        if cached is None or cached.key != self._weights_key():
            forward = list(self.trainable_weights)  # no forward pass yet
        else:
            forward = list(cached.read)
        return list(self.trained_weights(forward))

    def _weights_key(self):
        return tuple(id(v) for v in self.trainable_weights)

    def _probe_forward(self):
        # Traced steps look at every trace; eager ones once while the
        # weights stay the same (a probing tape doubles eager work).
        if tf.inside_function():
            return True
        cached = engine_state(self).forward_weights
        return cached is None or cached.key != self._weights_key()

    def _check_untrained(self):
        return tf.inside_function() or not engine_state(self).untrained_checked

    def _warn_untrained(self, untrained, grads):
        reached = [v.path for v, g in zip(untrained, grads) if g is not None]
        if not reached or engine_state(self).warned_untrained:
            return
        engine_state(self).warned_untrained = True
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
        self._transform_and_apply(grads, self.step_weights(), None, finite)
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
        self.check_class_ids(y, y_pred)
        self.track_loss(loss, x)
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        # The gradient trackers describe training steps only.
        train_only = (self._gradient_norm_tracker, self._nonfinite_tracker)
        names = {m.name for m in train_only}
        return {k: v for k, v in logs.items() if k not in names}

    def predict_step(self, data):
        x, _, _ = self.unpack_data(data)
        return self.forward(x, training=False)


def _per_output(loss, y, y_pred):
    """`(loss, y, y_pred)` of each output that has a loss of its own: a
    dict of losses keyed like dict targets and outputs, a list aligned
    with lists of them, or the one loss of one output."""
    if isinstance(loss, dict):
        if isinstance(y, dict) and isinstance(y_pred, dict):
            return [
                (loss[k], y[k], y_pred[k])
                for k in loss
                if k in y and k in y_pred and loss[k] is not None
            ]
        return []
    if isinstance(loss, (list, tuple)):
        if (
            isinstance(y, (list, tuple))
            and isinstance(y_pred, (list, tuple))
            and len(loss) == len(y) == len(y_pred)
        ):
            return [t for t in zip(loss, y, y_pred) if t[0] is not None]
        return []
    return [(loss, y, y_pred)]


class _ForwardWeights(typing.NamedTuple):
    """The trainable weights a training forward pass read (`read`), for
    the model's trainable weights of then (`key`: their ids)."""

    key: tuple
    read: list


def _class_id_width(loss, y, y_pred):
    """The number of classes `k` when `y` holds class ids for `y_pred`'s
    `k` scores under a sparse cross-entropy, else `None`."""
    if not (tf.is_tensor(y) and tf.is_tensor(y_pred)):
        return None
    width = y_pred.shape[-1] if y_pred.shape.rank else None
    if width is None or width < 2 or y.shape.rank is None:
        return None
    ids = y.shape.rank == y_pred.shape.rank - 1 or (
        y.shape.rank == y_pred.shape.rank and y.shape[-1] == 1
    )
    if not ids:
        return None
    if isinstance(loss, str):
        sparse = loss in ("sparse_categorical_crossentropy",)
    elif isinstance(loss, keras.losses.Loss):
        sparse = isinstance(
            loss, keras.losses.SparseCategoricalCrossentropy
        ) or getattr(loss, "takes_class_ids", False)
    else:
        sparse = loss is keras.losses.sparse_categorical_crossentropy
    if not sparse or not (y.dtype.is_integer or y.dtype.is_floating):
        return None
    return int(width)


def _reads(variable, read):
    """Whether a watched set (ids from `tape.watched_variables()`)
    holds the Keras `variable` (it watches the backend variable)."""
    return id(variable) in read or id(variable.value) in read
