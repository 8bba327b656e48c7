"""A preemption notice (SIGTERM, SIGUSR1) during fit() becomes a backup at
the current step and an exit; the same command then resumes exactly,
with the callbacks' state (EarlyStopping's best weights and patience), on
one process and on two workers. Every run has a hard timeout and signals
or kills only the processes (groups) it started."""

import importlib.util
import io
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from helpers import assert_weights_close
from helpers import finish
from helpers import h5_arrays
from helpers import signal_at
from helpers import spawn_worker
from helpers import start

import fitcustom
from scripts import launch_workers

JOB = Path(__file__).parent / "programs" / "preempt_job.py"


def _start(out, kind, signals=None, **env):
    command = ["python", JOB, out, kind] + ([signals] if signals else [])
    return start(command, **env)


def _run(out, kind, notice=None, at=None, signals=None, **env):
    """Runs the job; with `notice`, sends it once the job reports the
    batch `at` = (epoch, batch). Returns (exit code, stdout lines,
    stderr)."""
    proc = _start(out, kind, signals, **env)
    seen = []
    if notice is not None:
        seen = signal_at(proc, f"at {at[0]} {at[1]}", notice)
    code, rest, err = finish(proc)
    return code, [line.strip() for line in seen] + rest.splitlines(), err


def _result(out):
    result = json.loads((out / "result.json").read_text())
    history = result.pop("history")
    return result, {k: v[-1] for k, v in history.items()}


def _assert_same_end(straight, out):
    """The run in `out` ended bit for bit where the uninterrupted one in
    `straight` did (weights and optimizer step counters: no batch twice),
    its EarlyStopping stopping at the same epoch with the same best (its
    state was in the backup) and ModelCheckpoint keeping its best; the
    history the runs in `out` wrote one after the other (CSVLogger)
    holds each epoch once, with the uninterrupted run's numbers."""
    for a, b in zip(
        h5_arrays(straight / "final.weights.h5"),
        h5_arrays(out / "final.weights.h5"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert _result(out) == _result(straight)
    chained = (out / "history.csv").read_text().splitlines()
    assert chained == (straight / "history.csv").read_text().splitlines()


def _positions(lines):
    """The `(epoch, batch)` the job reported, in order."""
    return [
        tuple(int(v) for v in line.split()[1:])
        for line in lines
        if line.startswith("at ")
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs of both jobs (their EarlyStopping stops both
    after epoch 2, restoring epoch 1's weights)."""
    found = {}
    for kind in ("classifier", "gan"):
        out = tmp_path_factory.mktemp(f"straight_{kind}")
        code, _, err = finish(_start(out, kind))
        assert code == 0, err[-3000:]
        found[kind] = out
    return found


CASES = {
    # kind, notice, batch reported when it is sent: (epoch, batch)
    "classifier_sigterm": ("classifier", signal.SIGTERM, (1, 2)),
    "gan_sigusr1": ("gan", signal.SIGUSR1, (0, 3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_notice_saves_at_the_step_and_the_rerun_resumes_exactly(
    tmp_path, straight, case
):
    kind, notice, at = CASES[case]
    code, lines, err = _run(tmp_path, kind, notice, at)
    assert code == 128 + notice, err[-3000:]
    assert f"{notice.name} received" in err
    # Saved at the step where the notice was seen: after the last batch
    # the job reported, not at the last epoch's end.
    last = _positions(lines)[-1]
    assert last[0] == at[0] and last[1] >= at[1]
    progress = fitcustom.BackupAndRestore.progress(tmp_path / "backup")
    assert progress == (last[0], last[1] + 1)
    code, lines, err = _run(tmp_path, kind)  # the same command again
    assert code == 0, err[-3000:]
    assert not (tmp_path / "backup").exists()
    _assert_same_end(straight[kind], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_notices_backup_write(
    tmp_path, straight, second
):
    """A second SIGTERM while the notice's backup is written is only noted:
    the write completes and the job exits 143 as for one notice. Ctrl-C
    (SIGINT) then interrupts the write: the job ends at once, the last
    backup (epoch 0's end) is kept whole and no partial file is left.
    Either way the same command resumes and ends bit for bit at the
    uninterrupted run."""
    code, _, err = _run(
        tmp_path, "classifier", signal.SIGTERM, (1, 2), SECOND=second
    )
    backup = tmp_path / "backup"
    progress = fitcustom.BackupAndRestore.progress(backup)
    if second == "SIGTERM":
        assert code == 143 and "SIGTERM received" in err, err[-3000:]
        assert progress[0] == 1 and progress[1] >= 3, progress
    else:
        assert code not in (0, 143) and "KeyboardInterrupt" in err, (
            code,
            err[-3000:],
        )
        assert progress == (1, 0), progress
    leftovers = [
        p.name
        for p in backup.iterdir()
        if p.name.startswith(fitcustom.checkpoints.TEMP_PREFIX)
    ]
    assert leftovers == []
    code, _, err = _run(tmp_path, "classifier")
    assert code == 0, err[-3000:]
    _assert_same_end(straight["classifier"], tmp_path)


#: Batches in an epoch of the jobs.
BATCHES = 6
#: The time a job may take from the notice to its exit (Kubernetes'
#: default grace period); measured here: under 1 s.
GRACE = 30


def _noticed(out, kind, at, delay=0.0, **env):
    """Runs the job, sends SIGTERM `delay` seconds after it reports the
    global step `at` (None: no notice); returns (exit code, steps
    reported, seconds from the notice to the exit, stderr); the steps
    start with the steps trained before the run."""
    proc = start(["python", JOB, out, kind], **env)
    seen = []
    if at is not None:
        line = f"at {at // BATCHES} {at % BATCHES}"

        def reached(text):
            if text.strip() != line:
                return False
            time.sleep(delay)
            return True

        seen = signal_at(proc, reached, signal.SIGTERM)
    sent = time.monotonic()
    code, rest, err = finish(proc, timeout=GRACE if at is not None else None)
    lines = [line.strip() for line in seen] + rest.splitlines()
    steps = [e * BATCHES + b for e, b in _positions(lines)]
    first = [int(t.split()[1]) for t in lines if t.startswith("iteration")]
    return code, first + steps, time.monotonic() - sent, err


#: EarlyStopping's patience of the long runs: all 8 epochs (48 steps).
LONG = {"PATIENCE": "8"}


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory):
    """Uninterrupted runs of both jobs through their 8 epochs."""
    found = {}
    for kind in ("classifier", "gan"):
        out = tmp_path_factory.mktemp(f"long_{kind}")
        code, _, err = finish(_start(out, kind, **LONG))
        assert code == 0, err[-3000:]
        found[kind] = out
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "gan"])
def test_notices_at_random_moments_each_exit_and_resume_at_their_step(
    tmp_path, straight_long, kind
):
    """Ten notices, each to a fresh process running the same command: one
    in the backup write of epoch 0's end (its temporary file complete,
    not yet in place), then nine after random steps, each at a random
    time up to 0.1 s after the step's end (in the job's 50 ms pause
    between steps, or in the next step). Each process exits 143 by itself
    within GRACE seconds, each rerun trains first the step after the one
    its predecessor saved, and the last run ends bit for bit at the
    uninterrupted run (the GAN's EMA generator included), the history
    the eleven processes wrote holding each epoch once."""
    result = json.loads((straight_long[kind] / "result.json").read_text())
    epochs = len(result["history"]["loss"])
    assert epochs == 8
    # Notices after steps of epoch 1 on (its first is saved by the notice
    # in the write), at least 2 apart (a notice may be saved at the step
    # after it), none after the run's last steps.
    rng = np.random.default_rng(26 if kind == "classifier" else 27)
    last = epochs * BATCHES - 3
    picks = rng.choice(np.arange(BATCHES + 1, last - 2 * 8 + 1), 9, False)
    moments = [int(p) + 2 * i for i, p in enumerate(sorted(picks))]
    delays = rng.uniform(0.0, 0.1, size=len(moments))
    code, steps, took, err = _noticed(
        tmp_path, kind, None, NOTICE_IN_BACKUP="0", **LONG
    )
    # The notice came in the write: that backup is in place, and the step
    # running next (epoch 1's first) is saved.
    assert code == 143 and "SIGTERM received" in err, err[-3000:]
    assert steps == [0] + list(range(BATCHES + 1)), steps
    exits = []
    for at, delay in zip(moments + [None], list(delays) + [0.0]):
        trained = steps[-1] + 1
        code, steps, took, err = _noticed(tmp_path, kind, at, delay, **LONG)
        # It trains first the step after the last one saved: the steps
        # before were trained, none twice.
        assert steps[0] == trained, (steps, trained)
        if at is None:
            assert code == 0, err[-3000:]
            break
        assert code == 143 and "SIGTERM received" in err, (
            at,
            steps,
            err[-3000:],
        )
        # Saved at the step running when the notice came, or the next
        # one if the notice came between two.
        assert steps[-1] in (at, at + 1), (steps, at)
        exits.append(round(took, 2))
    assert len(exits) == 9
    print(f"{kind}: notices after steps {moments}; exits after {exits} s")
    _assert_same_end(straight_long[kind], tmp_path)


@pytest.mark.slow
def test_without_preemption_signals_a_notice_loses_the_epoch(tmp_path):
    # The control: the same notice with the handling off kills the job at
    # once; the backup is the one of the last epoch's end.
    code, lines, err = _run(
        tmp_path, "classifier", signal.SIGTERM, (1, 2), signals="none"
    )
    assert code == -signal.SIGTERM, err[-3000:]
    assert fitcustom.BackupAndRestore.progress(tmp_path / "backup") == (1, 0)


# ---------------------------------------------------------------------------
# Several workers (MultiWorkerMirroredStrategy on 127.0.0.1)
# ---------------------------------------------------------------------------

MULTIWORKER_JOB = (
    Path(__file__).parent / "programs" / ("multiworker_preempt_job.py")
)


@pytest.fixture(scope="module")
def one_process():
    """The weights one process trains on the workers' global batches."""
    spec = importlib.util.spec_from_file_location(
        "preempt_common",
        Path(__file__).parent / "programs" / "multiworker_common.py",
    )
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    x, y = common.data()
    model = common.make_model("classifier")
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return model.get_weights()


def _worker_weights(out, index):
    with np.load(out / f"weights{index}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _launch(out, backup, env=None):
    log = io.StringIO()
    codes = launch_workers.launch(
        [sys.executable, str(MULTIWORKER_JOB), str(out), backup],
        spawn=spawn_worker,
        workers=2,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
        output=log,
    )
    return codes, log.getvalue()


@pytest.mark.slow
def test_notices_and_a_kill_during_a_two_worker_run_resume_exactly(
    tmp_path, one_process
):
    # First a notice that reaches worker 1 only, after a random batch of
    # epoch 0: worker 0 learns of it at the next batch's agreement, and
    # both save after the same batch (one backup directory for both).
    batches = 4  # 64 samples, global batches of 16
    noticed = int(np.random.default_rng(262).integers(0, batches - 1))
    notice = {"NOTICE": f"1:0:{noticed}:SIGTERM"}
    codes, log = _launch(tmp_path, "shared", notice)
    assert codes == [143, 143], log[-4000:]
    assert log.count("SIGTERM received") == 2, log[-4000:]
    backup = tmp_path / "backup"
    epochs, done = fitcustom.BackupAndRestore.progress(backup)
    # Saved after the noticed batch, or the next one (when the notice came
    # after this batch's agreement).
    assert epochs * batches + done - 1 in (noticed, noticed + 1), (
        (epochs, done),
        noticed,
        log[-4000:],
    )
    # The same command, through the launcher's command line; a SIGTERM to
    # the launcher alone is passed on to both workers, and the launcher
    # exits with their status.
    command = ["python", "-m", "scripts.launch_workers", "--workers", "2"]
    command += ["--timeout", "300", "--", MULTIWORKER_JOB, tmp_path, "shared"]
    proc = start(command, cwd=ROOT, merge_stderr=True)
    # The launcher only.
    seen = signal_at(proc, "[worker 0] at 1 1", signal.SIGTERM)
    code, rest, _ = finish(proc)
    log = "".join(seen) + rest
    assert code == 143, log[-4000:]
    assert log.count("SIGTERM received") == 2, log[-4000:]
    epochs, done = fitcustom.BackupAndRestore.progress(backup)
    assert epochs == 1 and done >= 2, log[-4000:]
    # Then worker 1 dies without notice in epoch 3 (its peer is killed by
    # the launcher): the run goes on from the backup of epoch 2's end.
    codes, log = _launch(tmp_path, "shared", {"KILL": "1:2:1"})
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, log[-4000:]
    assert fitcustom.BackupAndRestore.progress(backup) == (2, 0), log[-4000:]
    codes, log = _launch(tmp_path, "shared")  # and once more, to the end
    assert codes == [0, 0], log[-4000:]
    for index in (0, 1):
        assert_weights_close(
            one_process, _worker_weights(tmp_path, index), atol=1e-6
        )


@pytest.mark.slow
def test_a_notice_to_worker_1_and_a_kill_with_a_backup_per_worker(
    tmp_path, one_process
):
    """One backup directory per worker. A notice to worker 1 at a random
    step: worker 0 learns of it through the agreement and both save after
    the same batch; then worker 0 dies without notice at a later random
    step; the relaunches end at one process's weights."""
    rng = np.random.default_rng(261)
    batches = 4  # 64 samples, global batches of 16
    noticed, killed = sorted(rng.choice(np.arange(1, 11), 2, replace=False))
    at = f"{noticed // batches}:{noticed % batches}"
    codes, log = _launch(tmp_path, "per_worker", {"NOTICE": f"1:{at}:SIGTERM"})
    assert codes == [143, 143], log[-4000:]
    assert log.count("SIGTERM received") == 2, log[-4000:]
    backups = [tmp_path / "backup0", tmp_path / "backup1"]
    progress = [fitcustom.BackupAndRestore.progress(b) for b in backups]
    epoch, done = progress[0]
    # Saved after the noticed batch, or the next one (when the notice came
    # after this batch's agreement).
    assert epoch * batches + done - 1 in (noticed, noticed + 1), (
        progress,
        noticed,
    )
    assert progress[1] == progress[0], progress
    at = f"{killed // batches}:{killed % batches}"
    codes, log = _launch(tmp_path, "per_worker", {"KILL": f"0:{at}"})
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, log[-4000:]
    after_kill = [fitcustom.BackupAndRestore.progress(b) for b in backups]
    assert after_kill[0] == after_kill[1], after_kill
    codes, log = _launch(tmp_path, "per_worker")
    assert codes == [0, 0], log[-4000:]
    print(f"notice after step {noticed}, kill after step {killed}: {progress}")
    for index in (0, 1):
        assert_weights_close(
            one_process, _worker_weights(tmp_path, index), atol=1e-6
        )


# ---------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_run_sh_passes_a_notice_on_to_the_training_script(tmp_path):
    """run.sh runs each part through `forward` (scripts/_forward.sh): a
    SIGTERM to the shell reaches the training script, which saves at the
    step and exits 143; the same command resumes there."""
    command = (
        'source scripts/_forward.sh && forward "$@"; status=$?; '
        'echo "status $status"; exit $status'
    )
    train = [
        sys.executable,
        "-m",
        "scripts.train_classifier",
        "--output-dir",
        str(tmp_path),
        "--epochs",
        "400",
        "--patience",
        "400",
        "--batch-size",
        "8",
        "--verbose",
        "2",
    ]

    def run(until):
        proc = start(["bash", "-c", command, "bash", *train], ROOT, True)
        # The shell only.
        seen = signal_at(proc, lambda line: until in line, signal.SIGTERM)
        code, rest, _ = finish(proc)
        return code, "".join(seen) + rest

    code, log = run("Epoch 3/400")
    assert code == 143, log[-3000:]
    assert "SIGTERM received" in log and "status 143" in log, log[-3000:]
    epochs, _ = fitcustom.BackupAndRestore.progress(tmp_path / "backup")
    assert epochs >= 2, log[-3000:]
    code, log = run("Epoch ")
    assert f"Resuming the interrupted run in {tmp_path} after {epochs}" in log
    assert code == 143, log[-3000:]
