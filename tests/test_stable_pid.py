"""The stable-pid holder: outside systemd the first process stays, the generations hand over below it.

First the holder's decisions without processes (holderstate). Then end to end,
once per engine, with a real HTTP load and real signals: graceful-http as PID 1
of a PID namespace (`unshare --pid --fork --mount-proc`, as a container without
an init runs it), and with `--stable-pid` as a plain process. Pids inside the
namespace (the pid file, the demo's answers, the log) are the namespace's; the
test maps them to this machine's pids through /proc/<pid>/status (NSpid).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from graceful_http import holderstate
from graceful_http.holderstate import HOLDER_FD_VARIABLE, Service, holder_wanted, parse_report
from support.load import Load, get, pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, alive, clean_environ, free_port, installed_engine, wait_until

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc")


# ---- the decisions (no processes) ----------------------------------------------------------------


def test_pid_1_always_holds_even_when_told_not_to():
    assert holder_wanted(None, 1, {})
    assert holder_wanted(False, 1, {})
    assert holder_wanted(None, 1, {"NOTIFY_SOCKET": "/run/systemd/notify"})  # an init must reap; its exit kills all


def test_outside_systemd_it_holds_unless_told_not_to():
    assert holder_wanted(None, 4242, {})
    assert holder_wanted(True, 4242, {})
    assert not holder_wanted(False, 4242, {})


def test_under_systemd_there_is_no_holder_even_when_asked():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert not holder_wanted(None, 4242, environ)
    assert not holder_wanted(True, 4242, environ)


def test_a_generation_started_by_a_holder_never_holds():
    environ = {HOLDER_FD_VARIABLE: "5"}
    assert not holder_wanted(None, 4242, environ)
    assert not holder_wanted(True, 4242, environ)
    assert not holder_wanted(None, 1, environ)  # even as PID 1 of a namespace made inside the service


def test_exit_codes_are_the_childs_or_128_plus_its_signal():
    assert holderstate.exit_code_of(0) == 0
    assert holderstate.exit_code_of(3 << 8) == 3
    assert holderstate.exit_code_of(signal.SIGKILL) == 128 + signal.SIGKILL
    assert holderstate.exit_code_of(signal.SIGTERM) == 128 + signal.SIGTERM


def test_reports_are_parsed_strictly():
    assert parse_report(b"main 7") == 7
    assert parse_report(b"main 12\n") == 12
    for junk in (b"", b"main", b"main x", b"mains 3", b"ready 3", b"main -1", b"\xff\xfe"):
        assert parse_report(junk) is None, junk


def test_signals_go_to_the_main_that_reported_last():
    service = Service(main=10)
    assert service.signal_received(signal.SIGHUP) == [(10, signal.SIGHUP)]  # generation 1 before it reports
    assert service.main_reported(10, 1) == []
    assert service.main_reported(20, 2) == []
    for signum in holderstate.FORWARDED_SIGNALS:
        assert service.signal_received(signum) == [(20, signum)]


def test_the_exit_code_is_the_last_mains_not_the_first_generations():
    service = Service(main=10)
    service.main_reported(20, 2)
    assert not service.reaped(10, 0)  # the old main drained and exited 0: not the main any more
    assert service.reaped(20, signal.SIGKILL)
    assert service.exit_code() == 128 + signal.SIGKILL


def test_a_generation_that_never_became_main_does_not_decide_the_exit_code():
    service = Service(main=10)
    assert not service.reaped(30, 1 << 8)  # a successor that failed to start
    assert service.reaped(10, 0)
    assert service.exit_code() == 0


def test_with_no_main_ever_reaped_the_exit_code_says_failure():
    assert Service(main=10).exit_code() == holderstate.NO_MAIN_EXIT_CODE != 0


def test_a_stop_while_no_main_is_known_waits_for_the_next_main():
    service = Service(main=10)
    service.reaped(10, 0)  # the main died; its successor (still starting) will serve as main
    assert service.signal_received(signal.SIGHUP) == []  # a reload with nobody to do it is dropped
    assert service.signal_received(signal.SIGTERM) == []
    assert service.stopping
    assert service.main_reported(30, 3) == [(30, signal.SIGTERM)]
    assert service.main_reported(30, 3) == []  # delivered once


# ---- the report channel (in this process, real sockets) -------------------------------------------------


def test_a_main_reports_on_the_channel_and_the_kernel_names_it(monkeypatch):
    from graceful_http.holder import _CREDENTIALS_SIZE, _sender_pid, report_main

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with mine, theirs:
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        monkeypatch.setenv(HOLDER_FD_VARIABLE, str(theirs.fileno()))
        report_main(7)
        message, ancillary, _, _ = mine.recvmsg(64, socket.CMSG_SPACE(_CREDENTIALS_SIZE))
    assert parse_report(message) == 7
    assert _sender_pid(ancillary) == os.getpid()


def test_a_report_goes_nowhere_but_a_datagram_channel(monkeypatch, capsys):
    from graceful_http.holder import report_main

    stream, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with stream, peer:
        monkeypatch.setenv(HOLDER_FD_VARIABLE, str(stream.fileno()))
        report_main(2)
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(64)
    assert "is not the holder's channel" in capsys.readouterr().err
    monkeypatch.delenv(HOLDER_FD_VARIABLE)
    report_main(2)  # no holder: nothing to do, nothing said
    assert capsys.readouterr().err == ""


# ---- end to end: helpers ---------------------------------------------------------------------------


@pytest.fixture(params=list(ENGINES))
def python(request) -> str:
    return installed_engine(request.param)


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rpartition(")")[2].split()[1])


def state_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(p) for p in file.read().split()]
    except OSError:
        return []


class Namespace:
    """The PID namespace `unshare --pid --fork` made: its PID 1 (our holder) and the pids inside it."""

    def __init__(self, server: ServeProcess):
        self.server = server
        self.holder = wait_until(lambda: (children_of(server.pid) or [None])[0], 20,
                                 "unshare to start PID 1 of the namespace", server.log_tail)
        self.ns = os.readlink(f"/proc/{self.holder}/ns/pid")

    def processes(self) -> dict[int, int]:
        """{pid inside the namespace: pid here} of every process in it, zombies included."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self.ns:
                    continue
                with open(f"/proc/{entry}/status") as file:
                    nspid = next(line for line in file if line.startswith("NSpid:"))
            except (OSError, StopIteration):
                continue
            found[int(nspid.split()[-1])] = int(entry)
        return found

    def host_pid(self, inner: int) -> int:
        pid = self.processes().get(inner)
        assert pid is not None, f"no pid {inner} in the namespace\n{self.server.log_tail()}"
        return pid

    def wait_new_main(self, old: int, timeout: float = 20) -> int:
        """ServeProcess.wait_new_main, for pids of the namespace: the pid file names a successor that took over."""
        server = self.server
        new = wait_until(lambda: (pid := server.main_pid()) not in (None, old) and pid, timeout,
                         f"the pid file to name a successor of {old}", server.log_tail)
        took_over = re.compile(rf"took over as main: generation \d+ \(pid {new}\) serving")
        wait_until(lambda: took_over.search(server.log()), timeout, f"pid {new} to take over", server.log_tail)
        assert state_of(self.host_pid(new)) not in (None, "Z"), f"new main {new} is not running"
        return new

    def wait_only(self, main: int) -> None:
        """Wait until the namespace holds the holder and the generation of `main` (it and its standby), nothing
        else (an old main's standby ends a moment after it)."""
        def only() -> bool:
            return set(self.processes().values()) == {self.holder, *self.server.generation(self.host_pid(main))}
        wait_until(only, 20, f"only the holder and the generation of pid {main} to be left",
                   lambda: f"{self.processes()}\n{self.server.log_tail()}")

    def zombies(self) -> list[int]:
        return [pid for pid in self.processes().values() if state_of(pid) == "Z"]

    def reload_cli(self) -> subprocess.CompletedProcess:
        """`graceful-http reload --pid-file` from inside the namespace, as `podman exec` would run it."""
        command = ["nsenter", "-t", str(self.holder), "-p", "-m", self.server.python, "-m", "graceful_http",
                   "reload", "--pid-file", str(self.server.pid_file), "--timeout", "30"]
        return subprocess.run(command, capture_output=True, text=True, env=clean_environ(), timeout=60)


def wait_answering(server: ServeProcess) -> int:
    """Until GET / answers and the pid file names the pid that answered; that pid."""
    def serving():
        if server.popen.poll() is not None:
            raise AssertionError(f"exited with {server.popen.returncode}\n{server.log_tail()}")
        try:
            status, body, _ = get(HOST, server.port, "/", timeout=5)
        except OSError:
            return None
        return pid_of(body) if status == 200 and pid_of(body) == server.main_pid() else None
    return wait_until(serving, 20, f"GET / on port {server.port} and the pid file to agree", server.log_tail)


def refused(port: int) -> bool:
    try:
        probe = socket.create_connection((HOST, port), timeout=2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # it sat in the backlog as the last copy closed: the next one is refused
        return False
    probe.close()
    return False


def stop_with_a_request_in_flight(server: ServeProcess, target: int, signum: int, main: int) -> None:
    """`signum` to `target` (the holder) while GET /sleep runs on `main`: answered, then exit 0."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        connection.request("GET", "/")
        assert pid_of(connection.getresponse().read()) == main
        connection.request("GET", "/sleep?seconds=2")
        os.kill(target, signum)
        # The holder drops its copies of the sockets on a stop: once the main stops accepting, nobody listens.
        wait_until(lambda: refused(server.port), 5, "new connections to be refused after the stop", server.log_tail)
        assert server.popen.poll() is None, "exited with a request in flight"
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200
    assert body.startswith(f"Hello, graceful pid:{main},".encode()), body
    assert server.popen.wait(timeout=20) == 0, server.log_tail()
    assert not server.pid_file.exists(), "a stopped service must remove its pid file"


# ---- end to end: PID 1 of a PID namespace ------------------------------------------------------------

RELOADS_UNDER_LOAD = 3


@pytest.fixture
def pid1(python, tmp_path):
    server = ServeProcess(python, tmp_path, pid_file=True, stable_pid=True, prefix=UNSHARE)
    try:
        yield server
    finally:
        server.kill_all()


def test_pid_1_reloads_under_load_keep_its_pid_and_lose_nothing_then_sigterm_drains(pid1):
    """3 reloads by SIGHUP to PID 1 (from this machine), 3 by `graceful-http reload` inside; then SIGTERM."""
    pid1.start()
    namespace = Namespace(pid1)
    mains = [wait_answering(pid1)]
    assert namespace.processes()[1] == namespace.holder, "the holder must be PID 1 of the namespace"
    assert mains[0] != 1
    with Load(HOST, pid1.port, clients=8) as load:
        load.wait_for_requests(100)
        for how in ["SIGHUP"] * RELOADS_UNDER_LOAD + ["graceful-http reload"] * RELOADS_UNDER_LOAD:
            old, old_here = mains[-1], namespace.host_pid(mains[-1])
            if how == "SIGHUP":
                os.kill(namespace.holder, signal.SIGHUP)
            else:
                result = namespace.reload_cli()
                assert result.returncode == 0, result.stderr
            new = namespace.wait_new_main(old)
            if how != "SIGHUP":
                assert int(result.stdout) == new
            mains.append(new)
            wait_until(lambda: load.result.pids[new] > 0, 10, f"the load to be answered by {new}",
                       lambda: load.result.summary())
            wait_until(lambda: state_of(old_here) is None, 20, f"old main {old} to exit and be reaped",
                       pid1.log_tail)
            assert ppid_of(namespace.host_pid(new)) == namespace.holder, "a new generation is PID 1's child"
            load.wait_for_requests(50)
    assert load.result.failures == [], load.result.summary()
    assert set(load.result.pids) == set(mains), load.result.summary()
    assert children_of(pid1.pid) == [namespace.holder] and alive(namespace.holder), "PID 1 was replaced"
    namespace.wait_only(mains[-1])
    assert pid1.log().count("is main; signals go to it") == 2 * RELOADS_UNDER_LOAD
    stop_with_a_request_in_flight(pid1, namespace.holder, signal.SIGTERM, mains[-1])
    assert "SIGTERM received: stopping" in pid1.log()


ZOMBIE_RELOADS = 20


def test_pid_1_reaps_every_old_generation_after_20_reloads(pid1):
    """Each old generation is PID 1's child once its predecessor's double fork is done: unreaped, it would stay a
    zombie. After 20 reloads the namespace holds the holder, the main and nothing else."""
    pid1.start()
    namespace = Namespace(pid1)
    main = wait_answering(pid1)
    for _ in range(ZOMBIE_RELOADS):
        old_here = namespace.host_pid(main)
        os.kill(namespace.holder, signal.SIGHUP)
        main = namespace.wait_new_main(main)
        wait_until(lambda: state_of(old_here) is None, 20, "the old main to exit and be reaped", pid1.log_tail)
    assert get(HOST, pid1.port)[0] == 200
    assert namespace.zombies() == [], f"zombies in the namespace: {namespace.zombies()}"
    namespace.wait_only(main)


def test_pid_1_exits_with_the_last_mains_status(pid1):
    """Generation 1 drains and exits 0 after a reload; the main after it is SIGKILLed: PID 1 exits 128+9."""
    pid1.start()
    namespace = Namespace(pid1)
    first = wait_answering(pid1)
    os.kill(namespace.holder, signal.SIGHUP)
    second = namespace.wait_new_main(first)
    wait_until(lambda: first not in namespace.processes(), 20, "generation 1 to exit", pid1.log_tail)
    os.kill(namespace.host_pid(second), signal.SIGKILL)
    assert pid1.popen.wait(timeout=20) == 128 + signal.SIGKILL, pid1.log_tail()  # unshare passes PID 1's on
    assert f"main pid {second} was killed by signal {signal.SIGKILL}" in pid1.log()


def test_pid_1_holds_even_with_no_stable_pid(python, tmp_path):
    with ServeProcess(python, tmp_path, pid_file=True, prefix=UNSHARE) as server:  # adds --no-stable-pid
        namespace = Namespace(server)
        main = wait_answering(server)
        assert main != 1 and ppid_of(namespace.host_pid(main)) == namespace.holder


# ---- end to end: --stable-pid as a plain process -----------------------------------------------------


@pytest.fixture
def holder(python, tmp_path):
    server = ServeProcess(python, tmp_path, pid_file=True, stable_pid=True)
    try:
        yield server
    finally:
        server.kill_all()


def test_stable_pid_reloads_under_load_and_ctrl_c_stops_the_current_main(holder):
    holder.start("--stable-pid")
    mains = [wait_answering(holder)]
    assert mains[0] != holder.pid and ppid_of(mains[0]) == holder.pid
    with Load(HOST, holder.port, clients=8) as load:
        load.wait_for_requests(100)
        for how in ["SIGHUP", "graceful-http reload"] * RELOADS_UNDER_LOAD:
            old = mains[-1]
            if how == "SIGHUP":
                os.kill(holder.pid, signal.SIGHUP)
            else:
                result = holder.reload_cli()
                assert result.returncode == 0, result.stderr
            new = holder.wait_new_main(old)
            mains.append(new)
            wait_until(lambda: load.result.pids[new] > 0, 10, f"the load to be answered by {new}",
                       lambda: load.result.summary())
            wait_until(lambda: state_of(old) is None, 20, f"old main {old} to exit and be reaped", holder.log_tail)
            # Double-forked by its predecessor, the new main is reparented to the holder (a child subreaper).
            assert ppid_of(new) == holder.pid
            load.wait_for_requests(50)
    assert load.result.failures == [], load.result.summary()
    assert set(load.result.pids) == set(mains), load.result.summary()
    assert holder.popen.poll() is None
    wait_until(lambda: holder.processes() == {holder.pid, *holder.generation(mains[-1])}, 20,
               "only the holder and the current generation to be left", holder.log_tail)
    # Ctrl-C in a terminal: SIGINT to the foreground process, the holder; the current main drains.
    stop_with_a_request_in_flight(holder, holder.pid, signal.SIGINT, mains[-1])
    assert "SIGINT received: stopping" in holder.log()


def test_outside_systemd_the_holder_is_the_default_and_no_stable_pid_turns_it_off(python, tmp_path):
    with ServeProcess(python, tmp_path, pid_file=True, stable_pid=True) as server:  # no flag at all
        main = wait_answering(server)
        assert main != server.pid and ppid_of(main) == server.pid
        server.wait_for_log(f"pid {server.pid} holds the service (stable pid)")  # once generation 1 reports
    with ServeProcess(python, tmp_path, pid_file=True) as server:  # --no-stable-pid
        assert wait_answering(server) == server.pid
        assert "holds the service" not in server.log()


def test_a_generation_that_cannot_start_makes_the_holder_exit_1_with_one_line(python, tmp_path):
    result = subprocess.run([python, "-m", "graceful_http", "serve", "--stable-pid", "gh_no_such_module:app",
                             "--bind", f"{HOST}:{free_port()}", "--app-dir", str(tmp_path)],
                            capture_output=True, text=True, env=clean_environ(), cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("cannot start: cannot import 'gh_no_such_module': no module named 'gh_no_such_module'")


def test_the_holder_imports_no_http_engine(python, tmp_path):
    """The holder stays for the service's whole life: it must not carry uvicorn, asyncio or the app."""
    with ServeProcess(python, tmp_path, pid_file=True, stable_pid=True) as server:
        wait_answering(server)
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "uvloop" not in maps and "httptools" not in maps and "_asyncio" not in maps, "engine code loaded"
        probe = subprocess.run([python, "-c", PROBE_IMPORTS], capture_output=True, text=True,
                               env=clean_environ(), timeout=30)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == [], f"the holder's import path pulls in: {probe.stdout}"


# What the holder imports (cli, settings, listeners, holder) must not bring the engine, the app or asyncio.
PROBE_IMPORTS = """
import sys
from graceful_http import cli, holder, listeners, settings
print(" ".join(m for m in ("uvicorn", "asyncio", "graceful_http.supervisor", "graceful_http.engine") if m in sys.modules))
"""


# ---- end to end: orphans and workers under PID 1 -----------------------------------------------------

ORPHAN_APP = '''
import subprocess

from graceful_http.demo import app as demo


async def app(scope, receive, send):
    """GET /orphan starts `sleep` in the background of a shell that exits at once: an orphan, whose pid it answers."""
    if scope["type"] == "http" and scope["path"] == "/orphan":
        body = subprocess.check_output(["sh", "-c", "sleep 2 >/dev/null 2>&1 & echo $!"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await demo(scope, receive, send)
'''
ORPHANS = 5


def test_pid_1_adopts_and_reaps_the_apps_orphans(python, tmp_path):
    (tmp_path / "orphan_app.py").write_text(ORPHAN_APP)
    with ServeProcess(python, tmp_path, "orphan_app:app", "--app-dir", str(tmp_path), pid_file=True,
                      stable_pid=True, prefix=UNSHARE) as server:
        namespace = Namespace(server)
        wait_answering(server)
        orphans = []
        for _ in range(ORPHANS):
            status, body, _ = get(HOST, server.port, "/orphan")
            assert status == 200, body
            orphan = namespace.host_pid(int(body))
            assert ppid_of(orphan) == namespace.holder, "an orphan is PID 1's to reap"
            orphans.append(orphan)
        wait_until(lambda: not any(state_of(pid) for pid in orphans), 20,
                   "every orphan to exit and be reaped (a zombie would stay)", server.log_tail)
        assert namespace.zombies() == []


def test_pid_1_with_workers_reloads_under_load_and_reaps_a_killed_mains_workers(python, tmp_path):
    """With --workers 2: a reload loses nothing; SIGKILL to the main orphans its workers, which stop (they die
    with their parent) and are reaped by PID 1, which then exits with the killed main's status."""
    with ServeProcess(python, tmp_path, "--workers", "2", pid_file=True, stable_pid=True, prefix=UNSHARE) as server:
        namespace = Namespace(server)
        wait_until(lambda: server.main_pid(), 30, "the pid file", server.log_tail)
        first = server.main_pid()
        with Load(HOST, server.port, clients=8) as load:
            load.wait_for_requests(100)
            os.kill(namespace.holder, signal.SIGHUP)
            main = namespace.wait_new_main(first)
            wait_until(lambda: first not in namespace.processes(), 30, "generation 1 to exit", server.log_tail)
            load.wait_for_requests(100)
        assert load.result.failures == [], load.result.summary()
        workers = [pid for pid in namespace.processes().values() if ppid_of(pid) == namespace.host_pid(main)]
        assert len(workers) == 2, (workers, namespace.processes())
        os.kill(namespace.host_pid(main), signal.SIGKILL)
        assert server.popen.wait(timeout=30) == 128 + signal.SIGKILL, server.log_tail()
        assert not any(state_of(pid) for pid in workers)
