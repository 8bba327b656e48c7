"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Keras 3.15's built-in `fit()` fails there (it reduces scalar logs along
axis 0 and builds the model with `strategy.reduce` on a nested batch);
fitcustom's engine works around it in `fitcustom._keras.compat`. Two
workers must train the weights and log the history of a single process
on the same global batches. Every run has a hard timeout and kills only
the process groups the launcher started.
"""

import importlib.util
import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import spawn_worker

from scripts import launch_workers

PROGRAMS = Path(__file__).parent / "programs"
JOB = PROGRAMS / "multiworker_job.py"
COMMON = PROGRAMS / "multiworker_common.py"


@pytest.mark.slow
# The classifier on two workers ends at one process's weights in
# test_preemption's two-worker tests (interrupted and resumed, a superset).
@pytest.mark.parametrize("kind", ["engine", "gan"])
def test_two_workers_train_what_one_process_trains(tmp_path, monkeypatch, kind):
    log = io.StringIO()
    codes = launch_workers.launch(
        [sys.executable, str(JOB), str(tmp_path), kind],
        spawn=spawn_worker,
        workers=2,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3"},
        output=log,
    )
    assert codes == [0, 0], log.getvalue()[-4000:]

    spec = importlib.util.spec_from_file_location(f"job_common_{kind}", COMMON)
    job_common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job_common)
    x, y = job_common.data()
    single = job_common.make_model(kind)
    if kind == "gan":
        y = None
    history = single.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
    ).history
    evaluation = single.evaluate(
        x, y, batch_size=16, verbose=0, return_dict=True
    )
    for index in (0, 1):
        with np.load(tmp_path / f"weights{index}.npz") as f:
            weights = [f[f"arr_{i}"] for i in range(len(f.files))]
        assert_weights_close(single.get_weights(), weights, atol=1e-6)
        logs = json.loads((tmp_path / f"logs{index}.json").read_text())
        assert_history_close(history, logs["history"], rtol=1e-5)
        assert sorted(logs["evaluate"]) == sorted(evaluation)
        if kind == "gan":
            continue  # evaluate() draws per-replica noise: not comparable
        for key, value in evaluation.items():
            assert logs["evaluate"][key] == pytest.approx(value, rel=1e-5)


def test_failing_worker_stops_the_cluster(tmp_path):
    """A worker that dies must not leave its peer blocked forever."""
    script = tmp_path / "die.py"
    script.write_text(
        "import json, os, sys, time\n"
        "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1:\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    log = io.StringIO()
    codes = launch_workers.launch(
        [sys.executable, str(script)],
        workers=2,
        timeout=60,
        output=log,
    )
    assert codes[1] == 3 and codes[0] != 0  # the sleeper was killed


def test_timeout_kills_the_workers(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(120)\n")
    with pytest.raises(TimeoutError, match="did not finish"):
        launch_workers.launch(
            [sys.executable, str(script)],
            workers=2,
            timeout=2,
            output=io.StringIO(),
        )


def test_launcher_command_line_errors(capsys):
    with pytest.raises(SystemExit):
        launch_workers.main(["--workers", "0", "--", "x.py"])
    assert "--workers must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_workers.main(["--", "missing_script.py"])
    assert "no such script" in capsys.readouterr().err


def test_keras_version_guard_names_the_version(monkeypatch):
    from fitcustom._keras import compat as _compat

    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(RuntimeError, match="3.99.0"):
        _compat.check_keras_version("Multi-worker training", strict=True)
