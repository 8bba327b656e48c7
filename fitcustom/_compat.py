"""The one place where fitcustom touches Keras internals.

Everything here depends on private details of the installed Keras and is
checked against the versions fitcustom was tested with. Each helper says which
private attribute it reads and why there is no public way.
"""

import re
import warnings

import keras

#: Keras versions (major, minor) whose internals fitcustom was tested against.
TESTED_KERAS_VERSIONS = ((3, 15),)


def keras_version():
    """Returns the installed Keras version as a `(major, minor)` tuple."""
    match = re.match(r"(\d+)\.(\d+)", keras.__version__)
    if match is None:
        raise ValueError(
            "Cannot parse the installed Keras version. "
            f"Received: keras.__version__={keras.__version__!r}. "
            "Expected a version such as '3.15.1'."
        )
    return int(match.group(1)), int(match.group(2))


def is_tested_keras():
    """Whether the installed Keras is one of `TESTED_KERAS_VERSIONS`."""
    return keras_version() in TESTED_KERAS_VERSIONS


def check_keras_version(feature, strict=False):
    """Warns (or raises if `strict`) when Keras is not a tested version.

    Args:
        feature: What needs the internals, for the message.
        strict: Raise a `RuntimeError` instead of warning.
    """
    if is_tested_keras():
        return
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED_KERAS_VERSIONS)
    message = (
        f"{feature} relies on Keras internals tested only with Keras "
        f"{tested}. Received: keras.__version__={keras.__version__}. "
        f"Install a tested version (pip install 'keras~={tested}') or "
        "report the incompatibility."
    )
    if strict:
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=3)


def functional_init_arguments(args, kwargs):
    """Whether `Model(*args, **kwargs)` asks for a functional model.

    The same test as Keras' `keras.src.models.model.
    functional_init_arguments`: `(inputs, outputs)` given positionally or
    by keyword.
    """
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


_FUNCTIONAL_CLASSES = {}


def functional_class(cls):
    """`cls` with Keras' `Functional` after it in the class hierarchy.

    `keras.Model(inputs, outputs)` returns a `Functional`; a subclass of
    `keras.Model` built that way gets `Functional` injected into the
    bases of its class (and of every base up to `keras.Model`) at run
    time, which would change `TapeModel` for every later use, subclassed
    ones included. Instead, a model built from inputs and outputs is an
    instance of a subclass made once per class: `(cls, Functional)`, so
    the class's own methods (the training step) come first and Keras'
    `Functional` provides the graph (`inputs`, `outputs`, `summary()`,
    `get_config()`, export signatures, use as a layer). It carries the
    class's name and registered name, so saved files name `cls`. Reads
    the private `keras.src.models.functional.Functional` and Keras'
    registry of custom names (`GLOBAL_CUSTOM_NAMES`).
    """
    from keras.src.models.functional import Functional
    from keras.src.saving import object_registration

    if issubclass(cls, Functional):
        return cls
    variant = _FUNCTIONAL_CLASSES.get(cls)
    if variant is None:
        variant = type(
            cls.__name__,
            (cls, Functional),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            },
        )
        registered = object_registration.GLOBAL_CUSTOM_NAMES.get(cls)
        if registered is not None:
            object_registration.GLOBAL_CUSTOM_NAMES[variant] = registered
        _FUNCTIONAL_CLASSES[cls] = variant
    return variant


def is_functional(model):
    """Whether `model` is a Keras `Functional` (built from a graph)."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def init_functional(model, inputs, outputs, **kwargs):
    """What `keras.Model.__init__` does for `(inputs, outputs)`, without
    injecting `Functional` into the class's bases (see
    `functional_class`): the trainer's state, then `Functional`'s graph.
    """
    from keras.src.models.functional import Functional
    from keras.src.models.model import Trainer

    Trainer.__init__(model)
    Functional.__init__(model, inputs, outputs, **kwargs)


def build_compiled_metrics(model, y, y_pred):
    """Builds the metrics passed to `compile()` if they are not built yet.

    Keras builds `CompileMetrics` lazily on their first `update_state()`. A
    step that updates them inside a `tf.cond` (the non-finite guard) must
    build them before, because variables cannot be created inside a branch.
    Reads the private `model._compile_metrics`; no public accessor exists.
    """
    compile_metrics = getattr(model, "_compile_metrics", None)
    if compile_metrics is not None and not compile_metrics.built:
        compile_metrics.build(y, y_pred)


def compiled_metrics_built(model):
    """Whether the metrics passed to `compile()` are built (reads the
    private `model._compile_metrics`)."""
    metrics = getattr(model, "_compile_metrics", None)
    return metrics is not None and metrics.built


def has_compiled_loss(model):
    """Whether `compile()` received a loss (reads `model._compile_loss`)."""
    return getattr(model, "_compile_loss", None) is not None


def loss_tracker(model):
    """The `Mean` metric named "loss" that `compile()` creates.

    Reads the private `model._loss_tracker`; `fit()` logs its result as
    `loss`, so a step that reproduces the built-in one must update it.
    """
    return model._loss_tracker


def sublayers(model):
    """Every layer nested in `model` (recursively), excluding `model`.

    Uses the private `Layer._flatten_layers`: `model.layers` lists only the
    top level, and nested sub-models' layers are needed by name.
    """
    return list(model._flatten_layers(include_self=False))


def needs_merge_call():
    """Whether the current strategy runs cross-replica work via merge_call.

    True for `MirroredStrategy` on CPUs; a `tf.cond` around
    `apply_gradients` is then only allowed in the cross-replica context.
    Uses `tf.__internal__.distribute.strategy_supports_no_merge_call`, the
    check Keras' `LossScaleOptimizer` uses too.
    """
    import tensorflow as tf

    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def first_batch(iterator):
    """The first batch of a Keras epoch iterator, or None if it is empty.

    Relies on the private `(begin, end, iterator)` protocol of Keras'
    epoch iterators; the caller resets the iterator afterwards, as `fit()`
    and `evaluate()` do after their own look at the first batch.
    """
    for _, _, batches in iterator:
        if isinstance(batches, (list, tuple)):
            return optionals_to_none(batches[0])
        try:
            return optionals_to_none(next(batches))
        except StopIteration:
            return None
    return None


def optionals_to_none(data):
    """`data` with every `tf.experimental.Optional` replaced by `None`.

    Keras' data adapters turn a `None` in a batch (an optional input that
    was not given) into an empty `Optional`, and Keras' step function
    turns it back (`TensorFlowTrainer._autoconvert_optionals`) before the
    step sees it, so `call()` receives `None`.
    """
    import tensorflow as tf

    return tf.nest.map_structure(
        lambda t: None if isinstance(t, tf.experimental.Optional) else t,
        data,
    )


def skip_batches(iterator, n):
    """Reads and drops `n` batches from the iterator a step function gets
    (a `tf.data` or distributed iterator, or Keras' list of batches)."""
    import tensorflow as tf

    if isinstance(
        iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)
    ):
        for _ in range(n):
            iterator.get_next()
        return
    for _ in zip(range(n), iterator):
        pass


def structure_key(value):
    """A hashable key for a nested structure of specs or shapes.

    Element specs of datasets of dicts are dicts (unhashable); dict keys
    are sorted, as `tf.nest` orders them.
    """
    if isinstance(value, dict):
        return (
            "dict",
            tuple((k, structure_key(value[k])) for k in sorted(value)),
        )
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(structure_key(v) for v in value))
    return value


def fully_built(model):
    """Whether model, compiled metrics and loss, and optimizer are built.

    The same test as Keras' private `Trainer._symbolic_build`; reads the
    private `_compile_metrics` / `_compile_loss` and `_flatten_layers`.
    """
    if not all(layer.built for layer in model._flatten_layers()):
        return False
    for part in (
        getattr(model, "_compile_metrics", None),
        getattr(model, "_compile_loss", None),
        getattr(model, "optimizer", None),
    ):
        if part is not None and not part.built:
            return False
    return True


def local_batch(batch, strategy):
    """This replica's part of a (possibly distributed) batch."""
    import tensorflow as tf

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def symbolic_build(model, data_batch, strict=False):
    """Builds model, compiled metrics, loss and optimizer before tracing.

    Keras 3.15 does this (private `Trainer._symbolic_build`) only under a
    distribution strategy; otherwise the variables are created while the
    train function is first traced, which makes `tf.function` trace it a
    second time. Building first means one trace (half the warm-up) and an
    optimizer that exists before the first step. Without `strict`, returns
    False (leaving the building to the first trace, Keras' default) when
    the model cannot be built symbolically.
    """
    try:
        model._symbolic_build(data_batch=data_batch)
    except (RuntimeError, TypeError, NotImplementedError):
        if strict:
            raise
        return False
    return True


def in_multi_worker_mode(strategy=None):
    """Whether `strategy` is a MultiWorkerMirroredStrategy across workers.

    Reads the private `extended._in_multi_worker_mode()`, the check Keras'
    own `reduce_per_replica` uses.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def make_step_function(model, step):
    """Keras' compiled step function for `step`, multi-worker safe.

    Under multi-worker, Keras 3.15's `reduce_per_replica(..., "auto")` calls
    `strategy.reduce("MEAN", v, axis=0)` on the step's logs, which fails on
    scalars: each log value is then given shape `[1]` (the reduction returns
    a scalar again). Uses the private `Trainer._make_function`.
    """
    if in_multi_worker_mode(model.distribute_strategy):
        check_keras_version("Multi-worker training", strict=True)
        import tensorflow as tf

        inner = step

        def step(data):
            logs = inner(data)
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    if model.run_eagerly:
        return model._make_function(step)
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
    import tensorflow as tf

    reduce_per_replica = _keras_reduce_per_replica()
    if reduce_per_replica is None:
        return model._make_function(step)
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
        data = optionals_to_none(data)
        flat = [t for t in tf.nest.flatten(data) if t is not None]
        key = (structure_key(element_spec), _shapes(flat))
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
            return relaxed_step(optionals_to_none(data))
        raise StopIteration

    return function


def _shapes(flat):
    """The static shapes of tensors, of each replica's part of per-replica
    values."""
    import tensorflow as tf

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
    import tensorflow as tf

    keras_function = model._make_function(step)
    reduce_per_replica = _keras_reduce_per_replica()
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
            structure_key(iterator.element_spec),
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


def _keras_reduce_per_replica():
    """Keras' private `reduce_per_replica`, or None on an untested Keras
    (the caller then falls back to Keras' own step function)."""
    if not is_tested_keras():
        return None
    try:
        from keras.src.backend.tensorflow.trainer import reduce_per_replica
    except ImportError:
        return None
    return reduce_per_replica


def set_initial_epoch(model, epoch):
    """Makes the next `fit()` start at `epoch`, as Keras' own
    `BackupAndRestore` does (the private `Trainer._initial_epoch`, which
    `fit()` reads in place of its `initial_epoch` argument)."""
    model._initial_epoch = epoch


def seed_generators(model):
    """Every `keras.random.SeedGenerator` of `model` and its sublayers.

    Their states (Dropout's masks, for instance) are not among the
    layers' weights, so neither `save()` nor `BackupAndRestore` keeps them
    and a resumed run would draw different masks. Reads the private
    `Layer._seed_generators` list, where Keras tracks them.
    """
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True):
        for generator in getattr(layer, "_seed_generators", []):
            if id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


def output_operation(network):
    """The operation (layer or `keras.ops` op) that makes `network`'s
    first output, or `None` for a network that is not functional.

    `network.layers[-1]` is not necessarily the output's producer (a final
    `keras.ops.softmax` is no layer at all, and branches reorder layers), so
    telling logits from probabilities needs the output tensor's history.
    Reads the private `KerasTensor._keras_history`; there is no public
    accessor for the node that produced a symbolic tensor.
    """
    outputs = getattr(network, "outputs", None)
    if not outputs:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    return None if history is None else history.operation


def build_input_shape(model):
    """The input shape a subclassed model was built with, or `None`.

    A subclassed model built by a call has no `inputs`; Keras records the
    shape it was built for in the private `Layer._build_shapes_dict`
    (used by its own `get_build_config`). Needed to refuse data whose
    channel axis does not match an already built model.
    """
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)) or not shape:
        return None
    if not all(d is None or isinstance(d, int) for d in shape):
        return None
    return tuple(shape)
