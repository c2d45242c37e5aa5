"""A main's worker upkeep, in-process with stand-in worker processes: a recycled worker is told to drain
only once its replacement is ready; a stuck one is signalled for its stack dump, replaced, then killed."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys

from graceful_http.listeners import Listener
from graceful_http.recycling import RecycleLimits
from graceful_http.worker_upkeep import WorkerUpkeep, resident_mib, spare_adoption_indexes
from graceful_http.workers import WorkerPool

# A stand-in worker: after a start-up time it says ready, logs every line its main sends (with the
# system-wide monotonic time), answers `ping` and, on `drain`, reports and exits -- unless stuck.
STAND_IN = """\
import os, signal, socket, sys, time
channel = socket.socket(fileno=int(sys.argv[1]))
log = open(sys.argv[2], "a", buffering=1)
stuck = sys.argv[4] == "stuck"
def note(what):
    log.write(f"{time.monotonic():.6f} {os.getpid()} {what}\\n")
signal.signal(signal.SIGUSR1, lambda *_: note("stack dump"))
time.sleep(float(sys.argv[3]))
note("ready")
channel.sendall(b"ready\\n")
buffer = b""
while data := channel.recv(4096):
    buffer += data
    while b"\\n" in buffer:
        line, _, buffer = buffer.partition(b"\\n")
        if line != b"ping":
            note(line.decode())
        if line == b"ping" and not stuck:
            channel.sendall(b"pong\\n")
        if line.startswith(b"drain") and not stuck:
            channel.sendall(b"drained 0 0 3 0\\n")
            sys.exit(0)
"""


def events(path) -> list[tuple[float, int, str]]:
    return [(float(t), int(pid), what) for t, pid, what in
            (line.split(" ", 2) for line in path.read_text().splitlines())]


def run_pool(tmp_path, modes: list[str], scenario, replacement_delay: float = 0.3):
    """Start a pool of stand-ins (`modes`: the first spawns' modes, then "ok"), run `scenario(pool)`."""
    log = tmp_path / "events.log"
    started: list[subprocess.Popen] = []

    def spawn(listen_fds, names, channel_fd, inherited, environ) -> int:
        mode = modes[len(started)] if len(started) < len(modes) else "ok"
        delay = "0" if len(started) < 2 else str(replacement_delay)  # a replacement takes a while to be ready
        process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(channel_fd), str(log), delay, mode],
                                   pass_fds=[channel_fd])
        started.append(process)
        return process.pid

    listener_sock, other = socket.socketpair()

    async def main():
        pool = WorkerPool(2, [Listener(listener_sock, "http", inherited=True)], 1, request_reload=None, spawn=spawn)
        await asyncio.wait_for(pool.start(), 10)
        try:
            return await asyncio.wait_for(scenario(pool), 20)
        finally:
            pool.stop_accepting()
            await asyncio.wait_for(pool.drain(deadline=0), 10)

    try:
        return asyncio.run(main()), log, started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
        other.close()


def test_a_recycled_worker_drains_only_once_its_replacement_is_ready(tmp_path):
    async def scenario(pool):
        upkeep = WorkerUpkeep(pool, RecycleLimits(max_requests=10), 0, ready_timeout=10, graceful_timeout=5)
        upkeep.start()
        old = next(w for w in pool.workers.values() if w.index == 0)
        old.total = 12  # as its stats would say
        upkeep.check()
        status = await asyncio.wait_for(old.exited, 10)
        await asyncio.sleep(0)
        return old.pid, status, upkeep, sorted((w.index, w.pid) for w in pool.workers.values()), pool.replaced

    (old_pid, status, upkeep, workers, replaced), log, started = run_pool(tmp_path, ["ok", "ok"], scenario)
    seen = events(log)
    replacement = started[2].pid
    ready = next(t for t, pid, what in seen if pid == replacement and what == "ready")
    drain = next(t for t, pid, what in seen if pid == old_pid and what.startswith("drain"))
    assert ready < drain, seen
    assert (old_pid, f"drain {os.getpid()}") in [(pid, what) for _, pid, what in seen]  # to its own generation
    assert os.waitstatus_to_exitcode(status) == 0
    assert workers == sorted([(0, replacement), (1, started[1].pid)])
    assert replaced == 0, "a recycled worker is not replaced again when it exits"
    assert upkeep.counts == {"max-requests": 1}
    assert upkeep.status_note() == "1 worker recycled (1 max-requests)"
    assert upkeep.policy.recycling is None


def test_workers_due_together_are_recycled_one_at_a_time_as_the_log_tells_it(tmp_path, caplog):
    """The next recycle starts only once the previous one has logged its worker gone, however soon after
    that worker's exit the main looks again (here: at every turn of the event loop)."""
    async def scenario(pool):
        upkeep = WorkerUpkeep(pool, RecycleLimits(max_requests=10), 0, ready_timeout=10, graceful_timeout=5)
        pool.upkeep = upkeep  # as `start` does, without its periodic checks: this loop checks
        first = list(pool.workers.values())
        for worker in first:
            worker.total = 12
        while not all(worker.exited.done() for worker in first) or upkeep._tasks:
            upkeep.check()
            await asyncio.sleep(0)
        return first, upkeep

    with caplog.at_level(logging.INFO, logger="graceful_http"):
        (first, upkeep), log, started = run_pool(tmp_path, ["ok", "ok"], scenario)
    told = [re.search(r"\(pid (\d+)\) (is due for recycling|is gone)", record.getMessage()) for record in caplog.records]
    told = [(int(match[1]), match[2]) for match in told if match]
    assert [what for _, what in told] == ["is due for recycling", "is gone"] * 2, told
    assert {pid for pid, _ in told} == {worker.pid for worker in first}
    assert upkeep.counts == {"max-requests": 2} and upkeep.policy.recycling is None


def test_a_stuck_worker_is_dumped_then_killed_once_its_replacement_is_ready(tmp_path):
    async def scenario(pool):
        stuck = next(w for w in pool.workers.values() if w.index == 0)
        upkeep = WorkerUpkeep(pool, RecycleLimits(), worker_timeout=0.5, ready_timeout=10, graceful_timeout=5)
        upkeep.start()
        status = await asyncio.wait_for(stuck.exited, 10)
        await asyncio.sleep(0.3)  # a healthy worker stays, answering pings
        return stuck.pid, status, upkeep, sorted(w.index for w in pool.workers.values())

    (stuck_pid, status, upkeep, indexes), log, started = run_pool(tmp_path, ["stuck", "ok"], scenario)
    seen = events(log)
    replacement = started[2].pid
    dumped = next(t for t, pid, what in seen if pid == stuck_pid and what == "stack dump")
    ready = next(t for t, pid, what in seen if pid == replacement and what == "ready")
    assert dumped < ready, seen
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert indexes == [0, 1]
    assert len(started) == 3, "only the stuck worker was replaced"
    assert upkeep.counts == {"worker-timeout": 1}


def test_a_worker_stuck_while_it_is_recycled_is_dumped_and_killed_once_its_replacement_is_ready(tmp_path):
    async def scenario(pool):
        stuck = next(w for w in pool.workers.values() if w.index == 0)
        upkeep = WorkerUpkeep(pool, RecycleLimits(max_requests=10), worker_timeout=0.5, ready_timeout=10,
                              graceful_timeout=30)
        stuck.total = 11
        upkeep.check()  # due for recycling first; its silence is noticed while the replacement starts
        await asyncio.sleep(0)
        assert stuck.retiring
        upkeep.start()
        status = await asyncio.wait_for(stuck.exited, 10)
        await asyncio.sleep(0)
        return stuck.pid, status, upkeep, sorted(w.index for w in pool.workers.values())

    (stuck_pid, status, upkeep, indexes), log, started = run_pool(tmp_path, ["stuck", "ok"], scenario,
                                                                  replacement_delay=1.5)
    seen = events(log)
    ready = next(t for t, pid, what in seen if pid == started[2].pid and what == "ready")
    dumped = next(t for t, pid, what in seen if pid == stuck_pid and what == "stack dump")
    assert dumped < ready, seen
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "killed, not left to drain for 30 s"
    assert indexes == [0, 1] and len(started) == 3, "one replacement for both reasons"
    assert upkeep.counts == {"max-requests": 1, "worker-timeout": 1}


def test_spare_adoption_indexes_follow_the_workers_within_the_gap_a_sender_tolerates():
    from graceful_http.handover import MAX_GAP

    assert spare_adoption_indexes(2) == (3, 4, 5)
    assert len(spare_adoption_indexes(8)) < MAX_GAP


def test_resident_memory_of_this_process_and_of_none():
    assert 1 < resident_mib(os.getpid()) < 10_000
    assert resident_mib(2**22 + 1) is None
