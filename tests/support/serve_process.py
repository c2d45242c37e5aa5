"""`python -m graceful_http ...` as a plain process on this machine (no systemd), for tests.

`run_cli` runs a command that is expected to end (check, a serve that must
fail to start). `ServeProcess` starts a server on a free port with a pid
file and a marker variable that every generation inherits, so teardown can
kill whatever is left, whichever generation it is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from support.container import wait_until
from support.load import get

REPO = Path(__file__).resolve().parents[2]
SERVICE_DIR = REPO / "service"
HOST = "127.0.0.1"
ENGINES = {"pypi": sys.executable, "debian": "/usr/bin/python3"}
MARKER = "GRACEFUL_HTTP_I6_TEST"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def clean_environ(**extra: str) -> dict[str, str]:
    """The runner's environment without anything systemd or a parent generation would have set."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "GRACEFUL_HTTP_"))
               and k not in ("NOTIFY_SOCKET", "MAINPID", "JOURNAL_STREAM", "PYTHONHOME", "WATCHDOG_USEC",
                             "WATCHDOG_PID", "INVOCATION_ID")}
    environ.update(PYTHONPATH=str(SERVICE_DIR), PYTHONDONTWRITEBYTECODE="1", **extra)
    return environ


def run_cli(python: str, *args: str, cwd: str | Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m graceful_http ARGS`, to its end; its own session, killed whole on timeout."""
    process = subprocess.Popen([python, "-m", "graceful_http", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_environ(),
                               cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"`graceful_http {' '.join(args)}` did not end within {timeout}s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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

    def __init__(self, python: str, directory: Path, *args: str, port: int | None = None, bind: bool = True):
        """`serve ARGS`, plus `--bind 127.0.0.1:PORT` (a free port) unless `bind` is false."""
        self.python = python
        self.directory = Path(directory)
        self.port = port or free_port()
        self.args = [*args, "--bind", f"{HOST}:{self.port}"] if bind else list(args)
        self.log_path = self.directory / f"serve-{uuid.uuid4().hex[:8]}.log"
        self.marker = uuid.uuid4().hex
        self.popen: subprocess.Popen | None = None

    def __enter__(self) -> "ServeProcess":
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen([self.python, "-m", "graceful_http", "serve", *self.args],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=clean_environ(**{MARKER: self.marker}), cwd=self.directory,
                                          start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serving(self, path: str = "/", timeout: float = 20) -> tuple[int, bytes, dict]:
        """Until GET path answers 200 (fails at once if the process exited)."""
        def answered():
            if self.popen.poll() is not None:
                raise AssertionError(f"serve exited with {self.popen.returncode}:\n{self.log()}")
            try:
                response = get(HOST, self.port, path, timeout=5)
            except OSError:
                return None
            return response if response[0] == 200 else None
        return wait_until(answered, timeout, what=f"serve to answer GET {path} on port {self.port}")

    def wait_for_log(self, text: str, timeout: float = 20) -> str:
        return wait_until(lambda: text in self.log() and self.log(), timeout, what=f"{text!r} in the server log")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to the first generation; its exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def processes(self) -> set[int]:
        return marked_processes(MARKER, self.marker)

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
