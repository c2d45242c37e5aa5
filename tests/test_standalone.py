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
from pathlib import Path

import pytest

from harness.processes import alive, cmdline
from support.load import Load, get, pid_of
from support.prometheus import Samples, value
from support.prometheus import scrape as scrape_metrics
from support.serve_process import ENGINES, HOST, ServeProcess, clean_environ, installed_engine, wait_until

DEBIAN_UVICORN = "0.17.6"
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


# POST /graceful from this host is an explicit opt-in: by default no peer address may reload (behind a
# same-host proxy every request comes from loopback).
LOCAL_POSTS = ("--control-allow", "127.0.0.1")


def start(server: ServeProcess, *args: str) -> int:
    """Start `server` with ARGS; its pid, once the pid file names it and it answers GET / itself."""
    _, body, _ = server.start(*args).wait_serving()
    assert pid_of(body) == server.pid, f"GET / answered by {pid_of(body)}, not {server.pid}\n{server.log_tail()}"
    return server.pid


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    installed_engine(request.param)
    return request.param


@pytest.fixture
def server(engine, tmp_path):
    instance = ServeProcess(ENGINES[engine], tmp_path, pid_file=True)
    try:
        yield instance
    finally:
        instance.kill_all()


def starting_pid(stderr: str) -> int:
    """The new generation's pid, from `reload`'s progress line."""
    match = re.search(r"starting pid (\d+)", stderr)
    assert match, f"no 'starting pid N' progress line in reload's stderr: {stderr!r}"
    return int(match.group(1))


# ---- the engines -------------------------------------------------------------------


def test_engine_runs_the_expected_uvicorn(engine, server):
    result = subprocess.run(
        [server.python, "-c", "import uvicorn, graceful_http.engine; print(uvicorn.__version__, uvicorn.__file__)"],
        capture_output=True, text=True, env=clean_environ(), timeout=60)
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
    pid = start(server)
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
    pids = [start(server, *LOCAL_POSTS)]
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
    server.wait_only(pids[-1])
    assert server.log().count("took over as main") == RELOADS_UNDER_LOAD


# ---- (c) a long request spans a reload ---------------------------------------------


def test_long_request_started_before_a_reload_finishes_on_the_old_generation(server):
    old = start(server)
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
    server.wait_only(new)


def test_response_in_flight_at_handover_finishes_then_the_connection_moves(server):
    """A response in flight when draining begins is finished by the old generation without
    `Connection: close`; then the connection itself moves to the new generation, which answers the
    client's next request on it: no reconnect, no close race."""
    old = start(server)
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == old
        local = connection.sock.getsockname()
        connection.request("GET", "/sleep?seconds=1")
        result = server.reload_cli()
        assert result.returncode == 0, result.stderr
        new = int(result.stdout.strip())
        response = connection.getresponse()
        body = response.read()
        assert body.startswith(f"Hello, graceful pid:{old},".encode()), body
        assert response.getheader("connection") is None and not response.will_close
        server.wait_gone(old)
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == new
        assert connection.sock.getsockname() == local, "the client had to reconnect"
    finally:
        connection.close()
    assert "connections: 1 handed over, 0 fell back" in server.log()


# ---- (d) the same command line in every generation ----------------------------------


def test_command_line_is_the_same_after_reloads(server):
    first = start(server)
    original = cmdline(first)
    assert original == server.command
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
    old = start(server, *LOCAL_POSTS)
    if how == "SIGHUP":
        os.kill(old, signal.SIGHUP)
        # The second signal must arrive while the first reload is under way, not be merged
        # with the first by the kernel: wait until the first one has been acted upon.
        server.wait_for_log("reload requested by SIGHUP: starting generation 2", timeout=10)
        os.kill(old, signal.SIGHUP)
        server.wait_for_log("reload requested by SIGHUP refused: reload already in progress", timeout=10)
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
    server.wait_only(new)  # exactly one new generation
    assert server.get_pid() == new


def test_a_reload_is_accepted_the_moment_the_previous_one_is_done(server):
    """"done" means the new generation acts as main (its control socket accepts reloads): a script may
    reload again at once, with no "still starting" refusal and no connection refused."""
    from graceful_http.reloadclient import request_reload

    pids = [start(server)]
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
    old = start(server, "--ready-timeout", "2", "--app-dir", str(app_dir), "webapp:app")
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
    server.wait_only(new)


# ---- (g) SIGTERM finishes what is in flight -------------------------------------------


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
    pid = start(server)
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


ATEXIT_APP = '''
import atexit, os
from graceful_http.demo import app

atexit.register(lambda: open(os.environ["ATEXIT_LOG"], "a").write(f"{os.getpid()}\\n"))
'''


def test_the_apps_atexit_handlers_run_when_a_generation_exits(engine, tmp_path):
    """A generation exits without the interpreter's teardown (it would spend CPU the next generation
    serves with), but the app's atexit handlers still run: in the old main after a reload, and at a stop."""
    (tmp_path / "atexit_app.py").write_text(ATEXIT_APP)
    ran = tmp_path / "atexit.log"
    server = ServeProcess(ENGINES[engine], tmp_path, "atexit_app:app", "--app-dir", str(tmp_path), pid_file=True,
                          environ={"ATEXIT_LOG": str(ran)})
    try:
        first = start(server)
        assert server.reload_cli().returncode == 0, server.log_tail()
        second = server.wait_new_main(first)
        server.wait_gone(first)
        assert ran.read_text().split() == [str(first)], server.log_tail()
        os.kill(second, signal.SIGTERM)
        server.wait_gone(second)
        assert ran.read_text().split() == [str(first), str(second)], server.log_tail()
    finally:
        server.kill_all()


# ---- (h) wrk during 20 reloads ----------------------------------------------------------

WRK_RELOADS = 20


def test_wrk_sees_no_errors_during_20_reloads(server):
    """`wrk -t2 -c50` across 20 POST /graceful reloads, on both engines. `-d120s` is only an upper
    bound: once the reloads are done wrk gets SIGINT, after which it prints its usual report."""
    if not os.access(WRK, os.X_OK):
        pytest.fail(f"wrk is required for this test and is not installed at {WRK} (apt-get install wrk)")
    pids = [start(server, "--no-access-log", *LOCAL_POSTS)]
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
    server.wait_only(pids[-1])  # every old generation exited


# ---- (i) metrics with workers ----------------------------------------------------------


def scrape(server: ServeProcess) -> Samples:
    """GET /metrics on a fresh connection: whichever worker accepts it answers."""
    return scrape_metrics(HOST, server.port)


def requests_by_worker(samples: Samples) -> dict[str, float]:
    counts: dict[str, float] = collections.Counter()
    for (name, labels), count in samples.items():
        if name == "graceful_http_requests_total":
            counts[dict(labels)["worker"]] += count
    return counts


def test_with_workers_every_scrape_counts_every_workers_requests(engine, tmp_path):
    """A scrape lands on one worker; it must still count the whole generation's requests, and the files the
    workers share them in must not outlive their generation."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    with ServeProcess(ENGINES[engine], tmp_path, "--workers", "2", "--metrics", *LOCAL_POSTS, pid_file=True,
                      environ={"TMPDIR": str(shared)}) as server:
        server.wait_serving()
        first = server.main_pid()
        workers = set()
        for _ in range(500):  # new connections, until both workers have answered one
            workers.add(server.get_pid())
            if len(workers) == 2:
                break
        assert len(workers) == 2, f"500 new connections all went to pid {workers}"
        # A request is counted just after its response is sent, so a client may see the answer before the
        # count: wait until scrapes count nothing but each other.
        def total(samples) -> int:
            return sum(requests_by_worker(samples).values())

        def settled(expected: int, since: dict):
            taken = [since]

            def counted() -> dict | None:
                taken.append(scrape(server))
                return taken[-1] if total(taken[-1]) - total(since) - (len(taken) - 2) == expected else None

            def seen() -> str:  # what the last scrapes counted, beyond the scrapes before them
                last = [(dict(requests_by_worker(t)), total(t) - total(since) - (i - 1)) for i, t in enumerate(taken)]
                return f"counted (by worker, beyond earlier scrapes): {last[-5:]}\n{server.log_tail()}"
            return wait_until(counted, 10, f"{expected} request(s) to be counted", seen)

        def quiet() -> dict:
            """A scrape after which nothing but the scrapes themselves is counted: the requests above have all
            landed (the last one's count may land after a scrape on the other worker has read the files)."""
            taken = [scrape(server)]

            def still() -> dict | None:
                time.sleep(0.02)
                taken.append(scrape(server))
                steps = [total(b) - total(a) for a, b in zip(taken[-4:], taken[-3:])]
                return taken[-1] if len(steps) == 3 and steps == [1, 1, 1] else None
            return wait_until(still, 10, "the counts to stop moving but for the scrapes", server.log_tail)

        before = quiet()
        for _ in range(10):
            assert get(HOST, server.port, "/")[0] == 200
        # The 10 requests and the scrape before them, whichever worker took them.
        scrapes = [settled(11, before)] + [scrape(server) for _ in range(9)]
        for samples in scrapes:
            assert set(requests_by_worker(samples)) == {"1", "2"}, samples
        def in_flight(samples) -> float:
            return sum(gauge for (name, _), gauge in samples.items() if name == "graceful_http_requests_in_flight")

        # Only the scrape itself in flight, once the scrapes before it have left the gauge. Not asserted on
        # scrapes[0]: the collector reads the workers' files in directory order, not as one snapshot, so it
        # may read the other worker's gauge before that worker's last scrape left it and its counter after.
        quiet_gauge = wait_until(lambda: (samples := scrape(server)) and in_flight(samples) == 1 and samples, 10,
                                 "the in-flight gauge to count only the scrape", server.log_tail)
        assert set(requests_by_worker(quiet_gauge)) == {"1", "2"}, quiet_gauge
        assert len(list(shared.iterdir())) == 1, "one shared directory per generation"

        # A worker killed and replaced (fork+exec): what it counted stays counted, its in-flight gauge goes.
        counted = sum(requests_by_worker(scrape(server)).values())
        os.kill(workers.pop(), signal.SIGKILL)
        server.wait_for_log("replacing it in")
        wait_until(lambda: len(re.findall(r"worker \d started as pid", server.log())) == 3, 20,
                   "the replacement worker", server.log_tail)
        wait_until(lambda: server.get_pid() not in workers, 20, "the replacement worker to answer", server.log_tail)
        # Only the scrape itself in flight (the requests above leave the gauge just after their answer).
        after = wait_until(lambda: (samples := scrape(server)) and in_flight(samples) == 1 and samples, 10,
                           "the in-flight gauge to count only the scrape", server.log_tail)
        assert set(requests_by_worker(after)) == {"1", "2"}, after
        assert sum(requests_by_worker(after).values()) >= counted + 1

        server.post_graceful()
        second = server.wait_new_main(first)
        server.wait_gone(first)
        assert value(scrape(server), "graceful_http_reloads_total", result="succeeded") == 1
        assert len(list(shared.iterdir())) == 1, "the old generation's directory went with it"
        os.kill(second, signal.SIGTERM)
        server.wait_gone(second)
    assert list(shared.iterdir()) == []


# ---- (j) bad input ---------------------------------------------------------------------


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
    from graceful_http.wire import control_address as address_for

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
