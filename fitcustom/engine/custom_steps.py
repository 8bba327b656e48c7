"""The tools of a hand-written step (a mixin of `TapeModel`): named
optimizers, `minimize` (one call per update: reduction, replica division,
loss scaling, guard, transforms, update, logs), `log_loss` / `log_mean`
(values logged as epoch means, trackers created by the engine), and the
step context that puts what a step minimised into the `loss` log. The
checks of the terms are in `term_checks`; EMA copies in `ema`.

May import: the ground floor, `_keras`, `engine.step_context`,
`engine.term_checks`.
"""

import types
import typing
from collections.abc import Mapping

import keras
import tensorflow as tf

from fitcustom import distribute
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat
from fitcustom.engine import step_context
from fitcustom.engine import term_checks


class _Reduced(typing.NamedTuple):
    """An update's loss: each term's per-replica value (unweighted, as
    logged) and batch size, keyed by name or by a (kind, optimizer) pair
    for the unnamed loss and the regularization; each term as it enters
    the loss (weighted); and their sum."""

    values: dict
    sizes: dict
    weighted: dict
    total: tf.Tensor
    checks: list


class CustomSteps:
    """What a `train_step` / `test_step` of your own calls (part of
    `fitcustom.TapeModel`)."""

    # ------------------------------------------------------------------
    # Named optimizers
    # ------------------------------------------------------------------

    @property
    def optimizers(self) -> Mapping[str, keras.optimizers.Optimizer]:
        """The optimizers given to `compile()` by name (read only; empty
        when `compile()` got one optimizer)."""
        return types.MappingProxyType(engine_state(self).named_optimizers)

    def get_optimizer(self, name: str | None = None):
        """The optimizer compiled as `name` (`None`: the model's own
        `optimizer`, or the only named one).

        Raises:
            ValueError: No optimizer of that name was compiled.
        """
        named = engine_state(self).named_optimizers
        if name is None:
            if self.optimizer is not None:
                return self.optimizer
            if len(named) == 1:
                return next(iter(named.values()))
            raise ValueError(
                f"{type(self).__name__} has {len(named)} named optimizers "
                f"({sorted(named)}), so an update must say which one it "
                "uses. Received: optimizer=None. Pass optimizer='NAME'."
            )
        if not isinstance(name, str) or name not in named:
            raise ValueError(
                f"{type(self).__name__} has no optimizer named {name!r}. "
                f"Received: optimizer={name!r}. Expected one of the names "
                f"given to compile(optimizer={{...}}): {sorted(named)}."
            )
        return named[name]

    def optimizer_variables(self, name: str) -> list | None:
        """The weights the optimizer named `name` trains, so that it is
        built before the first step (needed under a distribution strategy)
        and restored with its state when a saved model is loaded.

        Override it when an optimizer trains weights of several
        sub-models. Defaults to the trainable weights of the model's
        attribute called `name` when it is a layer or model
        (`compile(optimizer={"generator": ...})` trains `self.generator`),
        else `None` (unknown: the optimizer is built at its first update,
        which works on one device).
        """
        network = self._sub_model(name)
        return None if network is None else list(network.trainable_weights)

    def _sub_model(self, name):
        """The model's layer or model called `name` (an attribute, or a
        property such as TapeGAN's), or `None`: what a named optimizer
        trains by default."""
        network = self.__dict__.get(name)
        if network is None and getattr(type(self), name, None) is not None:
            network = getattr(self, name)
        return network if isinstance(network, keras.Layer) else None

    def _build_named_optimizers(self):
        """Builds the named optimizers on the weights they train, and the
        EMA copies of sub-models built since `track_ema`."""
        for name, optimizer in engine_state(self).named_optimizers.items():
            if optimizer.built:
                continue
            variables = self.optimizer_variables(name)
            if variables:
                optimizer.build(variables)
        self._build_emas()

    def _named_unbuilt(self):
        return any(
            not o.built and self.optimizer_variables(n)
            for n, o in engine_state(self).named_optimizers.items()
        )

    # ------------------------------------------------------------------
    # Updates and logs
    # ------------------------------------------------------------------

    def minimize(
        self,
        tape: tf.GradientTape,
        terms,
        variables=None,
        optimizer: str | None = None,
        sample_weight=None,
        loss_weights: Mapping[str, float] | None = None,
        batch_size=None,
    ) -> tf.Tensor:
        """One update of a hand-written step, done the way `fit()` does it.

        Each term (one value per sample, any further axes) is averaged to
        one value per sample, then to the sample-weighted mean over the
        global batch (each replica's mean divided by the number of
        replicas, once); the terms are added, with the regularization
        losses of the trained network; under `mixed_float16` the sum is
        loss-scaled for this optimizer; the gradients of `variables` are
        checked (`skip_nonfinite`), transformed (`gradient_transforms`,
        on the replica-summed gradients' scale) and applied. Each named
        term is logged under its name as an epoch mean (so are the terms
        of `log_loss` in `test_step`, as `val_NAME`), EMA copies tied to
        this optimizer follow, and the step's `loss` log is the sum of
        what its updates minimised.

        Call it inside the tape's `with` block, after computing the
        terms there (a term computed outside is not recorded: refused);
        with a persistent tape, once per optimizer.

        Args:
            tape: The `tf.GradientTape` that recorded the forward pass.
            terms: A dict `{name: per-sample values}` (each logged under
                its name) or one tensor of per-sample values. Leading
                axis: the batch (all terms the same size).
            variables: The weights to update. Defaults to
                `optimizer_variables(optimizer)` for a named optimizer,
                else the model's trainable weights.
            optimizer: The name given to `compile(optimizer={...})`, or
                `None` for the model's optimizer.
            sample_weight: Optional weights, one per sample.
            loss_weights: Optional `{name: factor}` for named terms: the
                update minimises `factor * term` (e.g. a gradient
                penalty's weight) and the log keeps the term unweighted,
                as `compile(loss_weights=...)` does for outputs.
            batch_size: The number of samples the terms are of (this
                replica's), when an update uses a part of the batch or
                samples of its own (a discriminator updated on each of
                `n` slices, generated images). Defaults to the batch:
                each term's first axis must be the first axis of one of
                the batch's tensors (a term that lost its batch axis, a
                mean over the batch, is refused).

        Returns:
            The minimised loss (this replica's batch mean, as logged).

        Raises:
            ValueError: A term is not one value per sample of the batch
                (or of `batch_size`), terms or `sample_weight` differ in
                size, a term is not a float: before any weight changes
                (from `fit()` when only the running step can tell).
        """
        opt = self.get_optimizer(optimizer)
        variables = self._update_variables(variables, optimizer, opt)
        if not opt.built and distribute.num_replicas() > 1:
            raise ValueError(
                f"The optimizer {optimizer!r} was not built before the "
                "first step, which a distribution strategy needs. fitcustom "
                "builds a named optimizer on optimizer_variables(name): the "
                "weights of the sub-model of the same name. Received: no "
                f"sub-model called {optimizer!r}. Override "
                "optimizer_variables() to return the weights it trains."
            )
        if not _compat.tape_is_recording(tape):
            raise ValueError(
                "minimize() must be called inside the tape's `with` block, "
                "with the terms computed there: a term computed outside "
                "it is not recorded and would give no gradient, silently. "
                "Received: a tape that is not recording. Write `with "
                "tf.GradientTape() as tape: ...; self.minimize(tape, "
                "terms)` (use persistent=True for several updates)."
            )
        reduced = self._loss_of(
            terms, sample_weight, optimizer, loss_weights, batch_size, variables
        )
        loss = reduced.total
        scaled = self.scale_loss(loss, opt)
        context = self._require_context("minimize()")
        with tape.stop_recording(), tf.control_dependencies(reduced.checks):
            # The guarded update (`update`, also a piece of its own).
            context.minimizing = True
            try:
                finite = self.update(tape, scaled, loss, variables, opt)
            finally:
                context.minimizing = False
            if finite is not None:
                self.count_nonfinite([finite])
            self.follow_emas(optimizer, finite)
            self._record(reduced, finite)
        return distribute.unscale_loss_for_replicas(loss)

    def log_loss(
        self,
        terms,
        sample_weight=None,
        optimizer=None,
        loss_weights=None,
        batch_size=None,
    ):
        """Logs loss terms as `minimize` does, without an update: for
        `test_step` (logged as `val_NAME` and `val_loss` in `fit()`), or
        for a loss that a step reports but does not minimise.

        Args:
            terms: As in `minimize`.
            sample_weight: As in `minimize`.
            optimizer: The regularization losses added are those
                `minimize(optimizer=...)` adds. Defaults to `None`.
            loss_weights: As in `minimize`.
            batch_size: As in `minimize`.

        Returns:
            The loss (this replica's batch mean, as logged).
        """
        reduced = self._loss_of(
            terms, sample_weight, optimizer, loss_weights, batch_size
        )
        with tf.control_dependencies(reduced.checks):
            reduced = reduced._replace(
                values={k: tf.identity(v) for k, v in reduced.values.items()}
            )
        self._record(reduced, None)
        return distribute.unscale_loss_for_replicas(reduced.total)

    def log_mean(self, name: str, values) -> None:
        """Logs `values` under `name`: its epoch mean over all samples of
        all replicas, in History, CSVLogger, TensorBoard and the progress
        bar. Call it in a step.

        Args:
            name: The log's name (an identifier).
            values: One value per sample (further axes are averaged), or
                a scalar, counted once per sample of this replica's batch.
        """
        context = self._require_context("log_mean")
        values = self._float("log_mean", name, values)
        if values.shape.rank:
            count = tf.shape(values)[0]
            value = tf.math.divide_no_nan(
                tf.reduce_sum(term_checks.per_sample(values)),
                tf.cast(count, tf.float32),
            )
        else:
            count, value = context.batch_size, values
        self._log_tracker(name).update_state(value, sample_weight=count)
        context.logged.add(name)

    #: The seed of `normal_noise` (set it in `__init__` to draw other
    #: noise).
    noise_seed: int = 0

    def normal_noise(self, shape, stream: int = 0, dtype=None) -> tf.Tensor:
        """Standard normal noise for a step, one row per sample of this
        replica's batch.

        Drawn from a stateless seed made of `noise_seed`, the step (the
        first optimizer's `iterations`) and `stream`, and keyed to the
        sample's place in the global batch: one device and several
        replicas draw the same noise for the same sample, and a resumed
        run the noise of the uninterrupted one.

        Args:
            shape: `(batch_size, ...)`, e.g. `tf.shape(codes)`.
            stream: Tells apart two draws in one step. Defaults to 0.
            dtype: Defaults to the model's compute dtype (float16 under
                `mixed_float16`); drawn in float32 either way.

        Returns:
            A tensor of `shape`.
        """
        optimizers = self._training_optimizers()
        step = optimizers[0].iterations if optimizers else 0
        seed = tf.stack(
            [
                tf.constant(int(self.noise_seed), tf.int64),
                tf.cast(step, tf.int64),
            ]
        )
        seed = tf.random.experimental.stateless_fold_in(seed, stream)
        noise = distribute.normal_per_sample(shape, seed)
        return tf.cast(noise, dtype or self.compute_dtype)

    def _update_variables(self, variables, name, optimizer):
        if variables is None:
            if name is not None:
                variables = self.optimizer_variables(name)
                if variables is None:
                    raise ValueError(
                        f"minimize(optimizer={name!r}) needs `variables=`: "
                        f"{type(self).__name__} has no sub-model called "
                        f"{name!r} whose weights that optimizer trains. "
                        "Received: variables=None. Pass the weights to "
                        "update, or override optimizer_variables()."
                    )
            else:
                variables = self.trainable_weights
        variables = list(variables)
        bad = [v for v in variables if not isinstance(v, keras.Variable)]
        if not variables or bad:
            raise ValueError(
                "minimize() updates Keras variables (e.g. "
                "self.generator.trainable_weights). Received: "
                + ("no variables" if not variables else f"{bad[0]!r}")
                + "."
            )
        unknown = _compat.unknown_to_optimizer(optimizer, variables)
        if unknown:
            raise ValueError(
                f"minimize(optimizer={name!r}) was given {len(unknown)} "
                "weights that optimizer was not built for: "
                + ", ".join(v.path for v in unknown[:4])
                + ". Expected the weights it updates at every step (see "
                "optimizer_variables()). Give each set of weights its own "
                "optimizer. If they belong to a sub-model that the step "
                "builds (made in __init__ without an input shape), build "
                "it before fit(): keras.Sequential([keras.Input(shape), "
                "...]) or self.NAME.build(input_shape)."
            )
        return variables

    def _loss_of(
        self,
        terms,
        sample_weight,
        optimizer,
        loss_weights=None,
        batch_size=None,
        variables=None,
    ):
        """The terms reduced (`_Reduced`): each term's per-replica mean
        (divided by the replica count) and batch size, and their weighted
        sum with the regularization losses of what `optimizer` trains;
        the terms' sizes checked against the batch (or `batch_size`)."""
        if not isinstance(terms, dict):
            terms = {("loss", optimizer): terms}
        if not terms:
            raise ValueError(
                "A loss needs at least one term. Received: terms={}."
            )
        factors = term_checks.checked_loss_weights(loss_weights, terms)
        weights = sample_weight
        if weights is not None:
            weights = tf.convert_to_tensor(weights)
            if weights.shape.rank != 1:
                raise ValueError(
                    "`sample_weight` needs one weight per sample. "
                    f"Received: shape {tuple(weights.shape)}."
                )
        sizes_check = term_checks.SizeChecks(step_context.current(), batch_size)
        values, sizes = {}, {}
        for key, term in terms.items():
            label = key if isinstance(key, str) else "the loss"
            term = self._float("minimize", label, term)
            if term.shape.rank == 0:
                raise ValueError(
                    f"Loss term {label!r} must give one value per sample "
                    "(the engine averages over the batch and the "
                    "replicas). Received: a scalar, already reduced. "
                    "Return the unreduced values, e.g. keras.losses."
                    "MeanSquaredError(reduction=None)(y, y_pred), or raw "
                    "ops without the final mean."
                )
            sizes_check.term(label, term)
            if weights is not None and not values:
                sizes_check.sample_weight(weights)
            if sizes_check.checks:  # the reduction runs once they pass
                with tf.control_dependencies(sizes_check.checks):
                    term = tf.identity(term)
                    if weights is not None:
                        weights = tf.identity(weights)
            values[key] = distribute.mean_loss(
                term_checks.per_sample(term), weights
            )
            sizes[key] = tf.shape(term)[0]
        losses = self._layer_losses(optimizer, variables)
        if losses:
            key = ("regularization", optimizer)
            values[key] = distribute.scale_loss_for_replicas(
                tf.add_n([tf.cast(v, tf.float32) for v in losses])
            )
            sizes[key] = next(iter(sizes.values()))
        weighted = {
            key: value * factors[key] if key in factors else value
            for key, value in values.items()
        }
        total = tf.add_n(list(weighted.values()))
        return _Reduced(values, sizes, weighted, total, sizes_check.checks)

    def _layer_losses(self, optimizer, variables=None):
        """The regularization losses (`add_loss`, weight regularizers) of
        what an update trains: the model's for its own optimizer; for a
        named one, those of each sub-model held by the model whose
        weights the update trains (`variables`, by default
        `optimizer_variables(name)`), or of the sub-model called like
        the optimizer."""
        if optimizer is None:
            return list(self.losses)
        if variables is None:
            variables = self.optimizer_variables(optimizer)
        if variables is None:
            network = self._sub_model(optimizer)
            return [] if network is None else list(network.losses)
        trained = {id(v) for v in variables}
        losses = []
        for layer in _compat.top_layers(self):
            if any(id(w) in trained for w in layer.trainable_weights):
                losses.extend(layer.losses)
        return losses

    def _record(self, reduced, finite):
        context = self._require_context("minimize() / log_loss()")
        context.verdicts.append(finite)
        for key, value in reduced.values.items():
            context.add(key, reduced.weighted[key])
            if isinstance(key, str):  # a named term: logged
                context.logged.add(key)
                self.track_mean(
                    self._log_tracker(key), value, reduced.sizes[key], finite
                )

    def _float(self, caller, name, values):
        values = tf.convert_to_tensor(values)
        if not values.dtype.is_floating:
            raise ValueError(
                f"{caller}() takes float values. Received: {name!r} of "
                f"dtype {values.dtype.name}. Cast it, e.g. "
                "tf.cast(values, 'float32')."
            )
        return tf.cast(values, tf.float32)

    def _require_context(self, caller):
        context = step_context.current()
        if context is None:
            raise ValueError(
                f"{caller} logs values of a training or test step. "
                "Received: a call outside fit() / evaluate(). Call it in "
                "train_step() or test_step()."
            )
        context.used = True
        return context

    def _log_tracker(self, name):
        """The `Mean` that logs `name`, created at its first use (in the
        first trace of a step, under the model's strategy)."""
        trackers = engine_state(self).log_trackers
        if name in trackers:
            return trackers[name]
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                "A logged value's name must be an identifier such as "
                f"'kl_loss'. Received: name={name!r}."
            )
        taken = {m.name for m in self.metrics if m not in trackers.values()}
        if name in taken or name == "loss":
            raise ValueError(
                f"{name!r} is already logged by the model (its loss or a "
                f"compiled metric: {sorted(taken | {'loss'})}). Received: "
                f"a term or value named {name!r}. Give it another name."
            )
        strategy = self.distribute_strategy

        def create(*_):
            with tf.init_scope(), strategy.scope():
                return keras.metrics.Mean(name=name)

        ctx = tf.distribute.get_replica_context()
        if ctx is not None and strategy.num_replicas_in_sync > 1:
            tracker = ctx.merge_call(create)
        else:
            tracker = create()
        trackers.setdefault(name, tracker)
        return trackers[name]

    def create_logs(self, names):
        """Creates the trackers of logged values by name (a restore
        calls it before putting back their running values)."""
        for name in names:
            if name not in engine_state(self).log_trackers:
                self._log_tracker(name)

    def _in_step_context(self, step):
        """`step` with a context that collects what it minimised: the
        `loss` log becomes their sum, and the logs are the metrics'."""

        def run(data):
            context, logs = self._run_in_context(step, data, data)
            if not context.used:
                return logs
            # The values this step logs (a training term that a test step
            # does not log is no `val_` 0.0).
            others = set(engine_state(self).log_trackers) - (context.logged)
            results = {
                k: v
                for k, v in self.get_metrics_result().items()
                if k not in others
            }
            for key, value in (logs or {}).items():
                results.setdefault(key, value)
            return results

        return run

    def _note_logged(self, names):
        """Marks `names` as logged by the running step (by a part of it
        run in a context of its own)."""
        context = self._require_context("a step")
        context.logged.update(names)

    def _run_in_context(self, fn, data, *args):
        """`(context, fn(*args))`, with `fn` run in a step context of its
        own whose batch is `data`; what it minimised is logged as `loss`
        before returning. The whole step runs so; so does a part of it
        under a `tf.cond` (`distribute.run_if`), whose values cannot
        leave the branch."""
        context = step_context.StepContext(data)
        stack = step_context.stack()
        stack.append(context)
        try:
            out = fn(*args)
        finally:
            stack.pop()
        loss = context.loss() if context.used else None
        if loss is not None:
            verdicts = [v for v in context.verdicts if v is not None]
            finite = None
            if verdicts:
                finite = tf.reduce_all(tf.stack(verdicts))
            self.track_mean(
                _compat.loss_tracker(self), loss, context.batch_size, finite
            )
        return context, out
