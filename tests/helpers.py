"""Shared checks: compare two trained models numerically."""

import contextlib
import os
import subprocess
import sys

import numpy as np


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


def strategy_scope(strategy=None):
    """`strategy.scope()`, or a context that does nothing for `None`."""
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()
