"""A fork server for the tests' fresh processes.

Most of a test program's time here is importing TensorFlow and Keras
(about 6.5 s of CPU on this project's 2-core machine, for a run of a few
seconds). The server imports them once, runs nothing, and forks a child
per program: a child has the modules loaded and nothing else (no graph
traced, no TensorFlow runtime started), so it computes what a fresh
`python program.py` computes, in its own process with its own pid,
session, exit status and signals.

`spawn(argv, cwd, env)` returns a `ForkedProcess`, which behaves as the
`subprocess.Popen` of `helpers.start` (pid, text pipes, `poll`, `wait`,
`communicate`, `send_signal`); `helpers.start` uses it for `python FILE`
commands, and falls back to `subprocess.Popen` when the server is off
(`FITCUSTOM_TESTS_FORK=0`), cannot start, or the command's environment
differs from the server's where TensorFlow reads it at import.

    python tests/forkserver.py SOCKET     (started by `spawn`)
"""

import atexit
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

#: Environment variables read at import (by TensorFlow, Keras, Python):
#: a command whose values differ from the server's runs unforked.
_IMPORT_TIME = ("TF_", "KERAS_", "XLA_", "CUDA_", "OMP_", "MKL_", "PYTHON")
_SKIP_COMPARE = {
    "PYTHONPATH",  # added to the child's sys.path instead
    "TF_CONFIG",  # read when a strategy is made, not at import
}

_server = None
_lock = threading.Lock()


class ForkedProcess:
    """A child of the fork server, used as a `subprocess.Popen`."""

    def __init__(self, pid, control, stdout, stderr, args):
        self.pid = pid
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = None
        self.returncode = None
        self._control = control

    def poll(self):
        if self.returncode is None:
            ready, _, _ = select.select([self._control], [], [], 0)
            if ready:
                self._read_status()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            ready, _, _ = select.select([self._control], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self):
        data = self._control.recv(64)  # one message: "STATUS\n"
        self._control.close()
        if not data:
            raise RuntimeError(
                f"The fork server ended before child {self.pid} did: its "
                "exit status is lost. Rerun with FITCUSTOM_TESTS_FORK=0."
            )
        self.returncode = int(data)

    def send_signal(self, number):
        if self.returncode is None:
            os.kill(self.pid, number)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout=None):
        """Reads both pipes to their end and waits, as Popen does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = {}

        def read(name, stream):
            results[name] = stream.read() if stream is not None else None

        threads = [
            threading.Thread(target=read, args=(n, s), daemon=True)
            for n, s in (("out", self.stdout), ("err", self.stderr))
        ]
        for t in threads:
            t.start()
        for t in threads:
            left = None if deadline is None else deadline - time.monotonic()
            t.join(left if left is None else max(left, 0))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        self.wait(left)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return results["out"], results["err"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


class _Server:
    def __init__(self, env):
        folder = os.environ.get("TMPDIR", "/tmp")
        self.path = os.path.join(
            folder, f"fitcustom-fork-{os.getpid()}-{id(self)}.sock"
        )
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path],
            env=self.env,
            stdin=subprocess.PIPE,  # the server ends at its EOF
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the fork server did not start: {line!r}")
        atexit.register(self.close)

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if os.path.exists(self.path):
            os.remove(self.path)

    def compatible(self, env):
        def keys(e):
            return {
                k: v
                for k, v in e.items()
                if k.startswith(_IMPORT_TIME) and k not in _SKIP_COMPARE
            }

        return keys(env) == keys(self.env)


def _get_server(env):
    global _server
    with _lock:
        if _server is None or not _server.alive():
            _server = _Server(env)
        return _server


def enabled():
    return os.environ.get("FITCUSTOM_TESTS_FORK", "1") != "0"


def spawn(argv, cwd, env, merge_stderr=False):
    """Runs `python argv[0] argv[1:]` as a child of the fork server;
    returns a `ForkedProcess`, or `None` when it cannot (the caller then
    starts the process itself)."""
    if not enabled():
        return None
    try:
        server = _get_server(env)
    except (OSError, RuntimeError):
        return None
    if not server.compatible(env):
        return None
    out_r, out_w = os.pipe()
    if merge_stderr:
        err_r, err_w = None, out_w
    else:
        err_r, err_w = os.pipe()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = json.dumps(
        {
            "argv": [str(a) for a in argv],
            "cwd": str(cwd or os.getcwd()),
            "env": dict(env),
        }
    ).encode()
    try:
        control.connect(server.path)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            socket.send_fds(control, [request], [null, out_w, err_w])
        finally:
            os.close(null)
        reply = control.recv(64)
    except OSError:
        control.close()
        for fd in (out_r, out_w, err_r, err_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return None
    os.close(out_w)
    if err_r is not None:
        os.close(err_w)
    stdout = open(out_r, encoding="utf-8", errors="replace")
    stderr = None
    if err_r is not None:
        stderr = open(err_r, encoding="utf-8", errors="replace")
    return ForkedProcess(int(reply), control, stdout, stderr, argv)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


def _status(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _serve(path):
    import keras  # noqa: F401
    import numpy  # noqa: F401
    import tensorflow  # noqa: F401

    import fitcustom  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.buffer.read1(64):
            break  # the test process is gone
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{_status(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                others = list(children.values())
                _child(request, fds, [listener, conn, wake_r, wake_w] + others)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            conn.sendall(f"{pid}\n".encode())
    listener.close()


def _child(request, fds, inherited):
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for item in inherited:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
        os.setsid()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in set(fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        sys.argv = list(request["argv"])
        extra = [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
        ]
        sys.path[0:1] = [os.path.dirname(script)] + extra
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1])
