"""End-to-end without systemd: a real `python -m graceful_http serve --bind ...` process.

Every test runs once per engine: "pypi" is this venv's interpreter (the newest
uvicorn from PyPI), "debian" is /usr/bin/python3 with Debian 12's
python3-uvicorn 0.17.6. The server gets PYTHONPATH=<checkout>/service, a free
port, a pid file in tmp_path and a marker variable in its environment, which
every generation inherits: teardown kills whatever still carries the marker.
Waits poll for an event (the pid file, /proc, a log line) with a deadline;
nothing relies on a fixed sleep.
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.load import Load, get, pid_of
from support.serve_process import alive, marked_processes

REPO = Path(__file__).resolve().parents[1]
SERVICE_DIR = REPO / "service"
HOST = "127.0.0.1"
ENGINES = {"pypi": sys.executable, "debian": "/usr/bin/python3"}
DEBIAN_UVICORN = "0.17.6"
MARKER = "GRACEFUL_HTTP_STANDALONE_TEST"
WRK = "/usr/bin/wrk"

WORKING_APP = '''
from graceful_http.demo import app as demo

VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/version":
        body = VERSION.encode()
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]}})
        await send({{"type": "http.response.body", "body": body}})
        return
    await demo(scope, receive, send)
'''
CRASHING_APP = 'import os\n\nraise RuntimeError("deploy went wrong")\n'
HANGING_APP = "import time\n\ntime.sleep(3600)\n"


# ---- helpers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]



def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return [part.decode() for part in file.read().split(b"\0")[:-1]]


def wait_until(predicate, timeout: float, what: str, diagnostics=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{diagnostics()}")
        time.sleep(0.01)


def established_server_side(port: int) -> int:
    """Established TCP connections whose local port is `port` (the server's accepted sockets)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class Server:
    """One graceful-http service (all its generations) started by a test."""

    def __init__(self, python: str, directory: Path):
        self.python = python
        self.directory = directory
        self.port = free_port()
        self.pid_file = directory / "graceful-http.pid"
        self.log_path = directory / "server.log"
        self.marker = uuid.uuid4().hex
        self.popen: subprocess.Popen | None = None
        self.args: list[str] = []
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "GRACEFUL_HTTP_"))
                   and k not in ("NOTIFY_SOCKET", "MAINPID", "JOURNAL_STREAM", "PYTHONHOME")}
        environ.update(PYTHONPATH=str(SERVICE_DIR), PYTHONDONTWRITEBYTECODE="1")
        self.tool_environ = environ  # for `reload` and one-off commands: no marker
        self.serve_environ = {**environ, MARKER: self.marker}

    # -- starting and looking

    def serve_command(self, *extra: str, app: str | None = None) -> list[str]:
        command = [self.python, "-m", "graceful_http", "serve", "--bind", f"{HOST}:{self.port}",
                   "--pid-file", str(self.pid_file), *extra]
        if app:
            command.append(app)
        return command

    def start(self, *extra: str, app: str | None = None, timeout: float = 20) -> int:
        self.args = self.serve_command(*extra, app=app)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=self.serve_environ, cwd=self.directory, start_new_session=True)
        pid = self.popen.pid

        def serving():
            if self.popen.poll() is not None:
                raise AssertionError(f"server exited with {self.popen.returncode}\n{self.log_tail()}")
            if self.main_pid() != pid:
                return False
            try:
                status, body, _ = get(HOST, self.port, "/", timeout=5)
            except OSError:
                return False
            return status == 200 and pid_of(body) == pid

        wait_until(serving, timeout, f"pid {pid} to serve on port {self.port}", self.log_tail)
        return pid

    def main_pid(self) -> int | None:
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

    def get_pid(self, path: str = "/") -> int:
        status, body, _ = get(HOST, self.port, path, timeout=10)
        assert status == 200, (status, body)
        return pid_of(body)

    # -- reloading

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "graceful_http", *args], capture_output=True, text=True,
                              env=self.tool_environ, cwd=self.directory, timeout=timeout, stdin=subprocess.DEVNULL)

    def reload_cli(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("reload", "--pid-file", str(self.pid_file), "--timeout", "30", timeout=timeout)

    def post_graceful(self) -> tuple[int, bytes]:
        status, body, _ = get(HOST, self.port, "/graceful", method="POST", timeout=10)
        return status, body

    def wait_new_main(self, old: int, timeout: float = 20) -> int:
        def changed():
            pid = self.main_pid()
            return pid if pid not in (None, old) else None
        new = wait_until(changed, timeout, f"the pid file to name a successor of {old}", self.log_tail)
        assert alive(new), f"new main {new} is not running\n{self.log_tail()}"
        # The old main names it in the pid file just before telling it that it is main; until it has
        # heard, it refuses reloads ("still starting"). Wait for it to say it took over.
        took_over = re.compile(rf"took over as main: generation \d+ \(pid {new}\) serving")
        wait_until(lambda: took_over.search(self.log()),
                   timeout, f"pid {new} to take over as main", self.log_tail)
        return new

    def wait_gone(self, pid: int, timeout: float = 20) -> None:
        if self.popen is not None and pid == self.popen.pid:
            self.popen.poll()  # reap our own child so it does not linger as a zombie
        wait_until(lambda: not alive(pid), timeout, f"pid {pid} to exit", self.log_tail)

    # -- teardown

    def cleanup(self) -> None:
        for pid in self.processes() | ({self.popen.pid} if self.popen and self.popen.poll() is None else set()):
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
        wait_until(lambda: not self.processes(), 10, "the test's server processes to be gone")


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    python = ENGINES[request.param]
    if not os.access(python, os.X_OK):
        pytest.fail(f"engine {request.param!r}: {python} is not installed")
    return request.param


@pytest.fixture
def server(engine, tmp_path):
    instance = Server(ENGINES[engine], tmp_path)
    try:
        yield instance
    finally:
        instance.cleanup()


def starting_pid(stderr: str) -> int:
    """The new generation's pid, from `reload`'s progress line."""
    match = re.search(r"starting pid (\d+)", stderr)
    assert match, f"no 'starting pid N' progress line in reload's stderr: {stderr!r}"
    return int(match.group(1))


# ---- the engines -------------------------------------------------------------------


def test_engine_runs_the_expected_uvicorn(engine, server):
    result = subprocess.run(
        [server.python, "-c", "import uvicorn, graceful_http.engine; print(uvicorn.__version__, uvicorn.__file__)"],
        capture_output=True, text=True, env=server.tool_environ, timeout=60)
    assert result.returncode == 0, result.stderr
    version, location = result.stdout.split()
    if engine == "debian":
        assert version == DEBIAN_UVICORN
        assert location.startswith("/usr/lib/python3/dist-packages/")
    else:
        import uvicorn

        assert version == uvicorn.__version__, "pytest must run with the venv whose uvicorn it tests"
        assert tuple(int(p) for p in version.split(".")[:2]) > (0, 17), version
        assert location.startswith(sys.prefix)


# ---- (a) serving --------------------------------------------------------------------


def test_get_answers_with_its_pid(server):
    pid = server.start()
    status, body, headers = get(HOST, server.port, "/hello")
    assert status == 200
    assert pid_of(body) == pid
    assert b"path:/hello" in body
    assert cmdline(pid)[0] == server.python  # this engine's interpreter is the one serving
    assert server.main_pid() == pid
    assert get(HOST, server.port, "/healthz")[:2] == (200, b"ok\n")


# ---- (b) reloads under load -----------------------------------------------------------

RELOADS_UNDER_LOAD = 5


@pytest.mark.parametrize("how", ["SIGHUP", "POST /graceful", "graceful-http reload"])
def test_reload_under_load_loses_nothing(server, how):
    """Zero failed requests across reloads. KNOWN SERVICE BUG: on the debian engine (plain asyncio
    loop) this fails intermittently with `ConnectionResetError` on a new connection: Engine.stop_accepting
    closes the asyncio.Server while connections accepted in the same loop turn are not yet attached
    (asyncio's Server._attach asserts, the accepted socket is dropped, the kernel sends RST)."""
    pids = [server.start()]
    with Load(HOST, server.port, clients=8) as load:
        load.wait_for_requests(100)
        for _ in range(RELOADS_UNDER_LOAD):
            old = pids[-1]
            printed = None
            if how == "SIGHUP":
                os.kill(old, signal.SIGHUP)
            elif how == "POST /graceful":
                status, body = server.post_graceful()
                assert status == 202, body
                assert body.startswith(b"started: "), body
            else:
                result = server.reload_cli()
                assert result.returncode == 0, result.stderr
                printed = int(result.stdout.strip())
            new = server.wait_new_main(old)
            pids.append(new)
            if printed is not None:
                assert printed == new, "`reload` printed another pid than the pid file names"
            wait_until(lambda: load.result.pids[new] > 0, 10, f"the load to be answered by {new}",
                       lambda: load.result.summary())
            server.wait_gone(old)
            before = collections.Counter(dict(load.result.pids))
            load.wait_for_requests(50)
            answered_by = collections.Counter(dict(load.result.pids)) - before
            assert set(answered_by) == {new}, f"after {old} exited, answers came from {dict(answered_by)}"
            assert server.get_pid() == new
    result = load.result
    assert result.failures == [], result.summary()
    assert set(result.pids) == set(pids), result.summary()
    assert len(set(pids)) == RELOADS_UNDER_LOAD + 1
    assert not any(alive(pid) for pid in pids[:-1])
    assert server.processes() == {pids[-1]}
    assert server.log().count("took over as main") == RELOADS_UNDER_LOAD


# ---- (c) a long request spans a reload ---------------------------------------------


def test_long_request_started_before_a_reload_finishes_on_the_old_generation(server):
    old = server.start()
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        connection.request("GET", "/")  # the connection now belongs to the old generation
        first = connection.getresponse()
        assert pid_of(first.read()) == old
        started = time.monotonic()
        connection.request("GET", "/sleep?seconds=3")

        result = server.reload_cli()
        assert result.returncode == 0, result.stderr
        new = int(result.stdout.strip())
        assert server.main_pid() == new != old
        assert server.get_pid() == new  # new connections go to the new generation...
        assert alive(old)  # ...while the old one is still finishing the request

        response = connection.getresponse()
        body = response.read()
        elapsed = time.monotonic() - started
    finally:
        connection.close()
    assert response.status == 200
    assert body.startswith(f"Hello, graceful pid:{old},".encode()), body
    assert elapsed >= 2.9
    server.wait_gone(old)
    assert server.processes() == {new}


def test_response_in_flight_at_handover_closes_the_connection(server):
    """KNOWN SERVICE BUG (fails): a response that was in flight when draining began is sent
    without `Connection: close` (ControlLayer decides at request start), so a keep-alive client
    reuses a connection the draining generation closes after its idle grace: RemoteDisconnected."""
    old = server.start()
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == old
        connection.request("GET", "/sleep?seconds=1")
        result = server.reload_cli()
        assert result.returncode == 0, result.stderr
        response = connection.getresponse()
        body = response.read()
        assert body.startswith(f"Hello, graceful pid:{old},".encode()), body
        close_header = response.getheader("connection")
        server.wait_gone(old)
        reuse = None
        if not response.will_close:  # what a keep-alive client does next
            try:
                connection.request("GET", "/")
                reuse = connection.getresponse().status
            except (OSError, http.client.HTTPException) as exc:
                reuse = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    assert close_header == "close", (f"the draining generation answered without Connection: close;"
                                     f" reusing the connection afterwards gave {reuse!r}")


# ---- (d) the same command line in every generation ----------------------------------


def test_command_line_is_the_same_after_reloads(server):
    first = server.start()
    original = cmdline(first)
    assert original == server.args
    pid = first
    for _ in range(3):
        result = server.reload_cli()
        assert result.returncode == 0, result.stderr
        pid = int(result.stdout.strip())
    assert pid != first
    assert cmdline(pid) == original
    server.wait_gone(first)


# ---- (e) one reload at a time --------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGHUP", "POST /graceful"])
def test_second_reload_during_a_reload_is_refused(server, how):
    old = server.start()
    if how == "SIGHUP":
        os.kill(old, signal.SIGHUP)
        # The second signal must arrive while the first reload is under way, not be merged
        # with the first by the kernel: wait until the first one has been acted upon.
        wait_until(lambda: "reload requested by SIGHUP: starting generation 2" in server.log(), 10,
                   "the first SIGHUP to start a reload", server.log_tail)
        os.kill(old, signal.SIGHUP)
        wait_until(lambda: "reload requested by SIGHUP refused: reload already in progress" in server.log(), 10,
                   "the second SIGHUP to be refused", server.log_tail)
    else:
        first = server.post_graceful()
        second = server.post_graceful()
        assert first[0] == 202, first
        assert second[0] == 409, second
        assert second[1].startswith(b"refused: reload already in progress"), second
    new = server.wait_new_main(old)
    server.wait_gone(old)
    log = server.log()
    assert len(re.findall(r"reload requested by .*: starting generation", log)) == 1, server.log_tail()
    assert log.count("took over as main") == 1
    assert server.processes() == {new}, "exactly one new generation must be left"
    assert server.get_pid() == new


def test_a_reload_is_accepted_the_moment_the_previous_one_is_done(server):
    """"done" means the new generation acts as main (its control socket accepts reloads): a script may
    reload again at once, with no "still starting" refusal and no connection refused."""
    from graceful_http.reloadclient import request_reload

    pids = [server.start()]
    for _ in range(5):
        outcome = request_reload(pids[-1], 30, lambda progress: None)
        assert outcome.code == "done", (outcome, server.log_tail())
        assert outcome.pid not in pids
        pids.append(outcome.pid)
    assert server.main_pid() == pids[-1]
    assert server.get_pid() == pids[-1]
    assert "refused" not in server.log(), server.log_tail()


# ---- (f) failed reloads keep the old generation serving -------------------------------


def test_failed_reloads_keep_the_old_generation_serving(server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    module = app_dir / "webapp.py"
    module.write_text(WORKING_APP.format(version="v1"))
    old = server.start("--ready-timeout", "2", "--app-dir", str(app_dir), app="webapp:app")
    assert get(HOST, server.port, "/version")[:2] == (200, b"v1")

    # an app that raises at import
    module.write_text(CRASHING_APP)
    result = server.reload_cli()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    failure = result.stderr.strip().splitlines()[-1]
    assert failure.startswith("graceful-http: reload failed: importing 'webapp' raised RuntimeError: deploy went wrong")
    assert "Traceback" not in result.stderr
    crashed = starting_pid(result.stderr)
    server.wait_gone(crashed)
    assert server.main_pid() == old
    assert server.get_pid() == old
    assert get(HOST, server.port, "/version")[:2] == (200, b"v1")

    # an app that hangs at import: the ready timeout kills it
    module.write_text(HANGING_APP)
    started = time.monotonic()
    result = server.reload_cli()
    elapsed = time.monotonic() - started
    assert result.returncode == 1, (result.stdout, result.stderr)
    failure = result.stderr.strip().splitlines()[-1]
    assert failure == "graceful-http: reload failed: new generation not ready within 2s (ready timeout)"
    assert 1.9 <= elapsed < 15
    hung = starting_pid(result.stderr)
    server.wait_gone(hung, timeout=10)
    assert server.main_pid() == old
    assert server.get_pid() == old

    # fixed: the reload goes through and the new code answers
    module.write_text(WORKING_APP.format(version="v2"))
    result = server.reload_cli()
    assert result.returncode == 0, result.stderr
    new = int(result.stdout.strip())
    assert new not in (old, crashed, hung)
    assert server.main_pid() == new
    assert get(HOST, server.port, "/version")[:2] == (200, b"v2")
    assert server.get_pid() == new
    server.wait_gone(old)
    assert server.processes() == {new}


# ---- (g) SIGTERM finishes what is in flight -------------------------------------------


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
    pid = server.start()
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == pid
        connection.request("GET", "/sleep?seconds=2")
        os.kill(pid, signal.SIGTERM)

        def refused():  # it stops accepting at once; nobody else holds the socket
            try:
                probe = socket.create_connection((HOST, server.port), timeout=2)
            except ConnectionRefusedError:
                return True
            probe.close()
            return False

        wait_until(refused, 5, "new connections to be refused after SIGTERM", server.log_tail)
        assert server.popen.poll() is None, "exited with a request in flight"
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200
    assert body.startswith(f"Hello, graceful pid:{pid},".encode()), body
    assert server.popen.wait(timeout=15) == 0, server.log_tail()
    assert not server.pid_file.exists(), "a stopped service must remove its pid file"
    assert "SIGTERM received: stopping" in server.log()


# ---- (h) wrk during 20 reloads ----------------------------------------------------------

WRK_RELOADS = 20


def test_wrk_sees_no_errors_during_20_reloads(server):
    """`wrk -t2 -c50` across 20 POST /graceful reloads, on both engines. `-d120s` is only an upper
    bound: once the reloads are done wrk gets SIGINT, after which it prints its usual report."""
    if not os.access(WRK, os.X_OK):
        pytest.fail(f"wrk is required for this test and is not installed at {WRK} (apt-get install wrk)")
    pids = [server.start("--no-access-log")]
    # -d is an upper bound: wrk is stopped with SIGINT (it then prints its report) once the reloads are done
    wrk = subprocess.Popen([WRK, "-t2", "-c50", "-d120s", f"http://{HOST}:{server.port}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: established_server_side(server.port) >= 50 or wrk.poll() is not None, 10,
                   "wrk's 50 connections to be established")
        assert wrk.poll() is None, wrk.communicate()[0]
        for _ in range(WRK_RELOADS):
            old = pids[-1]
            status, body = server.post_graceful()
            assert status == 202, body
            pids.append(server.wait_new_main(old))
        server.wait_gone(pids[-2])
        assert wrk.poll() is None, "wrk ended before the reloads did"
        wrk.send_signal(signal.SIGINT)
        output, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait(timeout=10)
    assert wrk.returncode == 0, output
    requests = re.search(r"(\d+) requests in ", output)
    assert requests and int(requests.group(1)) > 1000, output
    assert "Socket errors" not in output, output
    assert "Non-2xx" not in output, output
    assert len(set(pids)) == WRK_RELOADS + 1
    wait_until(lambda: server.processes() == {pids[-1]}, 20, "every old generation to exit", server.log_tail)


# ---- (i) bad input ---------------------------------------------------------------------


def test_unknown_flag_is_a_usage_error(server):
    result = server.run("serve", "--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_bind_is_one_line_and_exit_2(server):
    result = server.run("serve", "--bind", "nonsense")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graceful-http")
    assert lines[0].endswith("invalid --bind 'nonsense': expected HOST:PORT, [IPV6]:PORT or unix:PATH")


def test_missing_app_module_is_one_line_and_exit_1(server, tmp_path):
    result = server.run("serve", "--bind", f"{HOST}:{server.port}", "--app-dir", str(tmp_path),
                        "gh_no_such_app_module:app")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("cannot start: cannot import 'gh_no_such_app_module': "
                             "no module named 'gh_no_such_app_module'"), lines
    assert lines[0].startswith("graceful-http[")


def test_reload_without_a_running_service_is_one_line_and_exit_2(server, tmp_path):
    result = server.run("reload", "--pid-file", str(tmp_path / "missing.pid"))
    assert result.returncode == 2
    assert result.stderr == f"graceful-http: cannot read pid file {tmp_path / 'missing.pid'}: No such file or directory\n"
    result = server.run("reload", "--pid", "999999999")
    assert result.returncode == 2
    assert result.stderr.startswith("graceful-http: reload: cannot reach graceful-http pid 999999999")
    assert "Traceback" not in result.stderr


def test_reload_refuses_a_control_socket_squatted_by_another_process(server):
    """The control socket's name is derived from the pid, and abstract names are first come, first served:
    `reload` must notice that another process holds it, and not believe its answers."""
    from graceful_http.reloadclient import address_for

    bystander = subprocess.Popen(["sleep", "60"])
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        squatter.bind(address_for(bystander.pid))
        squatter.listen()
        result = server.run("reload", "--pid", str(bystander.pid))
        assert result.returncode == 2, result
        assert result.stderr == (f"graceful-http: reload: the control socket of pid {bystander.pid} is held by pid"
                                 f" {os.getpid()}, not by pid {bystander.pid}\n")
    finally:
        squatter.close()
        bystander.kill()
        bystander.wait()
