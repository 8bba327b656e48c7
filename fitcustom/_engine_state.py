"""What a TapeModel keeps outside Keras' tracking, in one record.

Keras tracks what is set on a layer: a dict of optimizers or a list of
callbacks set as an attribute becomes state saved with the model, a
metric object one of the model's own metrics. The engine's bookkeeping
(the optimizers compiled by name, the trackers of logged values, the
callbacks of the running `fit()`...) is none of that, so it lives in one
`EngineState` in the model's `__dict__`, read with `engine_state(model)`.
A task model that keeps something of its own subclasses `EngineState`
and names the subclass in its `_engine_state_type`. On the ground floor:
the callbacks and checkpoints read it too.

May import: the standard library only.
"""

import dataclasses
from typing import Any

_KEY = "_engine_state"


@dataclasses.dataclass
class EngineState:
    """The engine's bookkeeping of one model (see the module's docstring).

    Attributes:
        named_optimizers: `compile(optimizer={NAME: optimizer})`'s
            optimizers by name (empty with one optimizer).
        compiled_by_name: `(loss, (metrics, weighted_metrics))` as given
            to `compile()`, to tell which outputs have a loss by name.
        kept_compile_arguments: `compile()` arguments kept with the model
            (its compile config), by name.
        log_trackers: The `Mean`s of values logged by `minimize` and
            `log_mean`, by name, made at first use.
        fit_callbacks: The callbacks of the running `fit()` (a backup
            keeps their state).
        resume_skip: `(batches, metric_values)` still to skip when an
            epoch resumes in its middle, or `None`.
        forward_weights: The trainable weights the last probed forward
            pass read (`pieces._ForwardWeights`), or `None`.
        emas: The EMA copies made by `track_ema`.
        untrained_checked: Whether an eager step looked for gradients of
            weights the step leaves alone.
        warned_untrained: Whether that warning was given.
        functional_output_names: The output names `Functional` set, for a
            model built from inputs and outputs.
    """

    named_optimizers: dict = dataclasses.field(default_factory=dict)
    compiled_by_name: tuple = (None, ())
    kept_compile_arguments: dict = dataclasses.field(default_factory=dict)
    log_trackers: dict = dataclasses.field(default_factory=dict)
    fit_callbacks: list = dataclasses.field(default_factory=list)
    resume_skip: tuple | None = None
    forward_weights: Any = None
    emas: list = dataclasses.field(default_factory=list)
    untrained_checked: bool = False
    warned_untrained: bool = False
    functional_output_names: list | None = None


def engine_state(model, create=True):
    """The `EngineState` of `model`, made (of the model's
    `_engine_state_type`) at first use; with `create=False`, `None` when
    it has none (a model that is not a TapeModel)."""
    state = model.__dict__.get(_KEY)
    if state is None and create:
        state = type(model)._engine_state_type()
        model.__dict__[_KEY] = state
    return state


def fit_callbacks_of(model):
    """The callbacks of `model`'s running `fit()` (none for a model that
    is not a TapeModel)."""
    state = engine_state(model, create=False)
    return () if state is None else state.fit_callbacks


def logged_names(model):
    """The names of the values `model` logs with `minimize` / `log_mean`
    (none for a model that is not a TapeModel)."""
    state = engine_state(model, create=False)
    return [] if state is None else list(state.log_trackers)
