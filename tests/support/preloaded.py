"""Run the project's scripts (`python main.py ...`) in processes forked from one that has already imported them.

Starting Python and importing torch, torchvision and the project takes about 8 s on a 2-core CI machine, most of a
tiny run; the end-to-end tests start dozens of such runs. A fork server pays it once. `start` (a `Popen`) and `run`
(a `subprocess.run`) hand a script's argv, working directory, environment and stdout/stderr file descriptors to
it; it forks, and the child runs the script as `python <script>` would: as `__main__` (`runpy`), with that
argv, `sys.path[0]` the script's folder, exit code, traceback and exit handlers as usual. Each script is a process
of its own that can be signalled (SIGTERM, SIGKILL).

What a fork cannot give anew comes from the server: the modules already imported, the OpenMP settings read when
torch loads (`start` refuses an environment whose OMP_* variables differ from the server's), and the string hash
seed. numpy's global generator is reseeded from the OS as at a fresh start; Python's `random` reseeds itself.
torchrun launches, and the tests of how a script starts (`python -m`, `--help` from another folder), stay real
processes.

Layout: the server (this file, run as a script) forks one monitor per launch; the monitor forks the script's
process, reports its pid, waits for it and reports its exit code (negative for a signal, as `subprocess`), each
as a line on the launch's socket connection. Server and monitors are single-threaded, so every fork is clean.
The server ends when the tests' process does, however it ends (EOF on the server's stdin).
"""
import atexit
import importlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the scripts import, at their start or later (tensorboard: when a run opens its SummaryWriter).
PRELOADED = ("main", "main_cache", "util.eval.fidelity", "util.eval.registry", "torch.utils.tensorboard")
SCRIPTS_AS_MODULES = ("main", "main_cache")  # imported for their imports only; each run executes its file anew
NATIVE_START_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")  # read once, when torch loads OpenMP


def _read_line(connection: socket.socket, timeout: float | None) -> str | None:
    """One newline-terminated line from `connection`; None on timeout or when the peer has closed it."""
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([connection], [], [], timeout)[0]:
            return None
        byte = connection.recv(1)
        if not byte:
            return None
        line += byte
    return line.decode()


class Launched:
    """A script started by the server: the part of `subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], connection: socket.socket, stdout):
        self.args = args
        self.stdout = stdout
        self.returncode = None
        self._connection = connection
        pid = _read_line(connection, timeout=60)
        if pid is None:
            raise RuntimeError(f"the preloading server did not start {args}")
        self.pid = int(pid)

    def _collect(self, timeout: float | None) -> None:
        line = _read_line(self._connection, timeout)
        if line is not None:
            self.returncode = int(line)
            self._connection.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._collect(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._collect(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    def __init__(self, env: dict):
        self.env = env
        folder = tempfile.mkdtemp(prefix="preloaded-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.socket_path = os.path.join(folder, "socket")
        # The server ends when its stdin reaches EOF: when these tests end, however they end.
        self.process = subprocess.Popen([sys.executable, __file__, self.socket_path], cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if ready != "ready\n":
            raise RuntimeError(f"the preloading server did not start (exit {self.process.wait()})")
        atexit.register(self.process.stdin.close)

    def launch(self, args: list[str], env: dict, stdout_fd: int, stderr_fd: int) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(self.socket_path)
        request = json.dumps({"argv": args, "cwd": str(REPO_ROOT), "env": env}).encode() + b"\n"
        socket.send_fds(connection, [request], [stdout_fd, stderr_fd])
        return connection


_server: _Server | None = None


def _server_for(env: dict) -> _Server:
    global _server
    if _server is None:
        _server = _Server(env)
    for name in NATIVE_START_VARIABLES:
        if env.get(name) != _server.env.get(name):
            raise ValueError(f"{name}={env.get(name)!r} differs from the preloading server's "
                             f"{_server.env.get(name)!r}; start this script as a real process")
    return _server


def start(args: list[str], env: dict, stdout: int, stderr: int) -> Launched:
    """`subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, text=True, ...)` through the server.

    stdout: PIPE (read it from `.stdout`) or DEVNULL; stderr: STDOUT or DEVNULL.
    """
    server = _server_for(env)
    with open(os.devnull, "w") as devnull:
        read_end, stdout_fd = os.pipe() if stdout == subprocess.PIPE else (None, devnull.fileno())
        stderr_fd = stdout_fd if stderr == subprocess.STDOUT else devnull.fileno()
        try:
            connection = server.launch(args, env, stdout_fd, stderr_fd)
        finally:
            if read_end is not None:
                os.close(stdout_fd)  # the script holds its own copy: EOF when it ends
    return Launched(args, connection, open(read_end) if read_end is not None else None)


def run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)` through the server; a
    script still running after `timeout` seconds is killed and TimeoutExpired raised."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        server = _server_for(env)
        launched = Launched(args, server.launch(args, env, out.fileno(), err.fileno()), None)
        try:
            launched.wait(timeout)
        except subprocess.TimeoutExpired:
            launched.kill()
            launched.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, launched.returncode, out.read().decode(), err.read().decode())


def _serve(socket_path: str) -> tuple[dict, list[int]]:
    """Accept launches forever; returns only in a forked script process, with its request and descriptors."""
    sys.path[0] = str(REPO_ROOT)
    for name in PRELOADED:
        importlib.import_module(name)
    for name in SCRIPTS_AS_MODULES:
        del sys.modules[name]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        if sys.stdin in select.select([listener, sys.stdin], [], [])[0]:
            os._exit(0)  # the tests have ended (their end of the pipe is closed)
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 2)
        while not message.endswith(b"\n"):
            message += connection.recv(1 << 16)
        if os.fork() == 0:
            listener.close()
            return _monitor(connection, json.loads(message), fds)
        connection.close()
        for fd in fds:
            os.close(fd)
        while True:  # reap the monitors that have finished
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _monitor(connection: socket.socket, request: dict, fds: list[int]) -> tuple[dict, list[int]]:
    pid = os.fork()
    if pid == 0:
        connection.close()
        return request, fds
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    try:
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the test has gone
        pass
    os._exit(0)


def _run_as_main(request: dict, fds: list[int]) -> None:
    """Become `python <argv...>` (the interpreter then exits as it would, with the script's exit code)."""
    with open(os.devnull) as devnull:
        os.dup2(devnull.fileno(), 0)
    for target, fd in zip((1, 2), fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.modules["numpy"].random.seed()
    script = os.path.abspath(request["argv"][0])
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _run_as_main(*_serve(sys.argv[1]))
