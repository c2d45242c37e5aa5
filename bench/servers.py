"""The servers under test: how each one starts, reloads the way its documentation says, and stops.

Every process started here carries BENCH_RUN=<token> in its environment
(inherited by workers, re-executed masters and new generations alike), so
`kill_marked()` can end whatever is left of this run, by pid, and nothing
else.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import alive, children, cmdline, free_port

REPO = Path(__file__).resolve().parents[1]
# GRACEFUL_HTTP_BENCH_SERVICE: another copy of service/ to measure (e.g. a patch, A/B); standalone figures only
# (the systemd container always runs this checkout's service/).
SERVICE_DIR = Path(os.environ.get("GRACEFUL_HTTP_BENCH_SERVICE", REPO / "service")).resolve()
PYTHON = sys.executable
BIN = Path(sys.executable).parent
RUN_TOKEN = uuid.uuid4().hex[:12]
MARK = "BENCH_RUN"
APP = "bench.app:app"
UVICORN_ENGINE = ["--http", "httptools", "--loop", "uvloop", "--no-access-log"]


# How often a reload under load looks whether it is done, as the peers' reloads do (5 ms): read every 1 ms, the
# pid file cost this process 25-30 ms of CPU in each measured second after a reload of two workers (`perf
# record -e sched:sched_switch`), on the CPUs whose latency that second measures. Without load, the handoff's
# timings read it every 1 ms (`bench.main._timed_reload`).
UNDER_LOAD_POLL = 0.005


class BenchError(RuntimeError):
    pass


# ---- small OS helpers --------------------------------------------------------------------------------------------


def environment(tag: str = "") -> dict[str, str]:
    """The environment of a server: the checkout's graceful_http and bench on the path, and our mark."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(SERVICE_DIR), str(REPO)])
    env[MARK] = f"{RUN_TOKEN}/{tag}"
    return env


def marked_pids(tag: str | None = None) -> list[int]:
    """Our processes: all of this run's, or those of one server (`tag`)."""
    exact = f"{MARK}={RUN_TOKEN}/{tag}".encode() if tag is not None else None
    prefix = f"{MARK}={RUN_TOKEN}/".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                variables = file.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(v == exact if exact else v.startswith(prefix) for v in variables):
            pids.append(int(entry))
    return [pid for pid in pids if alive(pid)]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total / CLOCK_TICKS


def kill_marked(tag: str | None = None, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, what is left of this run's processes (or one server's); returns those that were left."""
    left = marked_pids(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.02)
        if not any(alive(p) for p in left):
            break
    return left


def wait_for(predicate, timeout: float, what: str, interval: float = 0.001):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_serving(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> int:
    """Wait until GET / answers 200; returns the pid that answered."""
    def answered():
        if process is not None and process.poll() is not None:
            raise BenchError(f"the server exited with status {process.returncode} before serving")
        try:
            status, body = get(port, timeout=2)
        except OSError:
            return None
        match = re.search(rb"pid:(\d+)", body)
        return int(match.group(1)) if status == 200 and match else None
    return wait_for(answered, timeout, f"a 200 on port {port}", interval=0.02)


@dataclass
class Reload:
    """One reload: when it was asked for, when the server said it was done (None: it does not say)."""

    requested: float
    done: float | None = None
    ok: bool = True
    detail: str = ""
    new_pids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"requested": self.requested, "done": self.done, "ok": self.ok, "detail": self.detail,
                "new_pids": self.new_pids}


# ---- standalone servers --------------------------------------------------------------------------------------------


class Standalone:
    """A server started here, on its own port."""

    name = ""
    reload_how = ""
    app = APP  # or another module:attribute of bench/
    extra: list[str] = []  # more command-line arguments

    def __init__(self, workers: int, logdir: Path):
        self.workers = workers
        self.port = free_port()
        self.logdir = logdir
        self.process: subprocess.Popen | None = None
        self.log_path = logdir / f"{self.slug}-w{workers}-{self.port}.log"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    @property
    def tag(self) -> str:
        return f"{self.slug}-w{self.workers}-{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.reload_how}, workers={self.workers})"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(), cwd=REPO, env=environment(self.tag), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_serving(self.port, process=self.process)
            self.after_start()
        except BaseException:
            self.stop()
            raise

    def after_start(self) -> None:
        pass

    def main_pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        try:
            pid = self.main_pid()
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not alive(pid), 15, f"{self.name} (pid {pid}) to stop", interval=0.02)
        except (BenchError, ProcessLookupError, TypeError, AttributeError):
            pass
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def reload(self) -> Reload:
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


class GracefulHttp(Standalone):
    name = "graceful-http"
    reload_how = "SIGHUP"

    def __init__(self, workers: int, logdir: Path):
        super().__init__(workers, logdir)
        self.pid_file = logdir / f"graceful-http-w{workers}-{self.port}.pid"

    def argv(self) -> list[str]:
        return [PYTHON, "-m", "graceful_http", "serve", self.app, "--no-access-log", "--bind", f"127.0.0.1:{self.port}",
                "--pid-file", str(self.pid_file), "--workers", str(self.workers), *self.extra]

    def after_start(self) -> None:
        wait_for(lambda: read_pid(self.pid_file), 10, "the pid file")

    def main_pid(self) -> int:
        return read_pid(self.pid_file) or self.process.pid

    def reload(self, poll: float = UNDER_LOAD_POLL) -> Reload:
        """SIGHUP to the main pid; done when the pid file names the new main (read every `poll` s)."""
        old = self.main_pid()
        record = Reload(time.monotonic())
        os.kill(old, signal.SIGHUP)
        try:
            new = wait_for(lambda: (p := read_pid(self.pid_file)) != old and p, 60, "the pid file to change",
                           interval=poll)
        except BenchError as exc:
            record.ok, record.detail = False, str(exc)
            return record
        record.done = time.monotonic()
        record.new_pids = [new]
        return record

    def reload_by_control_socket(self) -> Reload:
        """What `graceful-http reload` does, without its interpreter start: done when the control socket says so."""
        if str(SERVICE_DIR) not in sys.path:
            sys.path.insert(0, str(SERVICE_DIR))
        from graceful_http.reloadclient import request_reload

        record = Reload(time.monotonic())
        outcome = request_reload(self.main_pid(), 60, lambda _: None)
        record.done = time.monotonic()
        record.ok, record.detail = outcome.code == "done", f"{outcome.code}: {outcome.detail}"
        record.new_pids = [outcome.pid] if outcome.pid else []
        return record

    def reload_by_command(self) -> Reload:
        """`graceful-http reload --pid-file F`, timed from exec to exit."""
        record = Reload(time.monotonic())
        result = subprocess.run([PYTHON, "-m", "graceful_http", "reload", "--pid-file", str(self.pid_file)],
                                cwd=REPO, env=environment("reload-command"), capture_output=True, text=True, timeout=120)
        record.done = time.monotonic()
        record.ok = result.returncode == 0
        record.detail = result.stderr.strip()[-300:]
        if result.stdout.strip().isdigit():
            record.new_pids = [int(result.stdout.strip())]
        return record

    def stop(self) -> None:
        super().stop()
        # Old generations are not our children: wait for their drain, then make sure.
        kill_marked(self.tag)


class Uvicorn(Standalone):
    name = "uvicorn"
    reload_how = "SIGHUP"

    def argv(self) -> list[str]:
        return [PYTHON, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port), *UVICORN_ENGINE,
                "--workers", str(self.workers), "--log-level", "warning"]

    def workers_now(self) -> list[int]:
        if self.workers == 1:
            return [self.process.pid]
        return [c for c in children(self.process.pid) if "spawn_main" in " ".join(cmdline(c))]

    def reload(self) -> Reload:
        """SIGHUP to the supervisor (uvicorn --workers N ≥ 2): it replaces each worker in turn."""
        if self.workers < 2:
            raise BenchError("uvicorn reloads on SIGHUP only with --workers 2 or more")
        old = set(self.workers_now())
        record = Reload(time.monotonic())
        os.kill(self.process.pid, signal.SIGHUP)

        def replaced():
            now = set(self.workers_now())
            return len(now) >= self.workers and not (now & old) and not any(alive(p) for p in old) and now
        try:
            record.new_pids = sorted(wait_for(replaced, 60, "uvicorn to replace its workers", interval=0.005))
            record.done = time.monotonic()
        except BenchError as exc:
            record.ok, record.detail = False, str(exc)
        return record


class Gunicorn(Standalone):
    """gunicorn with uvicorn's worker class; reloads per gunicorn's documentation (docs/source/signals.rst)."""

    name = "gunicorn"

    def __init__(self, workers: int, logdir: Path, reload_how: str = "HUP"):
        self.reload_how = reload_how
        super().__init__(workers, logdir)
        self.pid_file = logdir / f"gunicorn-{reload_how.lower()}-w{workers}-{self.port}.pid"

    @property
    def slug(self) -> str:
        return f"gunicorn-{self.reload_how.lower()}"

    def argv(self) -> list[str]:
        # The error log at info level names each worker that finished its startup: that is how a
        # reload's new workers are known to serve. No access log (gunicorn's default).
        return [str(BIN / "gunicorn"), self.app, "-k", "uvicorn.workers.UvicornWorker", "-w", str(self.workers),
                "-b", f"127.0.0.1:{self.port}", "-p", str(self.pid_file), "--log-level", "info",
                "--error-logfile", str(self.log_path)]

    def main_pid(self) -> int:
        return read_pid(self.pid_file) or self.process.pid

    def ready_workers(self) -> set[int]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return set()
        return {int(p) for p in re.findall(r"\[(\d+)\] \[INFO\] Application startup complete", text)}

    def serving_workers(self, master: int) -> set[int]:
        return set(children(master)) & self.ready_workers()

    def reload(self) -> Reload:
        if self.reload_how == "HUP":
            return self._reload_hup()
        return self._reload_usr2()

    def _reload_hup(self) -> Reload:
        """HUP: new workers start, the old ones are stopped gracefully."""
        master = self.main_pid()
        old = set(children(master))
        record = Reload(time.monotonic())
        os.kill(master, signal.SIGHUP)

        def replaced():
            now = self.serving_workers(master)
            return len(now) >= self.workers and not (now & old) and not any(alive(p) for p in old) and now
        try:
            record.new_pids = sorted(wait_for(replaced, 60, "gunicorn to replace its workers", interval=0.005))
            record.done = time.monotonic()
        except BenchError as exc:
            record.ok, record.detail = False, str(exc)
        return record

    def _reload_usr2(self) -> Reload:
        """USR2: a new master (and workers) beside the old; once they serve, WINCH then TERM the old master.

        gunicorn's signals page: WINCH gracefully stops the workers only when daemonized (else it is
        ignored), and "send the TERM signal to the old master process to leave only the new server
        running" (QUIT would be a quick shutdown). The new master renames its pid file from
        `<pid file>.2` once promoted; the next USR2 is accepted only then.
        """
        old_master = self.main_pid()
        record = Reload(time.monotonic())
        os.kill(old_master, signal.SIGUSR2)
        new_pid_file = Path(f"{self.pid_file}.2")
        try:
            new_master = wait_for(lambda: read_pid(new_pid_file), 60, "the new gunicorn master")

            def new_workers_serve():
                serving = self.serving_workers(new_master)
                return serving if len(serving) >= self.workers else None
            new_workers = wait_for(new_workers_serve, 60, "the new gunicorn workers to serve", interval=0.005)
            os.kill(old_master, signal.SIGWINCH)
            os.kill(old_master, signal.SIGTERM)
            wait_for(lambda: not alive(old_master), 60, "the old gunicorn master to exit", interval=0.005)
            record.done = time.monotonic()
            record.new_pids = sorted(new_workers)
            wait_for(lambda: read_pid(self.pid_file) == new_master, 10, "the new gunicorn master to be promoted",
                     interval=0.01)
        except BenchError as exc:
            record.ok, record.detail = False, str(exc)
        return record


# ---- the floor: a bare uvicorn from exec to its first answered request ---------------------------------------------


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _first_answer(address) -> None:
    """Connect (the kernel completes it from the backlog), ask, and read the whole answer."""
    with socket.create_connection(address, timeout=60) as client:
        client.sendall(REQUEST)
        data = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                raise BenchError(f"the server closed the connection before answering: {data[:200]!r}")
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"content-length:\s*(\d+)", head.lower())
                if match and len(body) >= int(match.group(1)):
                    if not data.startswith(b"HTTP/1.1 200"):
                        raise BenchError(f"first answer was not 200: {data[:200]!r}")
                    return


def time_first_answer(kind: str) -> float:
    """Seconds from exec of a fresh server on an already-listening socket to its first answered request."""
    sock = _listening_socket()
    fd = sock.fileno()
    if kind == "uvicorn":
        argv = [PYTHON, "-m", "uvicorn", APP, "--fd", str(fd), *UVICORN_ENGINE, "--log-level", "warning"]
    elif kind == "graceful-http":
        # As systemd passes a socket: at fd 3, LISTEN_PID naming the process itself.
        move = "" if fd == 3 else f"3<&{fd} {fd}<&-"
        argv = ["/bin/sh", "-c", f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http; exec "$@" {move}',
                "sh", PYTHON, "-m", "graceful_http", "serve", APP, "--no-access-log", "--log-level", "warning"]
    else:
        raise ValueError(kind)
    try:
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=REPO, env=environment(f"floor-{kind}"), pass_fds=[fd], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _first_answer(sock.getsockname())
            elapsed = time.monotonic() - started
        finally:
            process.terminate()
            try:
                _, err = process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    finally:
        sock.close()
    return elapsed


def time_command(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, cwd=REPO, env=environment("command"), check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started
