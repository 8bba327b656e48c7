"""`TapeModel`, assembled: construction, network delegation, config,
saving and the metrics it logs. The rest of the class lives beside it, one
concern a module: `compiling` (compile and its configuration), `fitting`
(the fit/evaluate entry points, data checks, building, mid-epoch resume),
`pieces` (the step pieces), `custom_steps` (the tools of a hand-written
step) and `ema` (EMA copies of networks).

May import: the ground floor (`_args`, `checks`, `distribute`), `_keras`,
`checkpoints`, and the engine's own modules.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from fitcustom import checkpoints
from fitcustom._engine_state import EngineState
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat
from fitcustom._version import __version__
from fitcustom.engine.compiling import CompileMixin
from fitcustom.engine.custom_steps import CustomSteps
from fitcustom.engine.ema import EMANetworks
from fitcustom.engine.fitting import FitMixin
from fitcustom.engine.pieces import StepPieces


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeModel(
    CompileMixin, FitMixin, StepPieces, CustomSteps, EMANetworks, keras.Model
):
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
    `TapeClassifier`. `minimize(tape, terms, optimizer=...)` (one whole
    update: reduction over the global batch, loss scale, guard,
    transforms, optimizer, logs) serves steps with several networks and
    optimizers, like `TapeGAN`'s; it calls `update(tape, scaled_loss,
    loss, variables, optimizer)` (gradients, guard, transforms,
    optimizer).

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

    # What the engine keeps outside Keras' tracking (`_engine_state`); a
    # task model with bookkeeping of its own names a subclass.
    _engine_state_type = EngineState

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
        self.init_engine_state()
        if network is not None and network.built:
            self.built = True

    def init_engine_state(self):
        """Creates the engine's own state (its trackers and compile
        settings); `__init__` calls it."""
        self._gradient_norm_tracker = keras.metrics.Mean(name="gradient_norm")
        self._nonfinite_tracker = keras.metrics.Sum(name="nonfinite_steps")
        self._gradient_transforms = ()
        self._log_gradient_norm = False
        self._skip_nonfinite = False
        self._loss_term_trackers = {}

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
        names = engine_state(self).functional_output_names
        if names is None:
            raise AttributeError(
                f"{type(self).__name__} has no attribute 'output_names': "
                "it is not built from inputs and outputs."
            )
        return names

    @output_names.setter
    def output_names(self, value):
        # Set by `Functional.__init__`.
        engine_state(self).functional_output_names = value

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
            if name not in config:  # `network` is written already
                config[name] = keras.saving.serialize_keras_object(
                    getattr(self, name)
                )
        for name in self.config_values:
            config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = check_saved_version(config, cls.__name__)
        names = dict.fromkeys(("network", *cls.config_models))  # once each
        models = [k for k in names if k in config]
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
        a full disk during the save leaves the previous file intact. The
        legacy HDF5 format (`.h5`) is refused: Keras would write a file
        that does not load back as this class.
        """
        path = str(filepath)
        if path.lower().endswith((".h5", ".hdf5")):
            stem = path.rsplit(".", 1)[0]
            raise ValueError(
                f"{type(self).__name__} saves in the .keras format. "
                f"Received: filepath={path!r}, Keras' legacy HDF5 format, "
                "whose files do not load back as a fitcustom model. Save "
                f"to {stem + '.keras'!r} (keras.saving.load_model reads it "
                "back with its optimizer state), or only the weights with "
                f"save_weights({stem + '.weights.h5'!r})."
            )
        checkpoints.save_model(self, filepath, overwrite, zipped, **kwargs)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights; see `keras.Model.save_weights`.

        Written atomically (`fitcustom.checkpoints.save_weights`).
        """
        checkpoints.save_weights(self, filepath, overwrite, max_shard_size)

    def get_build_config(self):
        """Keras' build config plus how each sub-model held as an
        attribute was built (its own build config), so that loading
        builds a sub-model that training built (one made in `__init__`
        without `keras.Input`) before its weights are read."""
        config = super().get_build_config()
        built = {
            name: layer.get_build_config()
            for name, layer in _attribute_layers(self).items()
            if layer.built and layer.get_build_config()
        }
        if not built:
            return config
        return {**(config or {}), self._SUBLAYERS_KEY: built}

    def build_from_config(self, config):
        config = dict(config or {})
        for name, built in config.pop(self._SUBLAYERS_KEY, {}).items():
            layer = _attribute_layers(self).get(name)
            if layer is not None and not layer.built:
                layer.build_from_config(built)
        if config:
            super().build_from_config(config)
        else:
            self._build_from_sublayers()

    _SUBLAYERS_KEY = "fitcustom_sublayers"
    _SEED_KEY = "seed_generator_state_"
    _COUNT_KEY = "fitcustom_weight_count"

    def save_own_variables(self, store):
        """Keras' variables plus the RNG states of every SeedGenerator,
        and the number of weights (checked on loading).

        Keras keeps neither in `save()` nor in `BackupAndRestore` the state
        of a SeedGenerator (e.g. Dropout's); without it a resumed run
        draws other masks than the uninterrupted one would have.
        """
        super().save_own_variables(store)
        for i, generator in enumerate(_compat.seed_generators(self)):
            store[f"{self._SEED_KEY}{i}"] = keras.ops.convert_to_numpy(
                generator.state.value
            )
        store[self._COUNT_KEY] = np.array(len(self.weights), "int64")

    def load_own_variables(self, store):
        # Called before the sub-models' weights are read: a sub-model
        # that is not built now would be skipped by Keras, silently
        # (it keeps fresh weights), so refuse.
        if self._COUNT_KEY in store.keys():
            self._check_weight_count(int(store[self._COUNT_KEY][()]))
        ours = (self._SEED_KEY, self._COUNT_KEY)
        keys = [k for k in store.keys() if k.startswith(ours)]
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

    def _check_weight_count(self, saved):
        have = len(self.weights)
        if have >= saved:
            return
        unbuilt = [
            f"{name} ({type(layer).__name__})"
            for name, layer in _attribute_layers(self).items()
            if not layer.built
        ] or [
            f"{layer.name} ({type(layer).__name__})"
            for layer in _compat.sublayers(self)
            if not layer.built
        ]
        raise ValueError(
            f"The saved {type(self).__name__} has {saved} weights; this one "
            f"has {have} after building, so some saved weights have no "
            "place to go and the sub-models they belong to would keep "
            "fresh weights. Not built: "
            + (", ".join(unbuilt) or "(unknown)")
            + ". A sub-model that training builds (made in __init__ "
            "without an input shape) is rebuilt on loading only when it "
            "is an attribute of the model. Build it in __init__: "
            "keras.Sequential([keras.Input(shape), ...]) or "
            "self.NAME.build(input_shape)."
        )

    @property
    def metrics(self):
        hidden = []
        if not self._log_gradient_norm:
            hidden.append(self._gradient_norm_tracker)
        if not self._skip_nonfinite:
            hidden.append(self._nonfinite_tracker)
        own = [m for m in super().metrics if not any(m is h for h in hidden)]
        # The means that `minimize` / `log_mean` log, made at first use.
        return own + list(engine_state(self).log_trackers.values())

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


def _attribute_layers(model):
    """The layers and models held as attributes of `model` (each once,
    under its first name)."""
    found = {}
    for name, value in vars(model).items():
        if isinstance(value, keras.Layer) and all(
            value is not v for v in found.values()
        ):
            found[name] = value
    return found


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
