"""A training process killed with SIGKILL mid-epoch resumes exactly.

Three fresh processes: an uninterrupted run; a run killed (SIGKILL to its
own process group) in the middle of its third epoch; the same command
restarted, which resumes from Keras' BackupAndRestore. The final weights of
the resumed run must equal the uninterrupted run's.
"""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import finish
from helpers import start

JOB = Path(__file__).parent / "programs" / "resume_job.py"


def _run(job, out, kind, marker="-"):
    return start(["python", job, out, marker, kind])


def _finish(proc):
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]


def _weights(out):
    with np.load(out / "weights.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]


# The classifier and the GAN are killed mid-epoch (and inside their writes)
# by test_durability.py, and stopped by a notice by test_preemption.py.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["engine"])
def test_sigkill_mid_epoch_then_resume_gives_uninterrupted_weights(
    tmp_path, kind
):
    job = JOB
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    # The uninterrupted run alongside the one that is killed (each
    # process spends most of its time importing TensorFlow on one core).
    uninterrupted = _run(job, straight, kind)

    marker = tmp_path / "reached"
    proc = _run(job, crashed, kind, marker)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "job never reached epoch 3"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        for started in (proc, uninterrupted):
            failing = sys.exc_info()[0] is not None
            if started.poll() is None and (started is proc or failing):
                os.killpg(started.pid, signal.SIGKILL)
    _finish(uninterrupted)
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "weights.npz").exists()
    assert (crashed / "backup").exists()

    _finish(_run(job, crashed, kind))  # the same command, restarted
    epochs = (crashed / "epochs.txt").read_text().split()
    # Killed in epoch index 2; the restart resumes there, not from 0.
    assert epochs == ["0", "1", "2", "2", "3"], epochs
    for a, b in zip(_weights(straight), _weights(crashed)):
        np.testing.assert_array_equal(a, b)
