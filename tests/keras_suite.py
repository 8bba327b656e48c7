"""A pytest plugin that runs Keras' own tests on fitcustom's engine.

`tests/test_keras_suite.py` runs the test files that ship with the
installed Keras (`keras/src/models/model_test.py`,
`keras/src/trainers/trainer_test.py`, `keras/src/saving/saving_api_test.py`)
with `-p tests.keras_suite`. Before they run, the names those files build
their models from are bound to fitcustom's:

- `Model` (and `models.Model`) is `fitcustom.TapeModel`: every functional
  and subclassed model of the tests is a `TapeModel`;
- `Trainer`, which `trainer_test.py` mixes into a layer
  (`class ExampleModel(Trainer, layers.Dense)`), is `TapeTrainer`:
  TapeModel's training engine (compile, fit / evaluate, the step pieces)
  on Keras' TensorFlow trainer, without the functional-model part, which
  a layer mixed in this way does not have;
- `Sequential`, in the saving tests, builds a `TapeModel` around Keras'
  `Sequential` (`TapeModel(network=...)`), saved and loaded as fitcustom
  saves it.

The tests themselves, their data and expected numbers are Keras', unchanged.
"""

import functools
import importlib
import importlib.util
import json
import os
import sys
import types

import keras
import pytest
from keras.src import models as keras_models
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

import fitcustom
from fitcustom.engine.model import TapeModel
from fitcustom.engine.pieces import StepPieces

#: TapeModel's members that belong to a model built from inputs and
#: outputs (or wrapping one), its config and saving: a layer that mixes
#: in the engine keeps its own.
_MODEL_ONLY = {
    "__new__",
    "__init__",
    "call",
    "layers",
    "inputs",
    "outputs",
    "output_names",
    "_graph_attribute",
    "get_config",
    "from_config",
    "save",
    "save_weights",
    "get_build_config",
    "build_from_config",
    "save_own_variables",
    "load_own_variables",
    "_check_weight_count",
}


def _engine_namespace():
    return {
        name: value
        for name, value in vars(TapeModel).items()
        if name not in _MODEL_ONLY
        and not (name.startswith("__") and name.endswith("__"))
    }


def _trainer_init(self):
    TensorFlowTrainer.__init__(self)
    TapeModel.init_engine_state(self)


def _rebound(function, cls):
    """`function` with its `super()` (its `__class__` cell) bound to `cls`:
    TapeModel's methods call `super()`, which must name the class they
    are in."""
    if not isinstance(function, types.FunctionType):
        return function
    names = function.__code__.co_freevars
    if "__class__" not in names:
        return function
    cells = tuple(
        types.CellType(cls) if name == "__class__" else cell
        for name, cell in zip(names, function.__closure__, strict=True)
    )
    return functools.update_wrapper(
        types.FunctionType(
            function.__code__,
            function.__globals__,
            function.__name__,
            function.__defaults__,
            cells,
        ),
        function,
    )


TapeTrainer = type(
    "TapeTrainer",
    tuple(b for b in TapeModel.__bases__ if b is not keras.Model)
    + (TensorFlowTrainer,),
    {"__init__": _trainer_init},
)
# TapeModel's engine members, each with its super() bound to TapeTrainer.
for _name, _value in _engine_namespace().items():
    if isinstance(_value, property):
        _value = property(
            _rebound(_value.fget, TapeTrainer),
            _rebound(_value.fset, TapeTrainer) if _value.fset else None,
        )
    else:
        _value = _rebound(_value, TapeTrainer)
    setattr(TapeTrainer, _name, _value)


def _sequential(*args, **kwargs):
    return TapeModel(network=keras.Sequential(*args, **kwargs))


class _Models(types.ModuleType):
    """`keras.src.models` with `Model` bound to `TapeModel`."""

    def __init__(self):
        super().__init__("keras.src.models")
        self.Model = TapeModel

    def __getattr__(self, name):
        return getattr(keras_models, name)


#: Module-global names rebound in each of Keras' test files.
BINDINGS = {
    "keras.src.models.model_test": {"Model": TapeModel},
    "keras.src.trainers.trainer_test": {
        "Trainer": TapeTrainer,
        "models": _Models(),
    },
    "keras.src.saving.saving_api_test": {
        "Model": TapeModel,
        "Sequential": _sequential,
    },
}

#: Where the test files import those names from: bound to fitcustom's while
#: a test file is imported, so that the classes it defines at import time
#: (`class ExampleModel(Trainer, layers.Dense)`) are built on them.
_SOURCES = {
    "Trainer": ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer"),
    "Model": ("keras.src.models.model", "Model"),
}


def _import_with_bindings(name, names):
    saved = {}
    for key, value in names.items():
        if key in _SOURCES:
            source, attribute = _SOURCES[key]
            module = importlib.import_module(source)
            saved[module, attribute] = getattr(module, attribute)
            setattr(module, attribute, value)
    try:
        module = importlib.import_module(name)
    finally:
        for (source, attribute), value in saved.items():
            setattr(source, attribute, value)
    for key, value in names.items():
        assert hasattr(module, key), (name, key)
        setattr(module, key, value)


#: Models the tests built on fitcustom's engine (written to the file in
#: `KERAS_SUITE_COUNT` at the end): shows that the bindings took effect.
BUILT = {"TapeModel": 0, "TapeTrainer": 0, "steps": 0}


def _counting(init_engine_state, check_class_ids):
    @functools.wraps(init_engine_state)
    def counted_init(self):
        kind = "TapeTrainer" if isinstance(self, TapeTrainer) else "TapeModel"
        BUILT[kind] += 1
        return init_engine_state(self)

    @functools.wraps(check_class_ids)
    def counted_piece(self, *args, **kwargs):
        BUILT["steps"] += 1  # a piece of the engine's train / test step
        return check_class_ids(self, *args, **kwargs)

    return counted_init, counted_piece


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("KERAS_SUITE_COUNT")
    if path:
        with open(path, "w") as f:
            json.dump(BUILT, f)


#: Packages some of Keras' tests read data from; where one is not
#: installed (Keras' own CI installs them all), its tests are skipped.
_OPTIONAL = ("jax", "grain", "torch")
_MISSING = [p for p in _OPTIONAL if importlib.util.find_spec(p) is None]


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        needs = [p for p in _MISSING if p in item.name]
        if needs:
            item.add_marker(
                pytest.mark.skip(reason=f"needs {needs[0]}, not installed")
            )


def pytest_configure(config):
    # trainer_test.py imports jax at the top for its data tests with jax
    # arrays; an empty module lets it import (those tests are skipped).
    if "jax" in _MISSING:
        sys.modules.setdefault("jax", types.ModuleType("jax"))
    assert fitcustom.TapeModel is TapeModel
    TapeModel.init_engine_state, StepPieces.check_class_ids = _counting(
        TapeModel.init_engine_state, StepPieces.check_class_ids
    )
    # Imported here, before pytest collects them (it then finds them in
    # sys.modules).
    for name, names in BINDINGS.items():
        _import_with_bindings(name, names)
