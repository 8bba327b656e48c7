"""A shared test harness for task models (in the spirit of keras-hub's
`run_task_test`).

A test module describes its task model once, as a `Task`: how to build
it compiled, its data and its `fit()` arguments. The checks then train
it the same way for every task model:

- `check_reference`: each execution mode against a reference (built-in
  `fit()` or a hand-written loop) from the same initial weights;
- `check_two_replicas`: 2 replicas train what 1 device trains;
- `check_mixed_precision`: the update size under `mixed_float16` is
  float32's;
- `check_continue_in_fresh_process`: save after one epoch, load in a
  fresh process, train on: the weights, every optimizer's step count and
  the logs are those of a run that never stopped, bit for bit;
- `check_kill_and_resume`: SIGKILL in the middle of an epoch, the same
  command again: bit for bit the run that was never killed;
- `check_bad_input`: bad `fit()` input is refused with a clear message
  before any weight changes.

`Task.build` and `Task.data` must be module-level functions of a test
module (a fresh process imports them by name).
"""

import dataclasses
import json
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import MODES
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import finish
from helpers import max_abs_diff
from helpers import start

import fitcustom

TESTS = Path(__file__).parent
CONTINUE = TESTS / "programs" / "task_continue.py"


@dataclasses.dataclass
class Task:
    """A task model as the harness trains it.

    Attributes:
        build: `build(**compile_kwargs)` returns the model, compiled with
            those extra arguments (`run_eagerly`, ...), its weights drawn
            from a fixed seed.
        data: `data()` returns `(x, y)` (`y` may be `None`).
        fit_kwargs: `fit()` arguments besides the data (`batch_size`,
            ...); one epoch unless they say otherwise.
    """

    build: object
    data: object
    fit_kwargs: dict = dataclasses.field(default_factory=dict)

    def fit(self, model, epochs=None, **kwargs):
        x, y = self.data()
        arguments = dict(self.fit_kwargs, verbose=0, **kwargs)
        if epochs is not None:
            arguments["epochs"] = epochs
        return model.fit(x, y, **arguments).history


def weights_of(model):
    return [np.asarray(w) for w in model.get_weights()]


def optimizer_steps(model):
    """The step count of every optimizer the model trains with."""
    optimizers = [model.optimizer] + list(model.optimizers.values())
    return [int(o.iterations.numpy()) for o in optimizers if o is not None]


def check_reference(task, reference, modes=MODES, atol=1e-6, rtol=1e-6):
    """Trains the task model in each mode from the reference's initial
    weights; its weights, and every log the reference has, must equal the
    reference's.

    Args:
        reference: `reference(initial_weights)` trains the reference from
            those weights and returns `(weights, history)`.

    Returns:
        The trained task models by mode (for checks of a test's own).
    """
    initial = weights_of(task.build())
    expected_weights, expected_history = reference(initial)
    assert max_abs_diff(initial, expected_weights) > 1e-4, "it trained"
    trained = {}
    for mode in modes:
        model = task.build(**MODES[mode])
        model.set_weights(initial)
        history = task.fit(model)
        assert_weights_close(weights_of(model), expected_weights, atol)
        shared = {k: history[k] for k in expected_history if k in history}
        assert_history_close(shared, expected_history, rtol=rtol)
        trained[mode] = model
    return trained


def check_two_replicas(
    task, strategy, weight_tolerance=1e-6, expect_ok=True, **kwargs
):
    """`fitcustom.testing.check_replicas` of the task: its report, asserted
    to hold unless `expect_ok=False` (a control that must fail)."""
    x, y = task.data()
    report = fitcustom.testing.check_replicas(
        task.build,
        x,
        y,
        strategy=strategy,
        weight_tolerance=weight_tolerance,
        **dict(task.fit_kwargs, **kwargs),
    )
    if expect_ok:
        report.assert_ok()
    return report


def check_mixed_precision(task, tolerance=0.05):
    x, y = task.data()
    report = fitcustom.testing.check_mixed_precision(
        task.build, x, y, tolerance=tolerance, **task.fit_kwargs
    )
    report.assert_ok()
    assert keras.config.dtype_policy().name == "float32"  # put back
    return report


def _run(module, task_name, mode, path, out, *extra, expect=0):
    # The repository's root is on the path (`start`): tests of the
    # example programs import them from `scripts.examples`.
    proc = start(
        ["python", CONTINUE, TESTS, module, task_name, mode, path, out]
        + [str(e) for e in extra]
    )
    code, _, err = finish(proc)
    assert code == expect, err[-3000:]


def _same_run(expected_npz, actual_npz):
    """The two runs' weights, optimizer steps and last logs, bit for bit."""
    with np.load(expected_npz) as expected, np.load(actual_npz) as actual:
        assert sorted(actual.files) == sorted(expected.files)
        assert int(expected["weights"]) > 0
        for key in expected.files:
            np.testing.assert_array_equal(
                actual[key], expected[key], err_msg=key
            )
        return {
            "steps": [int(s) for s in actual["steps"]],
            "logs": json.loads(str(actual["logs"])),
        }


def check_continue_in_fresh_process(module, task_name, tmp_path):
    """Save after one epoch, load in a fresh process and train one more:
    the same weights, optimizer steps and last logs as the run that saved
    and went on without stopping (also a fresh process), bit for bit.

    Both runs are fresh processes: a test process that built other models
    traces other graphs (node names, at least), which moved results by
    ~3e-7 once. Grappler is off in them (`task_continue.py`).

    Args:
        module: The test module that defines the task (its name).
        task_name: The module-level `Task`'s name.
    """
    saved = tmp_path / "model.keras"
    _run(module, task_name, "save", saved, tmp_path / "uninterrupted.npz")
    _run(module, task_name, "continue", saved, tmp_path / "loaded.npz")
    return _same_run(tmp_path / "uninterrupted.npz", tmp_path / "loaded.npz")


def check_kill_and_resume(module, task_name, tmp_path, at):
    """Two epochs with `fitcustom.BackupAndRestore(save_freq=2)`, the
    process SIGKILLed after batch `at` of the first epoch; the same
    command again ends with the weights, optimizer steps and last logs of
    a run that was never killed (a fresh process too), bit for bit.

    Returns:
        The resumed run's `{"steps": ..., "logs": ...}`.
    """
    backup = tmp_path / "backup"
    _run(module, task_name, "whole", backup, tmp_path / "whole.npz")
    _run(
        module,
        task_name,
        "kill",
        backup,
        tmp_path / "killed.npz",
        at,
        expect=-signal.SIGKILL,
    )
    assert not (tmp_path / "killed.npz").exists()
    assert any(backup.iterdir()), "a backup was written before the kill"
    _run(module, task_name, "resume", backup, tmp_path / "resumed.npz")
    return _same_run(tmp_path / "whole.npz", tmp_path / "resumed.npz")


def check_bad_input(task, cases):
    """Each `(fit_overrides, match)` is refused with a `ValueError`
    matching `match`, before any weight changes."""
    for overrides, match in cases:
        model = task.build()
        x, y = task.data()
        if not model.built:
            model(x[:1])
        arguments = dict(task.fit_kwargs, verbose=0)
        arguments.update(overrides)
        x = arguments.pop("x", x)
        y = arguments.pop("y", y)
        before = weights_of(model)
        with pytest.raises(ValueError, match=match):
            model.fit(x, y, **arguments)
        assert_weights_close(before, weights_of(model), atol=0)


class Interrupt(keras.callbacks.Callback):
    """Stops `fit()` after batch `at` of the first epoch, as a kill would:
    nothing of the run is saved by the interruption itself."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            raise KeyboardInterrupt


def check_backup_resume(
    task, tmp_path, at=2, epochs=2, save_freq=2, callback=None
):
    """Interrupts a `fit()` with a backup callback after batch `at` of
    its first epoch (the last backup: after batch `save_freq * k - 1`),
    then runs the same `fit()` again on a fresh build.

    Returns:
        `(weight_diff, log_diff, steps)`: the largest distance of the
        resumed run's weights and (relative) last logs from a run that
        never stopped, and both runs' optimizer steps.
    """
    make = callback or fitcustom.BackupAndRestore
    whole = task.build()
    initial = weights_of(whole)
    expected = task.fit(whole, epochs=epochs)
    folder = str(tmp_path / "backup")
    model = task.build()
    model.set_weights(initial)
    with pytest.raises(KeyboardInterrupt):
        task.fit(
            model,
            epochs=epochs,
            callbacks=[make(folder, save_freq=save_freq), Interrupt(at)],
        )
    resumed = task.build()
    resumed.set_weights(initial)
    history = task.fit(
        resumed, epochs=epochs, callbacks=[make(folder, save_freq=save_freq)]
    )
    steps = (optimizer_steps(resumed), optimizer_steps(whole))
    log_diff = max(
        abs(history[k][-1] - expected[k][-1]) / max(abs(expected[k][-1]), 1e-8)
        for k in expected
    )
    weight_diff = max_abs_diff(weights_of(resumed), weights_of(whole))
    return weight_diff, log_diff, steps
