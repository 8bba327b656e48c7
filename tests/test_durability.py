"""Training that never loses work: atomic files, and a job killed at many
moments (inside checkpoint writes too) that ends exactly where an
uninterrupted one does."""

import concurrent.futures
import json
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import finish
from helpers import h5_arrays
from helpers import start

JOB = Path(__file__).parent / "programs" / "durable_job.py"

# One kill per process, in training order; each restart resumes from the
# last backup, so every later kill is reached. "batch:E:B" kills after
# batch B of epoch E; "backup:E:HOW" / "checkpoint:E:HOW" inside the first
# backup (model checkpoint) write of epoch E: "partial" with the temporary
# file half-written, "renamed" with the new file in place and the old
# backup not yet removed.
KILLS = {
    ("classifier", "epoch"): [
        "batch:0:1",
        "backup:0:partial",
        "checkpoint:1:partial",
        "backup:1:renamed",
        "checkpoint:2:renamed",
    ],
    ("classifier", "2"): [
        "batch:0:0",
        "backup:1:renamed",
        "batch:2:5",
    ],
    ("gan", "epoch"): [
        "backup:0:partial",
        "checkpoint:2:partial",
        "backup:2:renamed",
    ],
    ("two_players", "2"): [
        "batch:1:2",
        "backup:2:partial",
        "batch:3:5",
    ],
    ("gan", "2"): [
        "batch:0:3",
        "checkpoint:1:renamed",
        "backup:3:partial",
    ],
}


def _run(out, kind, freq, kill=None):
    proc = start(["python", JOB, out, kind, freq] + ([kill] if kill else []))
    code, _, err = finish(proc)
    return code, err


def _assert_readable(out):
    """Every file the job left is complete: the backup and the model."""
    backups = (
        [p for p in (out / "backup").glob("backup-*.weights.h5")]
        if (out / "backup").exists()
        else []
    )
    for path in backups:
        h5_arrays(path)  # h5py raises on a truncated file
    checkpoint = out / "checkpoint.keras"
    if checkpoint.exists():
        with zipfile.ZipFile(checkpoint) as z:
            assert z.testzip() is None
    return backups


def _straight(out, kind):
    """The uninterrupted run; the backup frequency changes no number."""
    code, err = _run(out, kind, "epoch")
    assert code == 0, err[-3000:]
    return out


def _killed_and_resumed(out, kind, freq):
    """One family's kill sequence, then the same command to the end;
    raises AssertionError on a failure."""
    had_backup = False
    for kill in KILLS[kind, freq]:
        code, err = _run(out, kind, freq, kill)
        assert code == -signal.SIGKILL, (kill, code, err[-3000:])
        backups = _assert_readable(out)
        # Once there is a backup, no kill leaves none (or a third).
        assert len(backups) in ((1, 2) if had_backup else (0, 1, 2)), kill
        had_backup = had_backup or bool(backups)
    assert had_backup
    code, err = _run(out, kind, freq)  # the same command, restarted
    assert code == 0, err[-3000:]
    _assert_readable(out)
    assert not (out / "backup").exists()  # deleted at the end
    return out


def _assert_same_end(straight, killed):
    for a, b in zip(
        h5_arrays(straight / "final.weights.h5"),
        h5_arrays(killed / "final.weights.h5"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    logs = [
        json.loads((d / "logs.json").read_text()) for d in (straight, killed)
    ]
    assert logs[0] == logs[1]


@pytest.mark.slow
def test_killed_at_many_moments_resumes_exactly(tmp_path):
    """SIGKILL at moments spread over a run, inside the writes too, with
    backups every epoch and every 2 batches; after every kill the files
    left are complete, and the restarted run ends with the uninterrupted
    run's weights and last logs, bit for bit. The classifier's, the GAN's
    and (with 2-batch backups) a step of its own's (two named optimizers,
    an EMA copy, `normal_noise`) sequences run two at a time (one process
    each at a time; the processes are forked from one that has imported
    TensorFlow, see `forkserver.py`)."""
    kinds = sorted({kind for kind, _ in KILLS})
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        straight = {
            kind: pool.submit(_straight, tmp_path / kind / "straight", kind)
            for kind in kinds
        }
        killed = {
            (kind, freq): pool.submit(
                _killed_and_resumed, tmp_path / kind / freq, kind, freq
            )
            for kind, freq in KILLS
        }
        for (kind, _freq), run in killed.items():
            _assert_same_end(straight[kind].result(), run.result())
