"""Shared checks: compare two trained models numerically."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import forkserver
import numpy as np


def labelled_images(n, shape=(8, 8, 1), seed=0):
    """`(x, y)`: `n` images of `shape` in [0, 1) and class ids 0-9."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype("int32")
    return x, y


def max_abs_diff(weights_a, weights_b):
    """Largest absolute difference between two lists of weight arrays."""
    assert len(weights_a) == len(weights_b), (len(weights_a), len(weights_b))
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
        for a, b in zip(weights_a, weights_b)
    )


def assert_weights_close(weights_a, weights_b, atol=1e-6):
    diff = max_abs_diff(weights_a, weights_b)
    assert diff <= atol, f"weights differ by {diff:.3g} > {atol}"


def assert_history_close(hist_a, hist_b, rtol=1e-6, atol=1e-7):
    """Same keys, and every logged number equal within `rtol`."""
    assert sorted(hist_a) == sorted(hist_b), (sorted(hist_a), sorted(hist_b))
    for key in hist_a:
        a = np.asarray(hist_a[key], np.float64)
        b = np.asarray(hist_b[key], np.float64)
        assert a.shape == b.shape, (key, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=key)


def update_size(before, after):
    """Global L2 norm of the change between two lists of weights."""
    return float(
        np.sqrt(
            sum(
                np.sum((np.asarray(b, np.float64) - np.asarray(a)) ** 2)
                for a, b in zip(before, after)
            )
        )
    )


def run_python(script, *args, timeout=300):
    """Runs a Python file in a fresh process; fails the test on an error."""
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


ROOT = Path(__file__).parent.parent

#: The ways `fit()` runs a step, as `compile()` options: every parity test
#: runs in each (3 steps per execution leaves a partial last call).
MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(),
    "steps_per_execution": dict(steps_per_execution=3),
    "jit": dict(jit_compile=True),
}


def spawn_worker(command, env):
    """`launch_workers.launch(spawn=...)` for the tests: a worker running
    a program of ours is forked from the fork server (see forkserver.py),
    in its own session, its stderr merged into its stdout."""
    command = [str(a) for a in command]
    if command[0] == sys.executable and command[1].endswith(".py"):
        environment = dict(env)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), environment.get("PYTHONPATH", "")]
        )
        forked = forkserver.spawn(
            command[1:], None, environment, merge_stderr=True
        )
        if forked is not None:
            return forked
    from scripts import launch_workers

    return launch_workers.start_worker(command, env)


def start(command, cwd=None, merge_stderr=False, **env):
    """Starts `command` (a list; a leading "python" is this Python) in
    its own process group (so that only it is killed), with TensorFlow's
    C++ log quiet, the repository on the path and `env` added to the
    environment. stdout and stderr are pipes of text (`merge_stderr`:
    stderr into stdout)."""
    command = [str(a) for a in command]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), environment.get("PYTHONPATH", "")]
    )
    if command[0] == "python" and command[1].endswith(".py"):
        # A program of ours: forked from a process that has imported
        # TensorFlow already (see forkserver.py), if it can be.
        forked = forkserver.spawn(
            command[1:], cwd, environment, merge_stderr=merge_stderr
        )
        if forked is not None:
            return forked
    if command[0] == "python":
        command[0] = sys.executable
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc, timeout=300):
    """Waits for a process of `start`: `(exit code, stdout, stderr)`; on
    the timeout its process group is killed and the test fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def signal_at(proc, until, notice):
    """Reads `proc`'s stdout up to the first line that is `until` (a
    string, compared without surrounding whitespace) or for which
    `until(line)` is true, then sends `notice` to the process. Returns
    the lines read."""
    if isinstance(until, str):
        expected = until
        until = lambda text: text.strip() == expected  # noqa: E731
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if until(text):
            proc.send_signal(notice)
            break
    return seen


def h5_arrays(path):
    """The arrays of an .h5 file (a weights file), in the order of their
    paths; h5py raises on a truncated file."""
    import h5py

    with h5py.File(path, "r") as f:
        found = {}
        f.visititems(
            lambda name, obj: (
                found.__setitem__(name, obj[()])
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return [found[k] for k in sorted(found)]


def strategy_scope(strategy=None):
    """`strategy.scope()`, or a context that does nothing for `None`."""
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()
