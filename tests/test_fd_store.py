"""Idle keep-alive connections across `systemctl restart` and a crash, through systemd's fd store.

The pure decisions (`fdstore.StoreBook`) first; then, under real systemd (Debian 12's 252 on the host's
root, Debian 13's 257 on a debootstrapped root), the shipped unit serving tests/apps/echo_app.py:
- across 5 `systemctl restart`s: naive keep-alive clients (http.client reusing its connection without
  checking it, never retrying) idle at each restart keep their one connection; busy clients beside them
  lose no request; the store never holds more descriptors than there are open connections;
- idle connections across a SIGKILL of the main (Restart=on-failure): each client's next request on its
  same connection is answered by the new main;
- a reload (a new generation, MAINPID handoff) leaves each connection stored once, by the new generation;
- a crash loop still ends with the unit failed as `Restart=` and the start limit say, the store released;
- Type=notify-reload cannot make `systemctl reload` fail (why graceful-http keeps ExecReload=).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from graceful_http import generation as g
from graceful_http.fdstore import Candidate, StoreBook, capacity, is_connection_name
from graceful_http.fdstore_systemd import ConnectionStore
from graceful_http.movable import Verdict
from harness.container import wait_until as wait_in_container
from harness.systemd_service import SERVICE, SOCKET, InstalledService
from support.load import Load
from support.naive_load import ANSWER

APPS = Path(__file__).resolve().parent / "apps"
HOST = "127.0.0.1"
CLIENTS = 8
RESTARTS = 5


# ---- the pure core ----------------------------------------------------------------------------


def test_capacity_comes_from_FDSTORE_and_anything_else_means_no_store():
    assert capacity({"FDSTORE": "4096"}) == 4096
    assert capacity({}) == capacity({"FDSTORE": "many"}) == capacity({"FDSTORE": "-1"}) == 0


def test_stored_connections_are_told_from_listeners_by_name():
    assert is_connection_name("conn-12-1") and not is_connection_name("http") and not is_connection_name("control")


def test_only_connections_idle_for_the_settle_time_are_stored_longest_idle_first_within_room():
    book = StoreBook(pid=7, capacity=2, settle=1.0)
    plan = book.plan([Candidate(1, True, 9.5), Candidate(2, True, 8.0), Candidate(3, False, 0.0),
                      Candidate(4, True, 8.5)], now=10.0)
    assert plan.store == [(2, "conn-7-1"), (4, "conn-7-2")] and plan.remove == []
    assert book.room() == 0
    plan = book.plan([Candidate(1, True, 9.5), Candidate(2, True, 8.0), Candidate(4, True, 8.5)], now=11.0)
    assert plan.store == [] and plan.remove == []  # no room for 1 until one leaves


def test_a_stored_connection_that_is_not_idle_is_taken_out_and_its_room_reused():
    book = StoreBook(pid=7, capacity=1, settle=1.0)
    book.plan([Candidate(1, True, 0.0)], now=5.0)
    plan = book.plan([Candidate(1, False, 0.0), Candidate(2, True, 0.0)], now=6.0)
    assert plan.remove == [(1, "conn-7-1")] and plan.store == [(2, "conn-7-2")]


def test_busy_or_closed_takes_out_once_and_leaving_keeps_the_entry_counted_only_at_a_stop():
    book = StoreBook(pid=7, capacity=3, settle=0.0)
    book.record(1, "conn-3-9")  # handed back by the store at start
    book.plan([Candidate(2, True, 0.0), Candidate(3, True, 0.0)], now=1.0)
    assert book.taken_out(1) == "conn-3-9" and book.taken_out(1) is None
    book.forget(2, still_stored=True)
    book.forget(3, still_stored=False)
    assert book.stored == {} and book.left_in_store == 1 and book.room() == 2


def test_withdraw_all_names_everything_stored_and_empties_the_book():
    book = StoreBook(pid=7, capacity=5, settle=0.0)
    book.record(1, "conn-3-9")
    book.plan([Candidate(2, True, 0.0)], now=1.0)
    assert sorted(book.withdraw_all()) == ["conn-3-9", "conn-7-1"] and book.stored == {}


# ---- the adapter, with a fake engine and a fake notify socket ---------------------------------------


class FakeTransport:
    def __init__(self, sock):
        self.sock = sock

    def get_extra_info(self, name):
        return self.sock if name == "socket" else None

    def is_closing(self):
        return False


class FakeConnection:
    lame_duck = False
    fd_name = None

    def __init__(self, sock, idle=True):
        self.transport = FakeTransport(sock)
        self.idle = idle
        self.last_data_at = 0.0

    def handover_state(self):  # only its presence matters: the fake engine judges by `idle`
        raise AssertionError


class FakeEngine:
    def __init__(self):
        self.connections = set()
        self.server = SimpleNamespace(server_state=SimpleNamespace())
        self.idle_keeper = None

    @staticmethod
    def movable(connection):
        return (Verdict.MOVE if connection.idle else Verdict.WAIT), ""

    def detach(self, connection):
        if not connection.idle:
            return None
        if connection.fd_name is not None:
            self.server.server_state.fd_store.leaving(connection)
        self.connections.discard(connection)
        return os.dup(connection.transport.sock.fileno())


def fake_store(capacity=10):
    sent = []
    engine = FakeEngine()
    store = ConnectionStore(engine, capacity, pid=7, send=lambda text, fds: sent.append((text, len(fds))) or True)
    return engine, store, sent


def test_the_adapter_stores_after_the_settle_time_takes_out_at_the_first_byte_and_withdraws_all():
    engine, store, sent = fake_store()
    a, b = socket.socketpair()
    try:
        idle, busy = FakeConnection(a), FakeConnection(b, idle=False)
        engine.connections |= {idle, busy}
        store.sync(now=100.0)  # first seen now
        assert sent == []
        store.sync(now=101.0)
        assert sent == [("FDSTORE=1\nFDNAME=conn-7-1", 1)] and idle.fd_name == "conn-7-1" and busy.fd_name is None
        store.got_busy_or_closed(idle)  # the protocol's hook: a byte arrived
        assert sent[-1] == ("FDSTOREREMOVE=1\nFDNAME=conn-7-1", 0) and idle.fd_name is None
        store.sync(now=102.0)  # idle again, first seen long ago: stored at once, under a new name
        assert sent[-1] == ("FDSTORE=1\nFDNAME=conn-7-2", 1)
        store.withdraw()
        assert sent[-1] == ("FDSTOREREMOVE=1\nFDNAME=conn-7-2", 0) and idle.fd_name is None
        assert store.book.stored == {} and len(sent) == 4
    finally:
        a.close()
        b.close()


def test_at_a_stop_an_idle_connection_goes_into_the_store_once_and_a_stored_one_is_not_stored_twice():
    async def scenario():
        engine, store, sent = fake_store()
        store.start()
        pairs = [socket.socketpair() for _ in range(2)]
        try:
            stored, fresh = FakeConnection(pairs[0][0]), FakeConnection(pairs[1][0])
            engine.connections |= {stored, fresh}
            store.sync(now=0.0)
            store.sync(now=5.0)
            assert len(sent) == 2
            fresh.fd_name = None  # as if it had just been taken out (a request), and is idle again
            store.book.taken_out(id(fresh))
            store.stopping()
            assert engine.idle_keeper == store.keep
            assert store.keep(stored) and store.keep(fresh)
            assert sent[2:] == [("FDSTORE=1\nFDNAME=conn-7-3", 1)], "the stored one stays under its name"
            assert store.book.left_in_store == 2 and store.kept == 2
            assert not store.keep(FakeConnection(pairs[0][1], idle=False)), "a busy one is left to the drain"
        finally:
            for x, y in pairs:
                x.close()
                y.close()

    asyncio.run(scenario())


def test_a_full_store_stores_nothing_more():
    engine, store, sent = fake_store(capacity=1)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        engine.connections |= {FakeConnection(x) for x, _ in pairs}
        store.sync(now=0.0)
        store.sync(now=5.0)
        store.sync(now=10.0)
        assert [text for text, _ in sent] == ["FDSTORE=1\nFDNAME=conn-7-1"]
    finally:
        for x, y in pairs:
            x.close()
            y.close()


# ---- the supervisor's part: withdraw before the handoff, resume if it fails, keep idle ones at a stop --


class FakeStore:
    """Records what the supervisor asks of the fd store, in the same log as what systemd was told."""

    def __init__(self, log: list):
        self.log = log

    def withdraw(self):
        self.log.append("withdraw")

    def resume(self):
        self.log.append("resume")

    def stopping(self):
        self.log.append("stopping")


def world_with_store():
    from test_supervisor import World

    world = World()
    log: list = []
    send = world.notifier.send
    world.notifier.send = lambda **fields: (log.append(fields), send(**fields))[1]
    world.supervisor.fd_store = FakeStore(log)
    return world, log


def test_the_store_is_withdrawn_before_mainpid_moves_and_resumed_when_the_handover_fails():
    from test_supervisor import settle

    async def scenario():
        world, log = world_with_store()
        assert await world.supervisor.become_main(handed_over=False)
        world.reload()
        await settle()
        [successor] = world.successors
        successor.living = False  # dies once told ready: the old main takes the main PID back
        successor.ready.set_result(g.ChildReady(successor.attempt, successor.pid))
        await settle()
        steps = [entry if isinstance(entry, str) else "MAINPID" for entry in log
                 if isinstance(entry, str) or "MAINPID" in entry]
        # (resume only re-arms the store's timer: its first message comes half a settle time later, after the
        # old main has taken the main PID back)
        assert steps[:2] == ["withdraw", "MAINPID"] and sorted(steps[2:]) == ["MAINPID", "resume"]

    asyncio.run(scenario())


def test_a_stop_keeps_idle_connections_in_the_store():
    from test_supervisor import PID

    async def scenario():
        world, log = world_with_store()
        assert await world.supervisor.become_main(handed_over=False)
        world.supervisor.dispatch(g.StopRequested("SIGTERM"))
        await asyncio.wait_for(world.supervisor.finished.wait(), 5)
        assert [entry for entry in log if isinstance(entry, str)] == ["stopping"]
        assert not world.supervisor.control.connections_move, "busy connections are told Connection: close"
        assert world.supervisor.machine.pid == PID

    asyncio.run(scenario())


# ---- under systemd ------------------------------------------------------------------------------


def stored(service: InstalledService) -> int:
    return int(service.container.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"])


def request(connection: http.client.HTTPConnection, path: str) -> int:
    """One GET on this connection as it is (no check, no retry); the answering pid."""
    connection.request("GET", path)
    response = connection.getresponse()
    text = response.read().decode()
    match = ANSWER.fullmatch(text)
    assert response.status == 200 and match and match.group(2) == path, (response.status, text)
    return int(match.group(1))


class Counting(http.client.HTTPConnection):
    connects = 0

    def connect(self):
        type(self).connects += 1
        super().connect()


@pytest.fixture(scope="module", params=["systemd-252", "systemd-257"])
def service(request):
    """Debian 12's systemd on the host's root with Debian's uvicorn 0.17.6; Debian 13's on a copy of the
    debootstrapped root the package tests boot, with the venv's newest uvicorn."""
    root = None
    engine = "debian"
    if request.param == "systemd-257":
        from test_debian_package import cached_root

        root, engine = str(cached_root("trixie")), "pypi"  # booted under an overlay: the cache stays as it is
    with InstalledService(f"gh-fdstore-{request.param[-3:]}-{os.getpid()}", engine, root=root,
                          serve_args="echo_app:app --no-access-log") as installed:
        version = installed.container.run("systemctl --version").stdout.split()[1]
        assert version == request.param[-3:], f"booted systemd {version}"
        installed.write_app("echo_app", (APPS / "echo_app.py").read_text())
        installed.container.systemctl("start", SOCKET)
        yield installed


def wait_stored(service: InstalledService, count: int, what: str) -> None:
    wait_in_container(lambda: stored(service) == count, timeout=15, what=what)


@pytest.mark.systemd
def test_idle_connections_survive_restarts_busy_ones_lose_nothing_and_the_store_never_outgrows_them(service):
    """Naive clients idle at each restart keep their one connection; busy clients, answered `Connection: close`
    while the old main stops, reconnect into the socket's backlog and lose nothing either."""
    Counting.connects = 0
    naive = [Counting(HOST, service.port, timeout=30) for _ in range(CLIENTS)]
    pids, most = [], 0
    try:
        with Load(HOST, service.port, clients=4, pause=0.005) as load:
            for round in range(RESTARTS + 1):
                answered = {request(c, f"/round/{round}/{i}") for i, c in enumerate(naive)}
                pids.append(service.main_pid())
                assert answered == {pids[-1]}
                if round == RESTARTS:
                    break
                wait_stored(service, CLIENTS, "the idle connections to be stored")
                service.container.systemctl("reset-failed", SERVICE)  # the start limit counts restarts too
                service.container.systemctl("restart", SERVICE, timeout=120)
                most = max(most, stored(service))
                load.wait_for_requests(20)
            busy = load.stop()
    finally:
        for connection in naive:
            connection.close()
    journal = service.journal()
    assert Counting.connects == CLIENTS, "a naive client had to reconnect"
    assert busy.failures == [], busy.summary()
    assert len(set(pids)) == RESTARTS + 1
    assert most <= CLIENTS + 4, f"the store held {most} descriptors for {CLIENTS + 4} connections"
    wait_stored(service, 0, "the closed connections to leave the store")
    assert len(re.findall(rf"adopted {CLIENTS} keep-alive connection\(s\) from systemd's fd store", journal)) \
        == RESTARTS, journal[-3000:]
    assert "reception only permitted for main PID" not in journal


@pytest.mark.systemd
def test_idle_connections_survive_a_sigkilled_main(service):
    Counting.connects = 0
    connections = [Counting(HOST, service.port, timeout=30) for _ in range(CLIENTS)]
    try:
        first = {request(c, f"/before/{i}") for i, c in enumerate(connections)}
        wait_stored(service, CLIENTS, "the idle connections to be stored")
        old = service.main_pid()
        restarts = int(service.state()["NRestarts"])
        service.container.run(f"kill -KILL {old}")
        wait_in_container(lambda: int(service.state()["NRestarts"]) == restarts + 1
                          and service.state()["ActiveState"] == "active", timeout=30, what="the restart")
        after = {request(c, f"/after/{i}") for i, c in enumerate(connections)}
    finally:
        for connection in connections:
            connection.close()
    assert first == {old} and after == {service.main_pid()} and old not in after
    assert Counting.connects == CLIENTS, "a client had to reconnect"
    wait_stored(service, 0, "the closed connections to leave the store")


@pytest.mark.systemd
def test_a_reload_stores_each_connection_once_under_the_new_generation(service):
    connections = [http.client.HTTPConnection(HOST, service.port, timeout=30) for _ in range(CLIENTS)]
    try:
        for i, c in enumerate(connections):
            request(c, f"/before/{i}")
        wait_stored(service, CLIENTS, "the idle connections to be stored")
        assert service.reload().returncode == 0
        new = service.main_pid()
        wait_stored(service, CLIENTS, "the new generation to store the connections it adopted")
        assert {request(c, f"/after/{i}") for i, c in enumerate(connections)} == {new}
        wait_stored(service, CLIENTS, "the connections, idle again, to be stored again")
    finally:
        for connection in connections:
            connection.close()
    wait_stored(service, 0, "the closed connections to leave the store")


@pytest.mark.systemd
def test_a_crash_loop_still_fails_the_unit_and_releases_the_store(service):
    # The start limit, made independent of this machine's speed: 3 starts in 10 minutes.
    limit = f"/etc/systemd/system/{SERVICE}.d/start-limit.conf"
    service.container.write_file(limit, "[Unit]\nStartLimitIntervalSec=600\nStartLimitBurst=3\n")
    service.container.systemctl("daemon-reload")
    service.container.systemctl("stop", SERVICE)
    service.container.systemctl("reset-failed", SERVICE)  # a fresh start-limit count
    connection = http.client.HTTPConnection(HOST, service.port, timeout=30)
    try:
        request(connection, "/before")  # the socket unit starts the service: the first of 3 starts
        wait_stored(service, 1, "the idle connection to be stored")
        killed: set[int] = set()

        def crash_until_failed() -> bool:  # kill every main as soon as it serves
            state = service.state()
            pid = int(state["MainPID"])
            if state["ActiveState"] == "active" and pid and pid not in killed:
                killed.add(pid)
                service.container.run(f"kill -KILL {pid}", check=False)
            return state["ActiveState"] == "failed"

        wait_in_container(crash_until_failed, timeout=60, what="the crash loop to fail the unit")
        state = service.state()
        # Restart=on-failure restarted each crash until the start limit.
        assert state["ActiveState"] == "failed" and state["Result"] == "signal", state
        assert (len(killed), state["NRestarts"]) == (3, "3"), (killed, state)  # the 3rd restart was refused
        assert stored(service) == 0
        # The store let the connection go: the client sees it closed instead of waiting forever.
        connection.sock.settimeout(10)
        assert connection.sock.recv(1) == b""
    finally:
        connection.close()
        service.container.run(f"rm -f {limit}; systemctl daemon-reload; systemctl reset-failed {SERVICE}", check=False)


# ---- Type=notify-reload, evaluated: why graceful-http keeps ExecReload= ----------------------------

NOTIFY_RELOAD_SERVICE = '''
import signal, time
from systemd import daemon

def reload(*_):  # a reload that fails, reported the only ways sd_notify offers
    daemon.notify(f"RELOADING=1\\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    daemon.notify("READY=1\\nSTATUS=reload failed: the new generation did not start\\nERRNO=5")

signal.signal(signal.SIGHUP, reload)
daemon.notify("READY=1")
while True:
    time.sleep(60)
'''


@pytest.mark.systemd
def test_type_notify_reload_cannot_make_systemctl_reload_fail(service):
    """Under Type=notify-reload `systemctl reload` succeeds whatever the service reports (READY=1 ends the
    reload; ERRNO= and STATUS= change nothing); only an ExecReload= command's exit status can fail it.
    systemd 252 does not know the type: it runs such a unit as Type=simple."""
    c = service.container
    c.write_file("/srv/notify_reload.py", NOTIFY_RELOAD_SERVICE)
    c.write_file("/etc/systemd/system/notify-reload-probe.service",
                 f"[Service]\nType=notify-reload\nExecStart={service.python} /srv/notify_reload.py\n")
    c.systemctl("daemon-reload")
    if c.run("systemctl --version").stdout.split()[1] == "252":  # ignores the setting: a Type=simple service
        assert c.show("notify-reload-probe.service", "Type")["Type"] == "simple"
        assert "Failed to parse service type, ignoring: notify-reload" in c.run("journalctl --no-pager -o cat").stdout
        return
    c.systemctl("start", "notify-reload-probe.service")
    result = c.systemctl("reload", "notify-reload-probe.service", check=False)
    status = c.show("notify-reload-probe.service", "StatusText", "ActiveState")
    c.systemctl("stop", "notify-reload-probe.service")
    assert result.returncode == 0, result.stderr
    assert status == {"StatusText": "reload failed: the new generation did not start", "ActiveState": "active"}
