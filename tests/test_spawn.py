"""spawn.fork_worker: a worker forked without exec exits with its own status, says why it failed, and dies
with its parent. (The end-to-end tests run whole generations with forked workers.)"""

from __future__ import annotations

import os
import select
import signal

from graceful_http.spawn import fork_worker


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
