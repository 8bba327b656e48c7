"""The fork server behind `helpers.start`: a forked program behaves as
`python FILE` does (arguments, folder, environment, output, exit status,
signals, a fresh TensorFlow), so the tests that run programs in fresh
processes test what a user's command does."""

import os
import re
import signal
import subprocess
import sys

import forkserver
import pytest
from helpers import finish
from helpers import start

PROGRAM = """
import os, sys, time
import tensorflow as tf
print("args", sys.argv[1:], flush=True)
print("cwd", os.getcwd(), flush=True)
print("env", os.environ.get("MARK"), flush=True)
print("executed", tf.executing_eagerly(), len(tf.config.list_logical_devices()))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "wait":
    print("waiting", flush=True)
    time.sleep(60)
if mode == "raise":
    raise RuntimeError("boom")
sys.exit(int(mode))
"""


# What TensorFlow 2.21 prints while it loads on a CPU where oneDNN is on,
# whatever TF_CPP_MIN_LOG_LEVEL says (abseil's banner, oneDNN's notice): a
# forked program's TensorFlow was loaded by the server, so it prints none.
LOADING_NOTICE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\)"
    r"|^I\d{4} \S+ +\d+ port\.cc:\d+\] oneDNN custom operations are on"
)


def without_loading_notices(text):
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if not LOADING_NOTICE.match(line))


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return path


def test_a_forked_program_runs_as_python_runs_it(program, tmp_path):
    results = []
    for forked in (True, False):
        command = ["python" if forked else sys.executable, program, "3"]
        proc = start(command, cwd=tmp_path, MARK="here")
        assert isinstance(proc, forkserver.ForkedProcess) == forked
        results.append(finish(proc, timeout=120))
    forked, plain = results
    assert forked == plain[:2] + (without_loading_notices(plain[2]),)
    assert forked[0] == 3 and "to stderr" in forked[2]
    lines = forked[1].splitlines()
    expected = ["args ['3']", f"cwd {tmp_path}", "env here", "executed True 1"]
    assert all(line in lines for line in expected), lines


@pytest.mark.parametrize("mode, code", [("0", 0), ("raise", 1)])
def test_a_forked_program_exits_with_its_status(program, mode, code):
    proc = start(["python", program, mode])
    assert isinstance(proc, forkserver.ForkedProcess)
    status, _, err = finish(proc, timeout=120)
    assert status == code
    assert ("RuntimeError: boom" in err) == (mode == "raise")


@pytest.mark.parametrize("number", [signal.SIGKILL, signal.SIGTERM])
def test_a_signal_ends_a_forked_program_as_it_ends_python(program, number):
    proc = start(["python", program, "wait"])
    assert isinstance(proc, forkserver.ForkedProcess)
    for line in proc.stdout:
        if line.strip() == "waiting":
            break
    assert proc.poll() is None
    proc.send_signal(number)
    assert proc.wait(30) == -number
    proc.communicate()


def test_a_program_past_its_timeout_is_killed(program):
    proc = start(["python", program, "wait"])
    with pytest.raises(subprocess.TimeoutExpired):
        finish(proc, timeout=3)
    assert proc.wait(30) == -signal.SIGKILL


def test_other_import_time_variables_start_python(program, tmp_path):
    proc = start(["python", program, "0"], TF_ENABLE_ONEDNN_OPTS="0")
    assert not isinstance(proc, forkserver.ForkedProcess)
    assert finish(proc, timeout=120)[0] == 0


def test_a_worker_of_the_launcher_is_forked_with_its_tf_config(tmp_path):
    """TF_CONFIG is read when a strategy is made, not at import: a
    launcher's worker (`helpers.spawn_worker`) is forked and sees its own
    TF_CONFIG."""
    from helpers import spawn_worker

    path = tmp_path / "worker.py"
    path.write_text("import os\nprint(os.environ['TF_CONFIG'], flush=True)\n")
    # As the launches of the tests: their TF_CPP_MIN_LOG_LEVEL is the one
    # of helpers.start (read at import, compared).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG='{"x": 1}')
    proc = spawn_worker([sys.executable, str(path)], env)
    assert isinstance(proc, forkserver.ForkedProcess)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == '{"x": 1}'
