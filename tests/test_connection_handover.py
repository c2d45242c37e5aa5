"""Connection handover end to end: naive keep-alive clients across 30 reloads see no close, standalone
and under real systemd.

`graceful-http serve` (both engines, 1 and 2 workers) serves tests/apps/echo_app.py to naive
`http.client` clients (support/naive_load.py: GETs, POSTs with bodies, pipelined pairs, and an eager
client with no pause) while the main gets SIGHUP 30 times. Every request must be answered on the
client's one TCP connection: 0 failed requests, 0 reconnects. The serving generation's descriptors
must not grow from reload to reload, and each drain's last line counts what moved. Under systemd the
reloads are `systemctl reload`, and the shipped unit's sandbox applies.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from harness.container import wait_until as wait_in_container
from harness.systemd_service import SERVICE, SOCKET, InstalledService, count
from support.naive_load import NaiveClients
from support.prometheus import scrape
from support.serve_process import ENGINES, HOST, SERVICE_DIR, ServeProcess, wait_until

APPS = Path(__file__).resolve().parent / "apps"
REPO = Path(__file__).resolve().parents[1]
WITHOUT_HANDOVER = "7c244e1"  # the last commit before connection handover
RELOADS = 30
CLIENTS = 12
DRAINED = re.compile(r"gen \d+: drained: .*; connections: (\d+) handed over, (\d+) fell back")  # a main's
JOURNAL_DRAINED = re.compile(r"^drained: .*; connections: (\d+) handed over, (\d+) fell back$", re.MULTILINE)


def descriptors(pids: set[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_naive_keep_alive_clients_see_no_close_across_30_reloads(engine, workers, tmp_path):
    with ServeProcess(ENGINES[engine], tmp_path, "echo_app:app", "--app-dir", str(APPS), "--no-access-log",
                      "--workers", str(workers), pid_file=True) as server:
        server.wait_serving()
        main = server.main_pid()
        fds = {}
        with NaiveClients(HOST, server.port, count=CLIENTS) as clients:
            clients.wait_for_requests(50)
            for reload in range(1, RELOADS + 1):
                os.kill(main, signal.SIGHUP)
                new = server.wait_new_main(main)
                if reload in (2, RELOADS):  # every connection has moved once the old generation is gone
                    server.wait_gone(main)
                    server.wait_only(new)
                    clients.wait_for_requests(2 * CLIENTS)
                    fds[reload] = descriptors(server.processes())
                main = new
                clients.wait_for_requests(CLIENTS)  # the load flows on
        result = clients.result
        log = server.log()
    assert result.failures == [], result.summary()
    assert result.connects == CLIENTS, f"clients had to reconnect: {result.summary()}"
    assert set(result.by_behaviour) == {"get", "post", "pipelined", "eager"}
    assert len(result.pids) > RELOADS * workers / 2, f"the load was not answered by the new generations: {result.summary()}"
    drains = [(int(moved), int(fell)) for moved, fell in DRAINED.findall(log)]
    assert len(drains) == RELOADS, f"one drain line per old generation (its main): {drains}"
    assert [drain for drain in drains if drain != (CLIENTS, 0)] == [], "(handed over, fell back) per drain"
    assert fds[RELOADS] == fds[2], f"the serving generation's descriptors grew: {fds}"


def handover_counts(server: ServeProcess) -> dict[str, float]:
    """graceful_http_handover_connections_total by result, summed over workers (a scrape is a new connection)."""
    totals: dict[str, float] = {}
    for (name, labels), gauge in scrape(HOST, server.port).items():
        if name == "graceful_http_handover_connections_total":
            result = dict(labels)["result"]
            totals[result] = totals.get(result, 0) + gauge
    return totals


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_metrics_and_the_drain_line_count_what_moved(engine, workers, tmp_path):
    """Three idle keep-alive connections and one busy with a slow request at a reload: all four move (the
    busy one once answered), and the new generation's /metrics counts them adopted and, as the old
    generation reported at the end of its drain, handed over, none fallen back."""
    import http.client

    with ServeProcess(ENGINES[engine], tmp_path, "--metrics", "--workers", str(workers), pid_file=True) as server:
        server.wait_serving()
        old = server.main_pid()
        idle = [http.client.HTTPConnection(HOST, server.port, timeout=30) for _ in range(3)]
        busy = http.client.HTTPConnection(HOST, server.port, timeout=30)
        for connection in idle:
            connection.request("GET", "/")
            connection.getresponse().read()
        busy.request("GET", "/sleep?seconds=2")
        os.kill(old, signal.SIGHUP)
        server.wait_new_main(old)
        assert busy.getresponse().read().startswith(b"Hello, graceful pid:")
        server.wait_gone(old)
        for connection in [*idle, busy]:
            connection.request("GET", "/")
            assert connection.getresponse().status == 200
            connection.close()

        totals = wait_until(lambda: (lambda totals: totals if totals.get("handed_over") == 4 else None)(
            handover_counts(server)), 10, "the old generation's report in /metrics", server.log_tail)
        log = server.log()
    assert totals == {"adopted": 4, "handed_over": 4}
    assert re.search(rf"graceful-http\[{old}\] gen 1: drained: \d+ request\(s\) answered while draining, 0 cut;"
                     r" connections: 4 handed over, 0 fell back", log), log


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, counting the connections it opens."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path
        self.connects = 0

    def connect(self):
        self.connects += 1
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_connections_on_a_unix_socket_listener_move_too(engine, workers, tmp_path):
    path = str(tmp_path / "http.sock")
    with ServeProcess(ENGINES[engine], tmp_path, "--bind", f"unix:{path}", "--workers", str(workers), bind=False,
                      pid_file=True) as server:
        wait_until(lambda: server.main_pid() == server.pid and "took over" not in server.log()
                   and re.search(r"ready: generation 1", server.log()), 20, "the first generation", server.log_tail)
        client = UnixHTTPConnection(path)
        answers = []
        main = server.main_pid()
        for _ in range(4):
            client.request("GET", "/")
            response = client.getresponse()
            answers.append(re.search(rb"pid:(\d+)", response.read()).group(1))
            assert not response.will_close
            os.kill(main, signal.SIGHUP)
            new = server.wait_new_main(main)
            server.wait_gone(main)
            main = new
        client.request("GET", "/")
        answers.append(re.search(rb"pid:(\d+)", client.getresponse().read()).group(1))
        connects = client.connects
        client.close()
        log = server.log()
    assert len(set(answers)) == 5, f"each generation answered on the one connection: {answers}"
    assert connects == 1
    assert len(DRAINED.findall(log)) == 4 and all(d == ("1", "0") for d in DRAINED.findall(log)), DRAINED.findall(log)


def install_code(directory: Path, commit: str | None) -> None:
    """Put graceful-http's code at `directory` as a package upgrade would: from `commit`, or this checkout."""
    shutil.rmtree(directory, ignore_errors=True)
    if commit is None:
        shutil.copytree(SERVICE_DIR, directory)
        return
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "service"], capture_output=True, timeout=60)
    assert archive.returncode == 0, f"this test needs the git history (commit {commit}): {archive.stderr!r}"
    subprocess.run(["tar", "-x", "-C", str(directory), "--strip-components=1"], input=archive.stdout, check=True)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_reloads_into_and_out_of_a_version_without_handover(engine, tmp_path):
    """An upgrade from a version without the feature reloads as before; a downgrade to one (its `ready`
    does not say it adopts connections) drains lame-duck style: the idle connection's next request is
    answered by the old generation with Connection: close."""
    code = tmp_path / "code"
    install_code(code, WITHOUT_HANDOVER)
    with ServeProcess(ENGINES[engine], tmp_path, pid_file=True, environ={"PYTHONPATH": str(code)}) as server:
        server.wait_serving()
        old = server.main_pid()
        install_code(code, None)  # upgrade
        os.kill(old, signal.SIGHUP)
        new = server.wait_new_main(old)
        server.wait_gone(old)
        assert server.get_pid() == new

        client = http.client.HTTPConnection(HOST, server.port, timeout=30)
        client.request("GET", "/")
        assert re.search(rb"pid:(\d+)", client.getresponse().read()).group(1) == str(new).encode()
        install_code(code, WITHOUT_HANDOVER)  # downgrade
        os.kill(new, signal.SIGHUP)
        older = server.wait_new_main(new)
        client.request("GET", "/")  # within the draining generation's idle grace: it answers, and says close
        response = client.getresponse()
        assert re.search(rb"pid:(\d+)", response.read()).group(1) == str(new).encode()
        assert response.getheader("connection") == "close"
        client.close()
        server.wait_gone(new)
        assert server.get_pid() == older
        log = server.log()
    assert f"graceful-http[{new}] gen 2: generation 3 (pid {older}) does not take connections over" in log, log
    # The request is either in flight when the drain starts or arrives during it: answered either way, once.
    in_flight = re.search(rf"graceful-http\[{new}\] gen 2: no longer accepting; finishing (\d+) in-flight", log)
    drained = re.search(rf"graceful-http\[{new}\] gen 2: drained: (\d+) request\(s\) answered while draining, 0 cut\n",
                        log)
    assert in_flight and drained and int(in_flight.group(1)) + int(drained.group(1)) == 1, log


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_new_generation_that_dies_takes_only_the_connections_it_adopted(engine, tmp_path):
    """Six idle connections move to the new generation, then it is killed: those six are lost with it
    (the kernel closes them), nothing else. The seventh, busy with a slow request in the old generation,
    is answered there; it can no longer move (the channel is gone), so it falls back to the lame-duck
    drain: the old generation answers on, and says Connection: close."""
    with ServeProcess(ENGINES[engine], tmp_path, "--metrics", pid_file=True) as server:
        server.wait_serving()
        old = server.main_pid()
        idle = [http.client.HTTPConnection(HOST, server.port, timeout=30) for _ in range(6)]
        for connection in idle:
            connection.request("GET", "/")
            connection.getresponse().read()
        busy = http.client.HTTPConnection(HOST, server.port, timeout=30)
        busy.request("GET", "/sleep?seconds=3")
        os.kill(old, signal.SIGHUP)
        new = server.wait_new_main(old)
        wait_until(lambda: handover_counts(server).get("adopted") == 6, 10, "the new generation to adopt six",
                   server.log_tail)
        for connection in idle:  # each answered by the new generation
            connection.request("GET", "/")
            assert re.search(rb"pid:(\d+)", connection.getresponse().read()).group(1) == str(new).encode()
        os.killpg(new, signal.SIGKILL)
        server.wait_gone(new)
        lost = 0
        for connection in idle:
            try:
                connection.request("GET", "/")
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                lost += 1
        slow = busy.getresponse()
        assert slow.read().startswith(f"Hello, graceful pid:{old},".encode()) and not slow.will_close
        answered_by = set()
        for _ in range(20):  # served here, until its handover fails and the old generation says close
            busy.request("GET", "/")
            last = busy.getresponse()
            answered_by.add(re.search(rb"pid:(\d+)", last.read()).group(1))
            if last.will_close:
                break
        assert last.getheader("connection") == "close" and answered_by == {str(old).encode()}
        busy.close()
        server.wait_gone(old)
        log = server.log()
    assert lost == 6
    assert re.search(rf"graceful-http\[{old}\] gen 1: drained: \d+ request\(s\) answered while draining, 0 cut;"
                     r" connections: 6 handed over, 1 fell back", log), log


@pytest.mark.systemd
@pytest.mark.parametrize("engine,workers", [("pypi", 1), ("debian", 1), ("pypi", 2), ("debian", 2)])
def test_under_systemd_naive_clients_see_no_close_across_30_reloads(engine, workers):
    with InstalledService(f"gh-handover-{engine}-{workers}-{os.getpid()}", engine,
                          serve_args=f"echo_app:app --no-access-log --workers {workers}") as service:
        service.write_app("echo_app", (APPS / "echo_app.py").read_text())
        service.container.systemctl("start", SOCKET)
        with NaiveClients(HOST, service.port, count=CLIENTS) as clients:  # the first connection starts it
            clients.wait_for_requests(50)
            pids = [service.main_pid()]
            for _ in range(RELOADS):
                result = service.reload()
                assert result.returncode == 0, result.stderr
                pids.append(service.main_pid())
                clients.wait_for_requests(CLIENTS)
            # systemctl status tells how many connections the serving generation took over.
            status = lambda: service.container.show(SERVICE, "StatusText")["StatusText"]  # noqa: E731
            wait_in_container(lambda: status().endswith(f" · {CLIENTS} connections adopted"), timeout=10,
                              what="STATUS= to count the adopted connections")
        result = clients.result
        wait_in_container(lambda: set(service.cgroup_pids()) == service.generation(pids[-1]), timeout=30,
                          what="old generations to exit")
        state = service.state()
        journal = service.journal()
    assert result.failures == [], result.summary()
    assert result.connects == CLIENTS, f"clients had to reconnect: {result.summary()}"
    assert len(set(pids)) == RELOADS + 1
    assert state["NRestarts"] == "0" and state["ActiveState"] == "active"
    drains = [(int(moved), int(fell)) for moved, fell in JOURNAL_DRAINED.findall(journal)]
    assert len(drains) == RELOADS, drains
    assert [drain for drain in drains if drain != (CLIENTS, 0)] == [], "(handed over, fell back) per drain"
    assert count("reception only permitted for main PID", journal) == 0


def _response(sock: socket.socket) -> tuple[http.client.HTTPResponse, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, json.loads(response.read())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_connection_answered_before_its_body_arrived_moves_once_the_body_is_read(engine, tmp_path):
    """An app that answers without reading the body (options_app), a client whose body comes after the
    answer (as http.client's does when Nagle holds its second send): once the rest of the body is read the
    connection is between two requests again, and a reload hands it over like any idle one."""
    with ServeProcess(ENGINES[engine], tmp_path, "options_app:app", "--app-dir", str(APPS), "--no-access-log",
                      pid_file=True) as server:
        server.wait_serving()
        main = server.main_pid()
        with socket.create_connection((HOST, server.port), timeout=30) as sock:
            sock.sendall(b"POST /early HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n")
            assert _response(sock)[0].status == 200  # answered with the body still to come
            sock.sendall(b"payload=1")  # read long before the new generation is ready to take connections
            os.kill(main, signal.SIGHUP)
            new = server.wait_new_main(main)
            server.wait_gone(main)
            sock.sendall(b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n")
            response, answer = _response(sock)
        log = server.log()
    assert response.status == 200 and response.getheader("connection") != "close", response.getheaders()
    assert answer["pid"] == new, f"answered by {answer['pid']}, the new main is {new}"
    assert DRAINED.findall(log) == [("1", "0")], f"(handed over, fell back): {DRAINED.findall(log)}\n{log[-2000:]}"
