"""Starts N local workers of a script under MultiWorkerMirroredStrategy.

Each worker is a separate process on 127.0.0.1 with its own `TF_CONFIG`
(cluster of N workers on free local ports, its task index) and its own
process group. The script must create
`tf.distribute.MultiWorkerMirroredStrategy()` and build/compile the model
under its scope; with fitcustom models `fit()` and `evaluate()` then work
across the workers. Output lines are prefixed with the worker index. If a
worker fails or the timeout passes, every worker is killed (only the
process groups this launcher started) and the exit code is non-zero.

A preemption notice to the launcher (SIGTERM, SIGUSR1) is
passed on to every worker, so that `fitcustom.BackupAndRestore` in each
saves at the same step; the launcher then waits for them and exits with
their status (143 after SIGTERM). A worker that exits with such a status
is given `GRACE` seconds for its peers to finish their backup before they
are killed.

Usage:
    python -m scripts.launch_workers --workers 2 --timeout 600 -- \\
        my_training_script.py --its-own args
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    """The `TF_CONFIG` of worker `index` in a cluster on `ports`."""
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def _pump(stream, prefix, sink):
    for line in stream:
        sink.write(f"{prefix}{line}")
        sink.flush()


#: Signals passed on to the workers.
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
#: Exit statuses of a worker stopped by a notice (128 + the signal).
NOTICE_STATUSES = {128 + s for s in FORWARDED}
#: Seconds the other workers get after one exits with a notice status.
GRACE = 60.0


def launch(
    command,
    workers=2,
    timeout=600.0,
    env=None,
    output=None,
    grace=GRACE,
    spawn=None,
):
    """Runs `command` (argv list) as `workers` local workers.

    Args:
        command: The command each worker runs, e.g.
            `[sys.executable, "train.py"]`.
        workers: Number of worker processes (>= 1).
        timeout: Seconds before every worker is killed.
        env: Extra environment variables for every worker.
        output: Where prefixed output goes. Defaults to `sys.stdout`.
        grace: Seconds the other workers get to finish after one exits
            with a notice status (`NOTICE_STATUSES`), before they are
            killed.
        spawn: Starts one worker: `spawn(command, env)` returns an object
            that behaves as the `subprocess.Popen` of `start_worker`, the
            default (`poll`, `wait`, `pid`, `returncode`, `stdout`).

    Returns:
        The list of worker exit codes (all 0 on success).

    Raises:
        TimeoutError: The workers did not finish within `timeout`; they
            have been killed.
    """
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1. Received: {workers}.")
    output = output or sys.stdout
    ports = free_ports(workers)
    procs, pumps = [], []
    previous = _forward_signals(procs)
    try:
        for index in range(workers):
            worker_env = dict(os.environ, **(env or {}))
            worker_env["TF_CONFIG"] = tf_config(ports, index)
            proc = (spawn or start_worker)(command, worker_env)
            procs.append(proc)
            pump = threading.Thread(
                target=_pump,
                args=(proc.stdout, f"[worker {index}] ", output),
                daemon=True,
            )
            pump.start()
            pumps.append(pump)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            codes = {p.poll() for p in procs} - {None, 0}
            if codes - NOTICE_STATUSES:
                break  # one failed: its peers would wait forever
            if codes:  # one stopped after a notice: the others follow
                deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() > deadline:
                if codes:
                    break
                raise TimeoutError(
                    f"{workers} workers did not finish within {timeout} s; "
                    "they were killed."
                )
            time.sleep(0.1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
    return [p.returncode for p in procs]


def start_worker(command, env):
    """How `launch` starts a worker by default: `command` with `env`, in
    a session of its own (so that its process group can be signalled),
    stdout a text pipe with stderr merged into it."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _forward_signals(procs):
    """Passes `FORWARDED` signals on to the process groups of `procs`
    (main thread only); returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(number, frame):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, number)
                except ProcessLookupError:
                    pass

    return {number: signal.signal(number, forward) for number in FORWARDED}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [--workers N] [--timeout S] -- script.py [args...]",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the training script after --, e.g. -- train.py")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    if command[0].endswith(".py"):
        if not os.path.isfile(command[0]):
            parser.error(f"no such script: {command[0]}")
        command = [sys.executable] + command
    try:
        codes = launch(command, args.workers, args.timeout)
    except TimeoutError as e:
        sys.exit(f"error: {e}")
    if len(set(codes)) == 1 and codes[0] in NOTICE_STATUSES:
        print(
            f"Every worker stopped after a notice (status {codes[0]}); "
            "run the same command to resume.",
            file=sys.stderr,
        )
        sys.exit(codes[0])
    if any(codes):
        sys.exit(f"error: worker exit codes {codes}")
    return codes


if __name__ == "__main__":
    main()
