"""Start processes that inherit the listening sockets: the only fork/exec in graceful-http.

Both a new generation and a worker run the same command line
(`sys.executable` plus the interpreter's original arguments, so `python -m
graceful_http` starts survive and `ps` shows the same arguments), and receive
the listening sockets at fd 3… with LISTEN_PID set to their own pid, plus one
private channel, as `inherited.Inherited` describes.

A new generation is double-forked so that it is not our child: systemd 252
treats a MAINPID that is not its own child as alien and would SIGKILL it on
stop instead of letting it drain. A worker stays our child, and dies with us.

A generation's first workers are forked without exec (`fork_worker`), from a
main that has imported the HTTP engine but not yet started an event loop: a
worker then starts in milliseconds instead of paying for an interpreter and
its imports. A worker that replaces a dead one is forked and exec'd, because
by then the main's event loop is running and a fork would inherit it.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from graceful_http.inherited import Inherited
from graceful_http.listenfds import LISTEN_FDS_START, successor_environ
from graceful_http.pidfd import inode_id
from graceful_http.startpriority import leave_idle_start, lower, start_idle

_PR_SET_PDEATHSIG = 1


def successor_command() -> list[str]:
    """The command line of a new process: this interpreter, our original arguments."""
    return [sys.executable, *sys.orig_argv[1:]]


def fork_successor(
    listen_fds: Sequence[int],
    names: Sequence[str],
    handoff_fd: int,
    inherited: Inherited,
    environ: Mapping[str, str],
    command: Sequence[str] | None = None,
    nice: int | None = None,
    idle: bool = False,
    instead_of_exec: Callable[[list[str], dict[str, str]], None] | None = None,
) -> tuple[int, int]:
    """Fork twice and exec the new generation (at CPU priority `nice`, if given; `idle`: both forks and the
    start at SCHED_IDLE, see `startpriority`); return the intermediate process's pid and the pipe its pid comes
    on (`new_generation_pid` reads it).

    The intermediate process exits at once, so the new generation is adopted
    by PID 1 (the service manager). It leads a new session, so it and
    everything it starts can be killed (or reprioritised) as one process group.
    `instead_of_exec` (command, environment), called where exec would be, may
    run the new generation in the fork itself (see `zygote`), or return to have
    it exec'd.
    """
    command = list(command or successor_command())
    pid_read, pid_write = os.pipe()
    try:
        intermediate = os.fork()
    except OSError:
        os.close(pid_read)
        os.close(pid_write)
        raise
    if intermediate == 0:  # pragma: no cover - runs in the forked child
        try:
            if idle:
                start_idle()  # its fork and exit, and the new generation's start
            os.close(pid_read)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(pid_write)
                os.setsid()
                if nice is not None:
                    lower(nice)
                _exec_with_sockets(listen_fds, names, handoff_fd, inherited, environ, command, instead_of_exec)
            os.write(pid_write, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(pid_write)
    return intermediate, pid_read


async def new_generation_pid(intermediate: int, pid_read: int) -> int:
    """The pid `fork_successor` forked. Only the fork is done in the event loop: the wait for the intermediate
    (a new process to be scheduled, on CPUs the traffic may keep busy: 10-40 ms measured under load) is
    awaited, so a main that serves keeps serving meanwhile."""
    import asyncio  # here: the stable-pid holder uses this module and runs no event loop

    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    os.set_blocking(pid_read, False)
    data = b""

    def read() -> None:
        nonlocal data
        try:
            chunk = os.read(pid_read, 32)
        except BlockingIOError:
            return
        data += chunk
        if not chunk and not closed.done():
            closed.set_result(None)

    loop.add_reader(pid_read, read)
    try:
        await closed  # the intermediate exited (its end of the pipe closed with it)
    except asyncio.CancelledError:  # no longer wanted (we are stopping): it must not outlive us
        data += _read_to_the_end(pid_read)
        if data:
            kill_group(int(data))
        raise
    finally:
        loop.remove_reader(pid_read)
        os.close(pid_read)
        os.waitpid(intermediate, 0)  # already exiting: it closed its files
    return _generation_pid(data)


def new_generation_pid_blocking(intermediate: int, pid_read: int) -> int:
    """`new_generation_pid` for a process without an event loop (the standby), which may wait for it."""
    try:
        data = _read_to_the_end(pid_read)
    finally:
        os.close(pid_read)
        os.waitpid(intermediate, 0)
    return _generation_pid(data)


def _read_to_the_end(fd: int) -> bytes:
    os.set_blocking(fd, True)
    data = b""
    while chunk := os.read(fd, 32):
        data += chunk
    return data


def _generation_pid(data: bytes) -> int:
    """The pid the intermediate process wrote (nothing: it could not fork the new generation)."""
    if not data:
        raise OSError("could not fork the new generation")
    return int(data)


def spawn_worker(
    listen_fds: Sequence[int],
    names: Sequence[str],
    channel_fd: int,
    inherited: Inherited,
    environ: Mapping[str, str],
    command: Sequence[str] | None = None,
) -> int:
    """Fork and exec a worker of this generation; it gets SIGTERM if we die (no orphans)."""
    command = list(command or successor_command())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            die_with_parent()
        finally:
            _exec_with_sockets(listen_fds, names, channel_fd, inherited, environ, command)
    return pid


def reset_signals_after_fork() -> None:  # pragma: no cover - runs in a forked child
    """In a forked child that goes on running Python: signals as a freshly exec'd interpreter has them. The
    parent's handlers and wake-up descriptor belong to its event loop (a SIGTERM to one new worker would
    otherwise stop the whole main)."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def fork_worker(child: Callable[[], int]) -> int:
    """Fork a worker that runs `child()` and exits with its result; return its pid.

    Call only before this process starts an event loop (the child would
    inherit it). The worker gets SIGTERM if we die, like an exec'd one.
    """
    parent = os.getpid()
    # What the main has loaded goes to the collector's permanent generation for the fork: the worker's
    # collections then never write to those objects' headers, so their pages stay shared (CPython's gc
    # documentation recommends it for fork without exec). The main takes them back at once.
    gc.freeze()
    pid = os.fork()
    if pid:
        gc.unfreeze()
        return pid
    code = 70  # pragma: no cover - runs in the forked child; EX_SOFTWARE unless child() returns
    try:  # pragma: no cover
        die_with_parent()
        if os.getppid() != parent:  # the main died before the line above took effect
            os._exit(0)
        code = child()
    except BaseException as exc:  # pragma: no cover
        os.write(2, f"graceful-http: worker {os.getpid()} failed: {exc!r}\n".encode())
    finally:  # pragma: no cover - never return into the main's code
        flush_and_exit(code)


async def wait_exit(pidfd: int, timeout: float | None = None) -> bool:
    """Wait until the process behind `pidfd` (os.pidfd_open) exits: True, or False once `timeout` passed."""
    import asyncio  # here: the stable-pid holder uses this module and runs no event loop

    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        await asyncio.wait_for(exited.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
    return True


def kill_group(pid: int) -> None:
    """SIGKILL a new generation and everything it started (it leads its own session), if it still runs; only
    itself if it has not called `setsid` yet (no group of that id: the pid is known before it does)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def die_with_parent() -> None:
    """SIGTERM when the process that forked us dies (check its pid after: it may have died already)."""
    libc_prctl()(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@functools.cache
def libc_prctl():
    """libc's prctl, through ctypes: imported and looked up once, by the first caller. A main of workers calls
    this before it forks them (see `main_process.import_ahead`), so no new worker of a rollout spends its
    start importing ctypes (3–4 ms of CPU each, measured) while the old generation serves."""
    import ctypes  # here: a generation without workers never needs it

    return ctypes.CDLL(None, use_errno=True).prctl


def flush_standard_streams() -> None:
    """Before a fork that goes on running Python (or the child would write again what is still buffered),
    and before `os._exit`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def flush_and_exit(code: int) -> NoReturn:  # pragma: no cover - runs in a process that is done
    """os._exit after flushing what this process logged: no interpreter teardown, no atexit handlers (the
    caller runs them if it wants them), no joining app threads."""
    import logging

    try:
        logging.shutdown()
    except BaseException:
        pass
    flush_standard_streams()
    os._exit(code)


def _exec_with_sockets(listen_fds, names, channel_fd, inherited, environ, command,
                       instead_of_exec=None) -> None:  # pragma: no cover
    try:
        count = len(listen_fds)
        # Move every fd we pass above the target range first, so placing them at
        # 3… never overwrites one we still need. The temporaries are CLOEXEC.
        floor = LISTEN_FDS_START + count + 1
        temporaries = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in [*listen_fds, channel_fd]]
        for index, fd in enumerate(temporaries):
            os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        pid = os.getpid()
        listen = successor_environ(environ, names, pid, inode_id(pid))
        env = inherited.with_channel(LISTEN_FDS_START + count).to_environ(listen)
        if instead_of_exec is not None:
            for fd in temporaries:  # as exec would: they are close-on-exec
                os.close(fd)
            instead_of_exec(command, env)
        leave_idle_start()  # what is exec'd may be other code, which would not
        os.execve(command[0], command, env)
    except BaseException as exc:
        os.write(2, f"graceful-http: cannot start a new process: {exc}\n".encode())
    os._exit(127)
