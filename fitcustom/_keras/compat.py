"""The one place where fitcustom touches Keras internals.

Everything here depends on private details of the installed Keras and is
checked against the versions fitcustom was tested with. Each helper says which
private attribute it reads and why there is no public way.

May import: Keras and TensorFlow; of fitcustom's only the package itself,
inside `unpickle_model` (to find its classes when a pickled model is
loaded).
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

    Keras' test (`keras.src.models.model.functional_init_arguments`:
    `(inputs, outputs)` given positionally or by keyword), and the two
    must be symbolic tensors: a subclass whose own arguments are two
    models (`TapeDistiller(student, teacher)`) is not functional.
    """
    if len(args) == 2:
        inputs, outputs = args
    elif len(args) == 1 and "outputs" in kwargs:
        inputs, outputs = args[0], kwargs["outputs"]
    elif "inputs" in kwargs and "outputs" in kwargs:
        inputs, outputs = kwargs["inputs"], kwargs["outputs"]
    else:
        return False
    leaves = keras.tree.flatten((inputs, outputs))
    return bool(leaves) and all(
        isinstance(t, keras.KerasTensor) for t in leaves
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
                "__reduce__": _reduce_functional,
            },
        )
        registered = object_registration.GLOBAL_CUSTOM_NAMES.get(cls)
        if registered is not None:
            object_registration.GLOBAL_CUSTOM_NAMES[variant] = registered
        _FUNCTIONAL_CLASSES[cls] = variant
    return variant


def _reduce_functional(model):
    """Pickling of a functional variant: Keras' (the model saved to bytes),
    unpickled by a function that pickle finds by its name (Keras' own is a
    method of the class, which pickle looks up by name and finds to be
    `cls`, not the variant: "it's not the same object")."""
    _, args = keras.Model.__reduce__(model)
    return (unpickle_model, args)


def unpickle_model(buffer):
    """A model from the bytes `_reduce_functional` pickled (fitcustom is
    imported here, so its classes are known to Keras)."""
    from keras.src.saving import saving_lib

    import fitcustom  # noqa: F401 (registers the classes)

    return saving_lib._load_model_from_fileobj(
        buffer, custom_objects=None, compile=True, safe_mode=False
    )


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

    if not isinstance(model, Functional):
        # A subclass whose own __init__ takes no inputs and outputs but
        # passes them to super().__init__: made as `cls`, it becomes the
        # functional variant here (Keras injects Functional into the
        # class's bases instead).
        object.__setattr__(model, "__class__", functional_class(type(model)))
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


def compute_loss(model, x, y, y_pred, sample_weight, training):
    """`model.compute_loss(...)` as Keras' own step calls it: through the
    private `Trainer._compute_loss`, which passes `training` only to a
    `compute_loss` that takes it (a user's override may not)."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def overrides_compute_loss(model):
    """Whether the model's class has a `compute_loss` of its own."""
    return type(model).compute_loss is not keras.Model.compute_loss


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


def top_layers(model):
    """The layers and sub-models held by `model` itself (not nested in
    them): `model.layers` of a subclassed model, which a `TapeModel`
    wrapping a network points at that network's."""
    return list(model._flatten_layers(include_self=False, recursive=False))


class BuildHook:
    """Keras' trainer calls its private `_maybe_symbolic_build(iterator,
    data_batch)` before the first step of `fit()`, `evaluate()` and
    `predict()` (keras/src/backend/tensorflow/trainer.py); in a model
    with this mixin it calls `_build_before_first_step(iterator,
    data_batch)` there instead."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        self._build_before_first_step(iterator, data_batch)


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


def keras_step_function(model, step):
    """Keras' own step function for `step` (the private
    `Trainer._make_function`): the fallback for what fitcustom's step
    functions do not handle (eager steps, an untested Keras)."""
    return model._make_function(step)


def keras_reduce_per_replica():
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
    return producer(outputs[0])


def producer(tensor):
    """The operation that made a symbolic tensor (`None` for an input or
    a tensor without history). Reads `KerasTensor._keras_history`."""
    history = getattr(tensor, "_keras_history", None)
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


def ask_to_overwrite(filepath):
    """Keras' prompt before overwriting a file (the private
    `io_utils.ask_to_proceed_with_overwrite`, which `Model.save` uses)."""
    from keras.src.utils import io_utils

    return io_utils.ask_to_proceed_with_overwrite(filepath)


class KerasModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' `ModelCheckpoint` whose saves go through
    `model_for_saving(model)` (around the private `_save_model`, which
    saves `self._model`)."""

    def model_for_saving(self, model):
        """The object whose `save` / `save_weights` write the file."""
        return model

    def _save_model(self, epoch, batch, logs):
        model = self._model
        self._model = self.model_for_saving(model)
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self._model = model


class KerasBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore` with the private parts that fitcustom's
    subclass reuses under public names."""

    def should_save_on_batch(self, batch):
        """Keras' count of batches since the last backup (the private
        `_should_save_on_batch`): whether `save_freq` is reached."""
        return self._should_save_on_batch(batch)

    def start_batch_count(self):
        """Starts a new epoch's batch count, as Keras' `on_epoch_end`
        does (the private `_last_batch_seen`)."""
        self._last_batch_seen = 0

    @property
    def keras_backup_path(self):
        """The weights file of Keras' own callback (`_weights_path`)."""
        return self._weights_path

    def load_keras_backup(self):
        """Restores a backup of Keras' own callback (its `_load_model`)."""
        keras.callbacks.BackupAndRestore._load_model(self)


def created_under_strategy(model):
    """Whether `model` was created in a distribution strategy's scope
    (the private `Trainer._distribute_strategy`; the public
    `distribute_strategy` gives the default strategy otherwise)."""
    return model._distribute_strategy is not None


def call_links(layer):
    """`(input_tensors, output_tensors)` of each call of `layer` in a
    functional graph (the private `Operation._inbound_nodes`)."""
    return [
        (node.input_tensors, node.output_tensors)
        for node in getattr(layer, "_inbound_nodes", [])
    ]


def call_takes_training(model):
    """Whether `model.call` has a `training` argument (the private
    `Layer._call_has_training_arg`, which `Layer.__call__` reads)."""
    return model._call_has_training_arg


def tape_is_recording(tape):
    """Whether `tape` is recording now (inside its `with` block). Reads
    the private `GradientTape._recording`; no public accessor exists."""
    return bool(getattr(tape, "_recording", False))


def unknown_to_optimizer(optimizer, variables):
    """The `variables` a built optimizer was not built for (it would
    fail on them inside the step). Reads the private
    `_trainable_variables_indices` / `_var_key` of Keras' optimizers."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not inner.built:
        return []
    known = getattr(inner, "_trainable_variables_indices", None)
    if known is None:
        return []
    return [v for v in variables if inner._var_key(v) not in known]


def saveable_group(items):
    """A Keras-saveable holder of named objects (optimizers), saved and
    loaded at `PATH/NAME` for each of them: Keras' own dicts are saved by
    class name in order, which a changed order would mix up. Builds on
    the private `KerasSaveable` and Keras' walk of `dir()`; an empty group
    saves nothing."""
    from keras.src.saving.keras_saveable import KerasSaveable

    class _Group(KerasSaveable):
        def __init__(self, named):
            self.__dict__["_items"] = dict(named)

        def _obj_type(self):
            # Keras' walk skips the attributes named in a per-type list
            # (its private global `saving_attr_skiplist_TYPE`): none here.
            from keras.src.backend.common import global_state

            key = "saving_attr_skiplist_FitcustomGroup"
            if global_state.get_global_attribute(key) is None:
                global_state.set_global_attribute(key, set())
            return "FitcustomGroup"

        def __dir__(self):
            return list(self.__dict__["_items"])

        def __getattr__(self, name):
            try:
                return self.__dict__["_items"][name]
            except KeyError:
                raise AttributeError(name) from None

    return _Group(items)
