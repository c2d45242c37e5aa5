"""spawn.fork_worker: a worker forked without exec exits with its own status, says why it failed, and dies
with its parent. (The end-to-end tests run whole generations with forked workers.)"""

from __future__ import annotations

import os
import select
import signal

from graceful_http.spawn import fork_worker
from support.serve_process import wait_until


def exit_code_of(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_worker_exits_with_what_it_returns():
    assert exit_code_of(fork_worker(lambda: 7)) == 7


def test_a_forked_worker_that_raises_exits_70_and_says_why(capfd):
    def worker() -> int:
        raise RuntimeError("app exploded")

    pid = fork_worker(worker)
    assert exit_code_of(pid) == 70
    assert f"graceful-http: worker {pid} failed: RuntimeError('app exploded')" in capfd.readouterr().err


def test_a_forked_worker_never_returns_into_its_parents_code():
    """Whatever the worker does, the code after fork_worker runs once: in the parent."""
    read_end, write_end = os.pipe()
    pid = fork_worker(lambda: 0)
    os.write(write_end, b"x")  # the worker, had it returned here, would write too
    os.close(write_end)
    assert exit_code_of(pid) == 0
    assert os.read(read_end, 10) == b"x"
    os.close(read_end)


def test_a_forked_worker_gets_sigterm_when_its_parent_dies():
    pid_read, pid_write = os.pipe()
    go_read, go_write = os.pipe()
    parent = os.fork()
    if parent == 0:  # pragma: no cover - the short-lived parent: forks a worker, then exits when told
        os.close(pid_read)
        os.close(go_write)

        def worker() -> int:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                signal.pause()

        os.write(pid_write, str(fork_worker(worker)).encode())
        os.read(go_read, 1)
        os._exit(0)
    os.close(pid_write)
    os.close(go_read)
    worker_pid = int(os.read(pid_read, 32))
    os.close(pid_read)
    pidfd = os.pidfd_open(worker_pid)
    try:
        assert not select.select([pidfd], [], [], 0)[0], "the worker must run while its parent does"
        os.close(go_write)  # the parent exits
        assert exit_code_of(parent) == 0
        readable, _, _ = select.select([pidfd], [], [], 10)
        assert readable, f"worker {worker_pid} outlived its parent"
    finally:
        os.close(pidfd)


async def spawn_successor(*args, **kwargs) -> int:
    """As the old main starts a new generation: fork it (when this coroutine runs), then await its pid."""
    from graceful_http.spawn import fork_successor, new_generation_pid

    return await new_generation_pid(*fork_successor(*args, **kwargs))


def spawn_sleeper(seconds: str = "30"):
    """spawn_successor of `sleep` (as the new generation) on a listening socket; returns the coroutine."""
    import socket

    from graceful_http.inherited import Inherited
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    mine, theirs = socket.socketpair()
    opened = [listener, mine, theirs]
    return spawn_successor([listener.fileno()], ["http"], theirs.fileno(), Inherited(generation=2), dict(os.environ),
                           command=["/bin/sleep", seconds]), opened


def state_and_parent(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return fields[0], int(fields[1])


def test_a_new_generation_is_not_our_child_and_the_loop_runs_while_it_is_forked():
    import asyncio

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(ticker())
        spawning, opened = spawn_sleeper()
        try:
            pid = await spawning
        finally:
            ticking.cancel()
            for sock in opened:
                sock.close()
        return pid, ticks

    pid, ticks = asyncio.run(scenario())
    try:
        assert ticks > 0, "the event loop stood still while the new generation was started"
        assert state_and_parent(pid)[1] != os.getpid()
        assert os.getsid(pid) == pid  # it leads its own session, hence its own process group
    finally:
        os.killpg(pid, signal.SIGKILL)


def test_a_start_cancelled_midway_leaves_no_new_generation_behind():
    """A main that stops while the new generation is being forked must not leave it running."""
    import asyncio

    from harness.processes import alive

    marker = f"{os.getpid()}.{id(object())}"  # an argument only our sleeper has

    def sleepers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if file.read().split(b"\0")[:2] == [b"/bin/sleep", marker.encode()]:
                        found.append(int(entry))
            except OSError:
                continue
        return [pid for pid in found if alive(pid)]

    async def scenario():
        spawning, opened = spawn_sleeper(marker)
        task = asyncio.ensure_future(spawning)
        await asyncio.sleep(0)  # forked: the intermediate is on its way
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        for sock in opened:
            sock.close()

    asyncio.run(scenario())
    wait_until(lambda: not sleepers(), 10, "the cancelled start's new generation to be gone")


def test_a_new_generation_finds_its_own_pid_its_sockets_and_its_channel():
    """The pid only exists after the second fork: LISTEN_PID, WATCHDOG_PID and LISTEN_PIDFDID name the new
    process, not the one that started it, and the socket and the channel sit at fd 3 and 4."""
    import asyncio
    import json
    import socket
    import sys
    import tempfile

    from graceful_http.inherited import Inherited
    from graceful_http.pidfd import inode_id

    report = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    script = ("import json, os, socket, sys\n"
              "listener = socket.socket(fileno=3); channel = socket.socket(fileno=4)\n"
              "fd = os.pidfd_open(os.getpid())\n"
              "json.dump({'pid': os.getpid(), 'env': dict(os.environ), 'port': listener.getsockname()[1],\n"
              "           'inode': os.fstat(fd).st_ino}, open(sys.argv[1], 'w'))\n"
              "channel.sendall(b'done')\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    mine, theirs = socket.socketpair()
    environ = {**os.environ, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1", "LISTEN_PID": "1"}

    async def scenario() -> int:
        return await spawn_successor([listener.fileno()], ["http"], theirs.fileno(), Inherited(generation=2),
                                     environ, command=[sys.executable, "-c", script, report])

    try:
        pid = asyncio.run(scenario())
        theirs.close()
        mine.settimeout(10)
        assert mine.recv(4) == b"done"
        with open(report) as file:
            seen = json.load(file)
    finally:
        for sock in (listener, mine, theirs):
            sock.close()
        os.unlink(report)
    assert seen["pid"] == pid
    assert seen["env"]["LISTEN_PID"] == seen["env"]["WATCHDOG_PID"] == str(pid)
    assert seen["env"]["LISTEN_FDS"] == "1" and seen["env"]["LISTEN_FDNAMES"] == "http"
    assert seen["env"]["GRACEFUL_HTTP_HANDOFF_FD"] == "4"
    assert seen["port"] == port
    if inode_id(os.getpid()) is not None:
        assert seen["env"]["LISTEN_PIDFDID"] == str(seen["inode"])
