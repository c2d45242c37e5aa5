"""Balanced workers: the rule (who may accept), the counts the workers share, and bursts of new connections
against two workers on both engines."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import os
import re
import select
import signal
import socket
import time

import pytest

from graceful_http.balance import AcceptGate, burst_share, fair_share
from graceful_http.balanced_accept import BalancedAcceptor, SharedCounts, create_table, slot_count, time_queued
from support.load import pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, wait_until

# ---- the rule -------------------------------------------------------------------------


def test_fair_share_is_the_largest_part_of_an_even_split():
    assert [fair_share(total, 2) for total in range(6)] == [0, 1, 1, 2, 2, 3]
    assert fair_share(50, 2) == 25 and fair_share(50, 3) == 17 and fair_share(7, 1) == 7


def test_a_worker_alone_takes_everything():
    gate = AcceptGate(slack=0)
    assert all(gate.may_accept(own, (), now=0.0) for own in range(100))


def test_a_worker_takes_connections_up_to_its_share_plus_slack():
    gate = AcceptGate(slack=1)
    # 2 workers, the other holds 10: taking one more must leave us with at most the share of the new total + 1.
    assert gate.may_accept(11, (10,), now=0.0)  # 12 of 22: share 11, plus 1
    assert gate.may_accept(12, (10,), now=0.0)  # 13 of 23: share 12, plus 1
    assert not gate.may_accept(13, (10,), now=0.0)  # 14 of 24: share 12, plus 1 is 13
    assert AcceptGate(slack=0).may_accept(10, (10,), now=0.0)
    assert not AcceptGate(slack=0).may_accept(11, (10,), now=0.0)


def test_a_burst_taken_in_turns_ends_within_the_slack_of_an_even_split():
    held = [0, 0, 0]
    gates = [AcceptGate(slack=1) for _ in held]
    for arrival in range(100):  # each new connection goes to the first worker, in a rotating order, that may take it
        for turn in range(3):
            worker = (arrival + turn) % 3
            others = tuple(h for index, h in enumerate(held) if index != worker)
            if gates[worker].may_accept(held[worker], others, now=0.0):
                held[worker] += 1
                break
        else:
            pytest.fail(f"no worker would take connection {arrival + 1} with {held}")
    assert sum(held) == 100 and max(held) - min(held) <= 2, held


def test_above_its_share_a_worker_waits_while_the_others_take_connections_and_not_longer_than_its_patience():
    gate = AcceptGate(slack=0, patience=0.1)
    assert not gate.may_accept(5, (0,), now=10.0)
    assert not gate.may_accept(5, (0,), now=10.08)
    assert gate.may_accept(5, (0,), now=10.12)  # the other took nothing in 0.1 s: take it rather than let it wait
    assert gate.may_accept(6, (0,), now=10.2)  # and go on taking them while the other takes none
    assert not gate.may_accept(7, (1,), now=10.3)  # it took one: it is alive, wait for it again
    assert not gate.may_accept(7, (2,), now=10.38)  # still taking them: the patience starts again
    assert not gate.may_accept(7, (2,), now=10.46)
    assert gate.may_accept(7, (2,), now=10.5)


def test_time_the_others_spent_waiting_for_a_cpu_does_not_count_against_their_patience():
    gate = AcceptGate(slack=0, patience=0.1, longest=1.0)
    queued = iter([(2.0,), (2.15,), (2.15,), (2.15,)])  # seconds the other has waited for a CPU in all
    assert not gate.may_accept(5, (0,), now=10.0, queued=lambda: next(queued))
    assert not gate.may_accept(5, (0,), now=10.2, queued=lambda: next(queued))  # it could run for 0.05 s only
    assert gate.may_accept(5, (0,), now=10.26, queued=lambda: next(queued))  # 0.11 s it could have used


def test_the_least_starved_of_the_others_sets_the_pace_and_a_connection_waits_no_longer_than_the_longest():
    gate = AcceptGate(slack=0, patience=0.1, longest=1.0)
    assert not gate.may_accept(9, (0, 0), now=0.0, queued=lambda: (1.0, 5.0))
    assert gate.may_accept(9, (0, 0), now=0.3, queued=lambda: (1.0, 5.3))  # one of them could run all along
    gate = AcceptGate(slack=0, patience=0.1, longest=1.0)
    assert not gate.may_accept(9, (0,), now=0.0, queued=lambda: (1.0,))
    assert not gate.may_accept(9, (0,), now=0.9, queued=lambda: (1.9,))
    assert gate.may_accept(9, (0,), now=1.0, queued=lambda: (2.0,))  # starved the whole second: take it anyway


def test_a_worker_that_took_its_share_of_a_burst_waits_for_a_sibling_that_has_not_looked_with_the_same_patience():
    assert burst_share(50, 2) == 26 and burst_share(1, 2) == 2 and burst_share(7, 3, slack=0) == 3
    gate = AcceptGate(slack=1, patience=0.1)
    # The sibling's 28 may be connections its clients closed since it last looked: by the counts we could take
    # 30 of 50, by the burst only our share of what was waiting.
    assert gate.may_accept(25, (28,), now=0.0)
    assert not gate.may_accept(26, (28,), now=0.0, burst_share_taken=True)
    assert not gate.may_accept(26, (28,), now=0.08, burst_share_taken=True)
    assert gate.may_accept(26, (28,), now=0.12, burst_share_taken=True)  # it took nothing in 0.1 s: take it


def test_below_its_share_again_a_worker_forgets_that_it_was_waiting():
    gate = AcceptGate(slack=0, patience=0.1)
    assert not gate.may_accept(3, (1,), now=0.0)
    assert gate.may_accept(1, (3,), now=0.05)
    assert gate.waiting_since is None
    assert not gate.may_accept(3, (1,), now=0.2)  # a new wait, not the old one's expired patience


# ---- the shared counts (real processes: a slot is held by a lock, which is per process) -------------


def _in_child(work) -> int:
    """Fork; the child runs work() (its return value is the exit code) and stays until told to go (its
    stdin); returns (pid, write end of its stdin pipe, read end of its report pipe)."""
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(go_write)
            os.close(report_read)
            os.write(report_write, f"{work()}\n".encode())
            os.read(go_read, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(go_read)
    os.close(report_write)
    return pid, go_write, report_read


def _report(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 100)
        assert chunk, "the child ended without reporting"
        data += chunk
    return data.decode().strip()


def test_workers_claim_their_own_slot_or_a_free_one_and_siblings_see_their_counts():
    main = os.getpid()
    table = create_table()
    kept = []
    try:
        def worker(index: int, held: int):
            def work():
                counts = SharedCounts.attach(main, workers=2, index=index)
                counts.accepting(held)
                kept.append(counts)  # as a worker keeps it: closing any descriptor of the table drops its lock
                return counts.slot
            return work

        first = _in_child(worker(1, 7))
        assert _report(first[2]) == "0"
        second = _in_child(worker(1, 3))  # a replacement for worker 1 while it still runs: another slot
        second_slot = int(_report(second[2]))
        assert second_slot != 0
        mine = SharedCounts.attach(main, workers=2, index=2)  # this process, as a third worker
        assert mine.slot not in (0, second_slot)
        assert sorted(mine.others()) == [3, 7]
        assert len(mine.queued()) == 2 and all(seconds >= 0 for seconds in mine.queued())
        mine.accepting(0)
        os.kill(second[0], signal.SIGKILL)  # dies while accepting: its count is stale until someone notices
        os.waitpid(second[0], 0)
        assert sorted(mine.others()) == [3, 7]
        assert mine.forget_dead() == 1
        assert mine.others() == (7,)
        os.write(first[1], b"x")  # the first one exits cleanly... but still marked accepting: forgotten too
        os.waitpid(first[0], 0)
        assert mine.forget_dead() == 1 and mine.others() == ()
        mine.close()
    finally:
        os.close(table)


def test_a_process_sharing_its_cpu_with_a_busy_one_is_seen_waiting_for_it():
    """What the patience discounts: the kernel's count of the time a sibling was runnable but not running."""
    cpu = min(os.sched_getaffinity(0))
    spinners = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: spin on one CPU, shared with the other spinner
            os.sched_setaffinity(0, {cpu})
            while True:
                pass
        spinners.append(pid)
    try:
        wait_until(lambda: time_queued(spinners[0]) > 0.01 or None, 20, "the kernel to count a wait for the CPU")
    finally:
        for pid in spinners:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert time_queued(spinners[0]) == 0.0  # gone: nothing known


def test_no_table_or_no_free_slot_is_an_oserror():
    with pytest.raises(OSError):
        SharedCounts.attach(os.getpid(), workers=2, index=1)  # no table in this process
    assert slot_count(2) == 8 and slot_count(1000) == 341


# ---- the accept loop, in-process: a real listening socket, a sibling that is only its slot -----------------


@contextlib.contextmanager
def _beside_a_sibling(held: int, looked_ns: int):
    """A generation's table made here and a sibling worker (a child process, only its slot) that holds `held`
    connections and last looked at `looked_ns`: yields (a listening socket, the sibling's slot, our counts)."""
    table = create_table()
    listener = socket.create_server(("127.0.0.1", 0))
    main = os.getpid()
    kept = []

    def sibling_work():
        counts = SharedCounts.attach(main, workers=2, index=2)
        counts.accepting(held)
        counts.looked(looked_ns)
        kept.append(counts)  # as a worker keeps it: closing any descriptor of the table drops its lock
        return counts.slot

    sibling, sibling_go, sibling_report = _in_child(sibling_work)
    counts = None
    try:
        sibling_slot = int(_report(sibling_report))
        counts = SharedCounts.attach(main, workers=2, index=1)
        yield listener, sibling_slot, counts
    finally:
        if counts is not None:
            counts.close()  # its map of the table: a memfd this process would map for good
        os.write(sibling_go, b"x")
        os.waitpid(sibling, 0)
        listener.close()
        os.close(table)


def _served_at_once(counts: SharedCounts, gate: AcceptGate):
    """An accept loop whose connections are set up at once (no protocol runs): it, its `serve` and the sockets
    it served."""
    served = []

    def serve(conn, created):
        protocol = object()
        created(protocol)
        served.append(conn)
        acceptor.added(protocol)  # what uvicorn's set of connections tells it once the protocol is made
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    acceptor = BalancedAcceptor(counts, lambda: len(served), gate)
    return acceptor, serve, served


async def _until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.001)


def test_the_accept_loop_holds_back_above_its_share_and_serves_non_blocking_sockets():
    clients = []
    with _beside_a_sibling(held=10, looked_ns=2**62) as (listener, sibling_slot, counts):  # it looks all the time
        acceptor, serve, served = _served_at_once(counts, AcceptGate(slack=1, patience=3600))

        async def scenario():
            acceptor.start([listener], serve)
            clients.extend(socket.create_connection(listener.getsockname()) for _ in range(20))
            # 13 of 23 is our share (12) plus one: then the rest waits for the sibling.
            await _until(lambda: acceptor.gate.waiting_since is not None, f"holding back ({len(served)} served)")
            assert len(served) == 13 and acceptor.pending == 0 and _waiting_in_backlog(listener)
            counts.words[3 * sibling_slot + 1] = 20  # the sibling took (and closed) others: our share grows
            await _until(lambda: len(served) == 20, f"the rest taken ({len(served)} served)")
            acceptor.stop()

        try:
            asyncio.run(scenario())
            assert not any(conn.getblocking() for conn in served), "served sockets must be non-blocking"
            assert counts.words[3 * counts.slot] == 0, "not counted as accepting once stopped"
        finally:
            for sock in served + clients:
                sock.close()


def test_of_a_burst_the_accept_loop_takes_its_share_of_what_waits_until_a_stale_sibling_looks():
    """The sibling's slot says 28 connections, counted before it last looked (long ago): its clients may have
    closed them all. Of 20 new connections this worker takes its share (10, plus 1), not the 20 the counts would
    give it, and takes more once the sibling has looked (and counted what it holds)."""
    clients = []
    with _beside_a_sibling(held=28, looked_ns=1) as (listener, sibling_slot, counts):
        acceptor, serve, served = _served_at_once(counts, AcceptGate(slack=1, patience=3600))

        async def scenario():
            clients.extend(socket.create_connection(listener.getsockname()) for _ in range(20))
            acceptor.start([listener], serve)
            await _until(lambda: acceptor.gate.waiting_since is not None, f"holding back ({len(served)} served)")
            assert len(served) == 11 and _waiting_in_backlog(listener)
            counts.words[3 * sibling_slot + 1] = 20  # it looks: it holds 20
            counts.words[3 * sibling_slot + 2] = time.monotonic_ns()
            await _until(lambda: len(served) == 20, f"the rest taken ({len(served)} served)")
            acceptor.stop()

        try:
            asyncio.run(scenario())
        finally:
            for sock in served + clients:
                sock.close()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_connections_its_clients_closed_are_not_counted_when_new_ones_are_accepted(loop_name):
    """A client closes the connections it held and opens new ones at once (the EOFs and the new connections
    wake the worker together): before any of the new ones is accepted, the closed ones are gone from the
    worker's count, which its siblings use to size their share. (Counted, they let a sibling take its share
    of a total that includes them: bursts split 17/33 on a busy machine.)"""
    import uvloop

    new_loop = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}[loop_name]
    clients = []
    with _beside_a_sibling(held=10, looked_ns=2**62) as (listener, _, counts):
        served = set()
        gate = AcceptGate(slack=1, patience=3600)
        decided_with = []  # this worker's count at each decision to accept or not
        may_accept = gate.may_accept
        gate.may_accept = lambda own, *rest: decided_with.append(own) or may_accept(own, *rest)

        class Served(asyncio.Protocol):  # as uvicorn's protocols: in the set from made to lost
            def connection_made(self, transport):
                served.add(self)
                acceptor.added(self)

            def connection_lost(self, exc):
                served.discard(self)
                acceptor.publish()

        def serve(conn, created):
            def make():
                protocol = Served()
                created(protocol)
                return protocol
            return asyncio.ensure_future(asyncio.get_running_loop().connect_accepted_socket(make, conn))

        acceptor = BalancedAcceptor(counts, lambda: len(served), gate)

        async def scenario():
            acceptor.start([listener], serve)
            clients.extend(socket.create_connection(listener.getsockname()) for _ in range(8))
            await _until(lambda: len(served) == 8, "the first connections served")
            decided_with.clear()
            for client in clients:
                client.close()  # their EOFs wait for the worker's next turn...
            clients[:] = [socket.create_connection(listener.getsockname()) for _ in range(5)]  # ...with these
            await _until(lambda: len(served) == 5, "the new connections served")
            acceptor.stop()

        loop = new_loop()
        try:
            loop.run_until_complete(scenario())
        finally:
            loop.close()
            for client in clients:
                client.close()
        assert decided_with[0] == 0, f"counts at each decision after the closes: {decided_with}"


def _waiting_in_backlog(listener) -> bool:
    """Is a connection still waiting in the listener's backlog? (readable listening socket)"""
    ready, _, _ = select.select([listener], [], [], 0)
    return bool(ready)


# ---- end to end: bursts of keep-alive connections against two workers ----------------------------

BURST = 50


def burst(port: int) -> collections.Counter:
    """Open BURST connections at once, then one request on each, all still open: which pid answered each."""
    connections = [http.client.HTTPConnection(HOST, port, timeout=10) for _ in range(BURST)]
    try:
        for connection in connections:
            connection.connect()
        for connection in connections:
            connection.request("GET", "/")
        answered = collections.Counter()
        for connection in connections:
            response = connection.getresponse()
            assert response.status == 200
            answered[pid_of(response.read())] += 1
        return answered
    finally:
        for connection in connections:
            connection.close()


def worker_pids(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"worker \d started as pid (\d+)", log)}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_burst_is_split_between_the_workers_also_after_one_is_replaced(engine, tmp_path):
    """50 new keep-alive connections at once: each of 2 workers holds 20 to 30 of them, every time. Left to the
    kernel, one worker often takes most of them (whichever it woke first accepts the whole backlog)."""
    python = ENGINES[engine]
    assert os.access(python, os.X_OK), f"engine {engine!r}: {python} is not installed"
    with ServeProcess(python, tmp_path, "--workers", "2", "--no-access-log", "--log-level", "debug",
                      pid_file=True) as server:
        server.wait_serving()
        wait_until(lambda: len(worker_pids(server.log())) == 2, 20, "both workers to start", server.log_tail)
        splits = [burst(server.port) for _ in range(3)]
        # A worker killed while it accepts is replaced by a fork+exec'd one, which finds the counts too (and
        # the dead one's stale count is forgotten).
        first = worker_pids(server.log())
        os.kill(min(first), signal.SIGKILL)
        wait_until(lambda: len(worker_pids(server.log())) == 3, 20, "the replacement worker", server.log_tail)
        replacement = (worker_pids(server.log()) - first).pop()
        wait_until(lambda: server.get_pid() == replacement or None, 20, "the replacement to answer",
                   server.log_tail)
        splits += [burst(server.port) for _ in range(2)]
        serving = (first - {min(first)}) | {replacement}
        # A reload (worker by worker; the new main may be a fork of the old one): its workers share a table
        # of their own.
        reload = server.reload_cli()
        assert reload.returncode == 0, reload.stdout + reload.stderr + server.log_tail()
        splits += [burst(server.port) for _ in range(2)]
        log = server.log()
    overtaken = [line for line in log.splitlines() if "above its share" in line]  # a sibling took none for a while
    for split in splits:
        assert len(split) == 2 and all(20 <= count <= 30 for count in split.values()), \
            f"splits of {BURST} connections over the bursts: {[sorted(s.values()) for s in splits]}; {overtaken}"
    assert set(splits[4]) == serving
    assert not set(splits[-1]) & (first | serving), "the new generation's workers answer"
    assert "not balanced" not in log


@pytest.mark.parametrize("engine", list(ENGINES))
def test_kept_alive_connections_stay_split_between_the_workers_across_reloads(engine, tmp_path):
    """50 keep-alive connections stay open through two worker-by-worker reloads, which move them to the new
    workers; each of the last generation's 2 workers then answers 20 to 30 of them. The first old worker hands
    its connections to the only new worker there is yet, so the last one's must all go to the second (spread
    evenly instead, the split was 38/12 after one reload and 44/6 after two)."""
    python = ENGINES[engine]
    assert os.access(python, os.X_OK), f"engine {engine!r}: {python} is not installed"
    with ServeProcess(python, tmp_path, "--workers", "2", "--no-access-log", pid_file=True) as server:
        server.wait_serving()
        wait_until(lambda: len(worker_pids(server.log())) == 2, 20, "both workers to start", server.log_tail)
        connections = [http.client.HTTPConnection(HOST, server.port, timeout=10) for _ in range(BURST)]
        try:
            for connection in connections:
                connection.connect()

            def answers() -> collections.Counter:
                for connection in connections:
                    connection.request("GET", "/")
                answered = collections.Counter()
                for connection in connections:
                    response = connection.getresponse()
                    assert response.status == 200 and response.getheader("connection") != "close"
                    answered[pid_of(response.read())] += 1
                return answered

            splits = [answers()]
            for _ in range(2):
                reload = server.reload_cli()
                assert reload.returncode == 0, reload.stdout + reload.stderr + server.log_tail()
                splits.append(answers())
            connects = sum(connection.sock is not None for connection in connections)
        finally:
            for connection in connections:
                connection.close()
        log = server.log()
    assert connects == BURST, "every connection stayed open"
    workers = [int(pid) for pid in re.findall(r"worker \d started as pid (\d+)", log)]
    assert set(splits[-1]) == set(workers[-2:]), f"the last generation's workers answer: {splits}"
    for split in splits:
        assert len(split) == 2 and all(20 <= count <= 30 for count in split.values()), \
            f"answers per worker, before and after each reload: {[sorted(s.values()) for s in splits]}"
