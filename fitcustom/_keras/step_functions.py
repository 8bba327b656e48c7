"""The compiled functions that run a model's steps in `fit()` and
`evaluate()`.

Keras builds one from a model's `train_step` (a `tf.function` around the
step under the distribution strategy); `make_step_function` builds the
same from the same pieces, with two changes measured to make a custom
step as fast as the built-in one (see `_one_step_function` and
`_multi_step_function`), and a fix for multi-worker logs. Keras' own
function stays the fallback for what these do not handle.

May import: `_keras.compat`.
"""

import tensorflow as tf

from fitcustom._keras import compat as _compat


def make_step_function(model, step):
    """Keras' compiled step function for `step`, multi-worker safe.

    Under multi-worker, Keras 3.15's `reduce_per_replica(..., "auto")` calls
    `strategy.reduce("MEAN", v, axis=0)` on the step's logs, which fails on
    scalars: each log value is then given shape `[1]` (the reduction returns
    a scalar again). Uses the private `Trainer._make_function`.
    """
    if _compat.in_multi_worker_mode(model.distribute_strategy):
        _compat.check_keras_version("Multi-worker training", strict=True)
        inner = step

        def step(data):
            logs = inner(data)
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    if model.run_eagerly:
        return _compat.keras_step_function(model, step)
    if model.steps_per_execution != 1:
        return _multi_step_function(model, step)
    return _one_step_function(model, step)


def _one_step_function(model, step):
    """Keras' step function for `steps_per_execution=1`, with the batch
    fetched outside the compiled step.

    Keras 3.15 passes the iterator into its `tf.function`, reads the batch
    there (`iterator.get_next()` in the graph) and wraps every step's logs
    in a `tf.experimental.Optional` that it unpacks with two eager ops per
    step. Here the batch is read eagerly (as a hand-written loop does) and
    the compiled step receives tensors, and its logs come back directly.
    Measured on the benchmark's DCGAN (2-core CPU, 7 paired rounds, CPU
    time relative to the hand-written loop): the step with the batch read
    inside its graph 1.043-1.051, the same step fed the batch 1.016; most
    of the difference is the static batch shape the fed step is traced
    with. Every batch shape gets a graph traced for that static shape (a
    short last batch its own), up to `_MAX_CONCRETE_FUNCTIONS` shapes;
    beyond that, a `tf.function` with relaxed shapes (`reduce_retracing`)
    takes the rest. Static shapes matter for the numbers too: Keras logs
    each output's loss (`y1_loss` of a model with several outputs) with the
    batch's *static* size as its weight (`CompileLoss`), so a graph traced
    for an unknown batch size averages those logs over batches instead of
    samples (wrong with a short last batch; built-in `fit()` in graph mode
    does that, its eager mode does not). Each step then calls the graph
    traced for its input types directly (a concrete function), without
    `tf.function`'s per-call argument binding. At the end of the data
    `get_next()` raises `OutOfRangeError`, which Keras' epoch iterator
    turns into the end of the epoch (`catch_stop_iteration`), as before.
    The per-step body is Keras': the step under `strategy.run`, logs
    reduced by the private `reduce_per_replica`, in a `tf.function` with
    the model's `jit_compile`.
    """
    reduce_per_replica = _compat.keras_reduce_per_replica()
    if reduce_per_replica is None:
        return _compat.keras_step_function(model, step)
    strategy = model.distribute_strategy

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        outputs = strategy.run(step, args=(data,))
        return reduce_per_replica(outputs, strategy, reduction="auto")

    # One graph per input shape, and one for any shape beyond those.
    static_step = tf.function(one_step_on_data, jit_compile=model.jit_compile)
    relaxed_step = tf.function(
        one_step_on_data, reduce_retracing=True, jit_compile=model.jit_compile
    )
    iterator_types = (tf.data.Iterator, tf.distribute.DistributedIterator)
    concrete_functions = {}
    traced_keys = set()

    def run(data, element_spec):
        # Calling the traced graph for this batch's exact input types skips
        # `tf.function`'s argument binding and cache lookup: 290 vs 170 us
        # per call on this project's 2-core CPU, per training step. The key
        # is the dataset's element spec (structure and dtypes) and every
        # input's shape, so a batch of another shape or structure gets its
        # own graph.
        data = _compat.optionals_to_none(data)
        flat = [t for t in tf.nest.flatten(data) if t is not None]
        key = (_compat.structure_key(element_spec), _shapes(flat))
        if not all(isinstance(t, tf.Tensor) for t in flat):
            # Per-replica values (a distribution strategy), ragged or
            # sparse inputs: through the `tf.function` itself.
            if key in traced_keys or len(traced_keys) < (
                _MAX_CONCRETE_FUNCTIONS
            ):
                traced_keys.add(key)
                return static_step(data)
            return relaxed_step(data)
        concrete = concrete_functions.get(key)
        if concrete is None:
            if len(concrete_functions) >= _MAX_CONCRETE_FUNCTIONS:
                return relaxed_step(data)
            concrete = static_step.get_concrete_function(data)
            concrete_functions[key] = concrete
        return concrete(data)

    def function(iterator):
        if isinstance(iterator, iterator_types):
            return run(iterator.get_next(), iterator.element_spec)
        for data in iterator:  # a Python iterator of batches: one step
            return relaxed_step(_compat.optionals_to_none(data))
        raise StopIteration

    return function


def _shapes(flat):
    """The static shapes of tensors, of each replica's part of per-replica
    values."""
    shapes = []
    for t in flat:
        if isinstance(t, tf.distribute.DistributedValues):
            shapes.append(tuple(tuple(v.shape) for v in t.values))
        else:
            shapes.append(tuple(t.shape))
    return tuple(shapes)


# Distinct input shapes whose graphs a step function calls directly; data
# whose shapes keep changing goes through `tf.function` beyond this.
_MAX_CONCRETE_FUNCTIONS = 8


def _multi_step_function(model, step):
    """Keras' step function for `steps_per_execution > 1`, with the static
    batch shape kept inside the multi-step loop.

    Keras 3.15 runs its `steps_per_execution` steps in a `tf.while_loop`
    that reads every batch with `get_next_as_optional()`, whose value has
    the dataset's shape: an unknown batch dimension (a dataset batched
    without `drop_remainder`), so the step is traced for any batch size.
    Measured on the benchmark's DCGAN (2-core CPU, 2 builds x 7 paired
    rounds, 50 steps per call, time relative to a hand-written loop):
    0.972 / 0.994 with the unknown batch dimension, 0.934 / 0.951 with
    the batch's static shape. Here the first batch of a call is read
    eagerly and the loop runs the graph traced for its shapes: it steps
    on that batch, then on each next batch of the same shapes (given
    those shapes statically), up to `steps_per_execution` steps. A batch
    of other shapes (the short last one, or data whose shapes vary) ends
    the loop and starts the next loop of the same call, with the graph
    traced for its shapes, so a call still runs up to
    `steps_per_execution` steps and returns the last step's logs, as
    Keras' does. As for one step per call, each shape of a call's first
    batch gets its own graph, traced for that static shape, which each
    call calls directly (at most 8 kept; beyond that, a `tf.function`
    with relaxed shapes). The step is traced twice in the
    graph (the call's first batch, then the loop's). Under a distribution
    strategy, whose iterators Keras 3.15's multi-step loop cannot run
    ("You must feed a value for placeholder tensor"), a call runs its
    steps one by one with the one-step function; ragged or sparse
    elements and Python iterators keep Keras' own function. The per-step
    body is Keras': the step under `strategy.run`, logs reduced by the
    private `reduce_per_replica`, compiled with the model's `jit_compile`.
    """
    keras_function = _compat.keras_step_function(model, step)
    reduce_per_replica = _compat.keras_reduce_per_replica()
    if reduce_per_replica is None:
        return keras_function
    strategy = model.distribute_strategy
    steps = int(model.steps_per_execution)

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        outputs = strategy.run(step, args=(data,))
        return reduce_per_replica(outputs, strategy, reduction="auto")

    if model.jit_compile:
        one_step_on_data = tf.function(one_step_on_data, jit_compile=True)

    @tf.autograph.experimental.do_not_convert
    def steps_on_iterator(first, iterator, remaining):
        # `first` has its static shape (a traced graph per shape); every
        # next batch of the same shapes is given that shape.
        first_leaves = tf.nest.flatten(first)
        first_shapes = [tf.shape(t) for t in first_leaves]
        empty = tf.experimental.Optional.empty(iterator.element_spec)

        def fetch(done):
            return tf.cond(
                done < remaining, iterator.get_next_as_optional, lambda: empty
            )

        def same_shapes(optional):
            def compare():
                leaves = tf.nest.flatten(optional.get_value())
                return tf.reduce_all(
                    [
                        tf.reduce_all(tf.equal(tf.shape(t), shape))
                        for t, shape in zip(leaves, first_shapes)
                    ]
                )

            return tf.cond(
                optional.has_value(), compare, lambda: tf.constant(False)
            )

        def body(done, logs, optional):
            data = optional.get_value()
            for t, like in zip(tf.nest.flatten(data), first_leaves):
                t.set_shape(like.shape)
            return done + 1, one_step_on_data(data), fetch(done + 1)

        done = tf.constant(1)
        logs = one_step_on_data(first)
        done, logs, following = tf.while_loop(
            lambda done, logs, optional: same_shapes(optional),
            body,
            (done, logs, fetch(done)),
        )
        # `following` holds a batch of other shapes, or nothing (the data
        # or this call's steps are done).
        return logs, done, following

    # One graph per shape of a call's first batch, and one for any shape
    # beyond those (see `_one_step_function`).
    relaxed_steps = tf.function(steps_on_iterator, reduce_retracing=True)
    steps_on_iterator = tf.function(steps_on_iterator)
    concrete_functions = {}
    remaining_constants = {}

    def run(first, iterator, remaining):
        key = (
            _compat.structure_key(iterator.element_spec),
            tuple(tuple(t.shape) for t in tf.nest.flatten(first)),
        )
        remaining_t = remaining_constants.get(remaining)
        if remaining_t is None:
            remaining_t = tf.constant(remaining)
            remaining_constants[remaining] = remaining_t
        concrete = concrete_functions.get(key)
        if concrete is None:
            if len(concrete_functions) >= _MAX_CONCRETE_FUNCTIONS:
                return relaxed_steps(first, iterator, remaining_t)
            concrete = steps_on_iterator.get_concrete_function(
                first, iterator, remaining_t
            )
            concrete_functions[key] = concrete
        return concrete(first, iterator, remaining_t)

    def eligible(iterator):
        if not isinstance(iterator, tf.data.Iterator) or isinstance(
            iterator, tf.distribute.DistributedIterator
        ):
            return False
        specs = tf.nest.flatten(iterator.element_spec)
        return all(
            type(spec) is tf.TensorSpec and spec.shape.rank is not None
            for spec in specs
        )

    distributed_step = None

    def distributed_steps(iterator):
        # Keras 3.15's multi-step loop fails under MirroredStrategy ("You
        # must feed a value for placeholder tensor", for any input): the
        # call runs its steps one at a time with the one-step function.
        nonlocal distributed_step
        if distributed_step is None:
            distributed_step = _one_step_function(model, step)
        logs = distributed_step(iterator)  # OutOfRangeError: epoch done
        for _ in range(steps - 1):
            try:
                logs = distributed_step(iterator)
            except (tf.errors.OutOfRangeError, StopIteration):
                break
        return logs

    def function(iterator):
        if isinstance(iterator, tf.distribute.DistributedIterator):
            return distributed_steps(iterator)
        if not eligible(iterator):
            return keras_function(iterator)
        # At the end of the data this raises `OutOfRangeError`, which
        # Keras' epoch iterator turns into the end of the epoch.
        first = iterator.get_next()
        remaining = steps
        while True:
            logs, done, following = run(first, iterator, remaining)
            if not following.has_value():
                return logs
            remaining -= int(done)
            first = following.get_value()

    return function
