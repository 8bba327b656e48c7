"""Training that never loses work: atomic files, and a job killed at many
moments (inside checkpoint writes too) that ends exactly where an
uninterrupted one does."""

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

JOB = Path(__file__).with_name("durable_job.py")

# One kill per process, in training order; each restart resumes from the
# last backup (the start of an epoch), so every later kill is reached.
CLASSIFIER_KILLS = [
    "batch:0:1",
    "backup:0:partial",
    "batch:1:0",
    "checkpoint:1:partial",
    "batch:1:3",
    "backup:1:renamed",
    "batch:2:2",
    "checkpoint:2:renamed",
    "batch:2:5",
    "backup:2:partial",
    "batch:3:0",
    "batch:3:4",
    "backup:3:renamed",
    "batch:4:1",
    "checkpoint:4:partial",
    "batch:4:3",
    "backup:4:partial",
    "batch:5:0",
    "batch:5:2",
    "batch:5:5",
    "backup:5:partial",
    "backup:5:renamed",
]
GAN_KILLS = [
    "batch:0:3",
    "backup:0:partial",
    "batch:1:2",
    "checkpoint:2:partial",
    "backup:2:renamed",
    "batch:3:5",
    "backup:4:partial",
    "batch:5:1",
    "backup:5:renamed",
]


def _run(out, kind, kill=None, timeout=300):
    args = [sys.executable, str(JOB), str(out), kind] + ([kill] if kill else [])
    proc = subprocess.Popen(
        args,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, killed alone
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err


def _weights(path):
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


def _assert_readable(out):
    """Every file the job left is complete: the backup and the model."""
    backups = (
        [p for p in (out / "backup").glob("backup-*.weights.h5")]
        if (out / "backup").exists()
        else []
    )
    for path in backups:
        _weights(path)  # h5py raises on a truncated file
    checkpoint = out / "checkpoint.keras"
    if checkpoint.exists():
        with zipfile.ZipFile(checkpoint) as z:
            assert z.testzip() is None
    return backups


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, kills",
    [("classifier", CLASSIFIER_KILLS), ("gan", GAN_KILLS)],
    ids=["classifier", "gan"],
)
def test_killed_at_every_moment_resumes_exactly(tmp_path, kind, kills):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, err = _run(straight, kind)
    assert code == 0, err[-3000:]
    for kill in kills:
        code, err = _run(killed, kind, kill)
        assert code == -signal.SIGKILL, (kill, code, err[-3000:])
        backups = _assert_readable(killed)
        if not kill.startswith("batch:0"):
            assert backups, f"no backup after the kill at {kill}"
    code, err = _run(killed, kind)  # the same command, restarted
    assert code == 0, err[-3000:]
    _assert_readable(killed)
    assert not (killed / "backup").exists()  # deleted at the end
    for a, b in zip(
        _weights(straight / "final.weights.h5"),
        _weights(killed / "final.weights.h5"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
