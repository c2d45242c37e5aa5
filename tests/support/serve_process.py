"""`python -m graceful_http ...` as a plain process on this machine (no systemd), for tests.

`run_cli` runs a command that is expected to end (check, reload, a serve that
must fail to start). `ServeProcess` starts a server on a free port with a
marker variable that every generation inherits, so teardown can kill whatever
is left, whichever generation it is; with `pid_file=True` it also follows the
service across reloads (which pid is main, when a new one has taken over).
Waits poll for an event (the pid file, /proc, a log line) with a deadline.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness import container
from harness.processes import alive, children, free_port
from support.load import get, pid_of

REPO = Path(__file__).resolve().parents[2]
SERVICE_DIR = REPO / "service"
HOST = "127.0.0.1"
ENGINES = {"pypi": sys.executable, "debian": "/usr/bin/python3"}
MARKER = "GRACEFUL_HTTP_TEST_SERVER"

# Runs as the would-be server: puts the fds named in argv[1] at 3, 4, … (as systemd does), sets
# LISTEN_PID=<its own pid> when asked to ("self"), and execs the rest of argv, keeping its pid.
WITH_FDS = """\
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
for fd in moved:
    os.close(fd)
if os.environ.get("LISTEN_PID") == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def installed_engine(name: str) -> str:
    """Engine `name`'s interpreter; a test that needs a missing engine fails loudly (it never skips)."""
    path = ENGINES[name]
    if not os.access(path, os.X_OK):
        pytest.fail(f"engine {name!r}: {path} is not installed")
    return path


def wait_until(predicate, timeout: float, what: str, diagnostics=lambda: ""):
    """harness.container's wait_until, failing as an assertion with `diagnostics()` (a log tail) attached."""
    try:
        return container.wait_until(predicate, timeout, interval=0.01, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{diagnostics()}") from None


def clean_environ(**extra: str) -> dict[str, str]:
    """The runner's environment without anything systemd or a parent generation would have set."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "GRACEFUL_HTTP_", "WATCHDOG_"))
               and k not in ("NOTIFY_SOCKET", "MAINPID", "JOURNAL_STREAM", "PYTHONHOME", "INVOCATION_ID",
                            "FORWARDED_ALLOW_IPS")}
    environ.update({"PYTHONPATH": str(SERVICE_DIR), "PYTHONDONTWRITEBYTECODE": "1", **extra})  # extra may move the code
    return environ


def cli_command(python: str, *args: str, fds: list[int] | None = None) -> list[str]:
    """`python -m graceful_http ARGS`; with `fds` (even none), through a shim that passes them as systemd does."""
    command = [python, "-m", "graceful_http", *args]
    return command if fds is None else [python, "-c", WITH_FDS, ",".join(map(str, fds)), *command]


def run_cli(python: str, *args: str, cwd: str | Path | None = None, timeout: float = 30,
            fds: list[int] | None = None, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m graceful_http ARGS`, to its end; its own session, killed whole on timeout."""
    process = subprocess.Popen(cli_command(python, *args, fds=fds), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_environ(**(environ or {})), cwd=cwd, start_new_session=True,
                               pass_fds=fds or ())
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"`graceful_http {' '.join(args)}` did not end within {timeout}s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def marked_processes(name: str, value: str) -> set[int]:
    """Live processes whose environment has name=value: every generation and worker a test started."""
    needle = f"{name}={value}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as file:
                    if needle in file.read().split(b"\0") and alive(int(entry)):
                        found.add(int(entry))
            except OSError:
                continue
    return found


class ServeProcess:
    """A `serve` started by a test (all its generations); a context manager that kills them all."""

    def __init__(self, python: str, directory: Path, *args: str, port: int | None = None, bind: bool = True,
                 pid_file: bool = False, pass_fds: list[int] | None = None, environ: dict[str, str] | None = None,
                 open_files: tuple[int, int] | None = None, stable_pid: bool = False, prefix: tuple[str, ...] = ()):
        """`serve ARGS`, plus `--bind 127.0.0.1:PORT` (a free port) unless `bind` is false, `--pid-file` in
        `directory` if `pid_file`; `pass_fds` are passed at 3, 4, … and `environ` is added, as systemd would;
        `open_files` is the (soft, hard) RLIMIT_NOFILE it starts with. Without `stable_pid` it runs with
        `--no-stable-pid`: the first generation is the process started. `prefix` goes before the command
        (e.g. `unshare ...` to make it PID 1 of a namespace)."""
        self.python = python
        self.prefix = list(prefix)
        self.directory = Path(directory)
        self.port = port or free_port()
        name = f"serve-{uuid.uuid4().hex[:8]}"
        self.pid_file = self.directory / f"{name}.pid" if pid_file else None
        self.log_path = self.directory / f"{name}.log"
        self.args = [*args, *(["--bind", f"{HOST}:{self.port}"] if bind else []),
                     *(["--pid-file", str(self.pid_file)] if pid_file else []),
                     *([] if stable_pid else ["--no-stable-pid"])]
        self.pass_fds = pass_fds
        self.open_files = open_files
        self.marker = uuid.uuid4().hex
        self.environ = {**(environ or {}), MARKER: self.marker}
        self.command: list[str] = []
        self.popen: subprocess.Popen | None = None

    def start(self, *args: str) -> "ServeProcess":
        """Start it, with ARGS before the constructor's (so a fixture can make it and a test choose them)."""
        assert self.popen is None, "started twice"
        self.command = [*self.prefix, *cli_command(self.python, "serve", *args, *self.args, fds=self.pass_fds)]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=clean_environ(**self.environ), cwd=self.directory,
                                          start_new_session=True, pass_fds=self.pass_fds or (),
                                          preexec_fn=self._limit_open_files if self.open_files else None)
        return self

    def _limit_open_files(self) -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill_all()

    # -- looking

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def main_pid(self) -> int | None:
        """The pid the pid file names (None while there is none); needs `pid_file=True`."""
        assert self.pid_file is not None, "this server has no pid file of ours"
        try:
            text = self.pid_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "--- server log (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def processes(self) -> set[int]:
        """Live processes carrying this server's marker: every generation, whoever started it."""
        return marked_processes(MARKER, self.marker)

    def generation(self, main: int) -> set[int]:
        """The processes of the generation whose main is `main`: it and its children (its workers, or with one
        process its standby)."""
        return {main, *children(main)}

    def wait_only(self, main: int, timeout: float = 20) -> None:
        """Wait until the generation of `main` is all that is left (an old main's standby ends a moment after
        it)."""
        wait_until(lambda: self.processes() == self.generation(main), timeout,
                   f"only the generation of pid {main} to be left", lambda: f"{self.processes()}\n{self.log_tail()}")

    def get_pid(self, path: str = "/") -> int:
        """The pid that answers GET path (the demo app names it)."""
        status, body, _ = get(HOST, self.port, path, timeout=10)
        assert status == 200, (status, body)
        return pid_of(body)

    # -- waiting

    def wait_serving(self, path: str = "/", timeout: float = 20) -> tuple[int, bytes, dict]:
        """Until GET path answers 200 and, with our pid file, that names the first generation as main
        (fails at once if the process exited)."""
        def answered():
            if self.popen.poll() is not None:
                raise AssertionError(f"serve exited with {self.popen.returncode}\n{self.log_tail()}")
            if self.pid_file is not None and self.main_pid() != self.pid:
                return None
            try:
                response = get(HOST, self.port, path, timeout=5)
            except OSError:
                return None
            return response if response[0] == 200 else None
        return wait_until(answered, timeout, f"pid {self.pid} to answer GET {path} on port {self.port}",
                          self.log_tail)

    def wait_for_log(self, text: str, timeout: float = 20) -> str:
        return wait_until(lambda: text in self.log() and self.log(), timeout, f"{text!r} in the server log",
                          self.log_tail)

    def wait_new_main(self, old: int, timeout: float = 20) -> int:
        """Until a successor of `old` is main: the pid file names it and it has said it took over."""
        def changed():
            pid = self.main_pid()
            return pid if pid not in (None, old) else None
        new = wait_until(changed, timeout, f"the pid file to name a successor of {old}", self.log_tail)
        assert alive(new), f"new main {new} is not running\n{self.log_tail()}"
        # The old main names it in the pid file just before telling it that it is main; until it has
        # heard, it refuses reloads ("still starting"). Wait for it to say it took over.
        took_over = re.compile(rf"took over as main: generation \d+ \(pid {new}\) serving")
        wait_until(lambda: took_over.search(self.log()), timeout, f"pid {new} to take over as main", self.log_tail)
        return new

    def wait_gone(self, pid: int, timeout: float = 20) -> None:
        if self.popen is not None and pid == self.popen.pid:
            self.popen.poll()  # reap our own child so it does not linger as a zombie
        wait_until(lambda: not alive(pid), timeout, f"pid {pid} to exit", self.log_tail)

    # -- driving

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A one-off `graceful_http ARGS` with this server's interpreter and directory (not marked as part of it)."""
        return run_cli(self.python, *args, cwd=self.directory, timeout=timeout)

    def run_background(self, *args: str) -> subprocess.Popen:
        """`graceful_http ARGS` as `run` does, without waiting for it (text stdout and stderr piped)."""
        return subprocess.Popen(cli_command(self.python, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=clean_environ(), cwd=self.directory,
                                start_new_session=True)

    def reload_cli(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("reload", "--pid-file", str(self.pid_file), "--timeout", "30", timeout=timeout)

    def reload_and_wait(self) -> int:
        """`graceful-http reload`, which must succeed; then until its new main is main, the old one has exited
        (with workers, once the rollout is over) and a request is answered. Returns the new main's pid."""
        old = self.main_pid()
        result = self.reload_cli()
        assert result.returncode == 0, result.stdout + result.stderr + self.log_tail()
        new = self.wait_new_main(old)
        self.wait_gone(old)
        status, _, _ = get(HOST, self.port, "/", timeout=10)
        assert status == 200
        return new

    def post_graceful(self) -> tuple[int, bytes]:
        status, body, _ = get(HOST, self.port, "/graceful", method="POST", timeout=10)
        return status, body

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to the first generation; its exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL to every generation (and its process group); fails if any is still there 10s later."""
        ours = {self.popen.pid} if self.popen is not None and self.popen.poll() is None else set()
        for pid in self.processes() | ours:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)  # every generation leads its own session
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        wait_until(lambda: not self.processes(), 10, "the test's server processes to be gone", self.log_tail)
