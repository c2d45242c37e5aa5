"""A main's pool of workers, in-process with stand-in worker processes: a worker that dies is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

from graceful_http.listeners import Listener
from graceful_http.workers import RestartBackoff, WorkerPool

# A stand-in worker: says it is ready on its channel, then lives until killed or its main goes.
STAND_IN = """\
import socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
channel.sendall(b"ready\\n")
while channel.recv(4096):
    pass
"""


def run_with_stand_ins(script: str, scenario, on_spawn=None) -> list[subprocess.Popen]:
    """Run `scenario(pool)` (async) on a pool of two workers that are `script` run by this interpreter (given
    their channel's descriptor); kill what is left of them after. Returns the processes started."""
    started: list[subprocess.Popen] = []

    def spawn(listen_fds, names, channel_fd, inherited, environ) -> int:
        process = subprocess.Popen([sys.executable, "-c", script, str(channel_fd)], pass_fds=[channel_fd])
        started.append(process)  # kept: a collected Popen might reap its child before the pool does
        if on_spawn is not None:
            on_spawn(inherited)
        return process.pid

    listener_sock, other = socket.socketpair()

    async def run():
        pool = WorkerPool(2, [Listener(listener_sock, "http", inherited=True)], 3, request_reload=None, spawn=spawn)
        await asyncio.wait_for(pool.start(), 10)
        await scenario(pool)

    try:
        asyncio.run(run())
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
        other.close()
    return started


def test_a_dead_worker_is_replaced(caplog):
    spawned = asyncio.Queue()

    async def scenario(pool):
        first = [await spawned.get(), await spawned.get()]
        assert [(i.generation, i.worker_index) for i in first] == [(3, 1), (3, 2)]
        victim = next(w for w in pool.workers.values() if w.index == 1)
        os.kill(victim.pid, signal.SIGKILL)
        replacement = await asyncio.wait_for(spawned.get(), 10)
        assert (replacement.generation, replacement.worker_index) == (3, 2)
        await asyncio.wait_for(next(w for w in pool.workers.values() if w.index == 1).ready, 10)
        assert pool.replaced == 1
        assert sorted(w.index for w in pool.workers.values()) == [0, 1]
        assert victim.pid not in pool.workers
        pool.stop_accepting()
        await asyncio.wait_for(pool.drain(deadline=0), 10)
        assert pool.workers == {}

    started = run_with_stand_ins(STAND_IN, scenario, on_spawn=spawned.put_nowait)
    assert len(started) == 3
    assert f"worker 2 (pid {started[1].pid}) was killed by SIGKILL; replacing it in 0.5s" in caplog.text


def test_restart_backoff_doubles_for_quick_deaths_and_resets_after_a_stable_run():
    backoff = RestartBackoff(initial=0.5, maximum=2.0, stable_after=30.0)
    assert [backoff.next_delay(1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert backoff.next_delay(60.0) == 0.5


# A stand-in worker that reports its counts when it starts, and again whenever its main writes to it.
REPORTING = """\
import socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
channel.sendall(b"ready\\nstats 0 5 0\\n")
total = 5
while channel.recv(4096):
    total += 7
    channel.sendall(f"stats 0 {total} 0\\n".encode())
"""


def test_a_canary_waits_for_every_workers_next_report():
    """The counts a canary compares are as of each worker's last report: `next_reports` returns only once
    every worker has reported again (so what they answered before the canary's window is not in it), and
    gives up on a worker that does not."""

    async def until(predicate):
        while not predicate():
            await asyncio.sleep(0.005)

    async def scenario(pool):
        await asyncio.wait_for(until(lambda: pool.total_requests == 10), 10)
        first, second = sorted(pool.workers.values(), key=lambda w: w.index)
        waiting = asyncio.ensure_future(pool.next_reports(timeout=30))
        first.writer.write(b"x\n")
        await asyncio.wait_for(until(lambda: pool.total_requests == 17), 10)
        assert not waiting.done()  # the second has not reported since
        second.writer.write(b"x\n")
        await asyncio.wait_for(waiting, 10)
        assert pool.total_requests == 24
        gave_up = time.monotonic()
        await asyncio.wait_for(pool.next_reports(timeout=0.2), 10)  # nobody reports: it returns all the same
        assert time.monotonic() - gave_up >= 0.2
        pool.stop_accepting()
        await asyncio.wait_for(pool.drain(deadline=0), 10)

    run_with_stand_ins(REPORTING, scenario)
