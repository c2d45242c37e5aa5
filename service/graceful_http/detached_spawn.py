"""Start a new generation without forking the process that serves: posix_spawn a trampoline that forks it.

A fork of a main that serves (`--workers 1`) copies its page tables, and
afterwards every page its event loop writes is copied on write: the loop
stands still for milliseconds and every connection's request with it.
posix_spawn (glibc: clone with CLONE_VM|CLONE_VFORK) shares our memory until
the child execs, so we only wait for that exec. The child is a small
interpreter (`python -I -S`: no site, no PYTHON* variables; about 10 ms of
CPU in a process of its own) running `TRAMPOLINE`, the second half of the
double fork: it forks the new generation, which leads a new session, takes
its own pid where the environment names one (`LISTEN_PID`, `WATCHDOG_PID`,
`LISTEN_PIDFDID`: only known after that fork), starts at the given nice
value if any, and execs the command; the trampoline writes that pid on the
pipe and exits, so the new generation is adopted by PID 1 as before.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Mapping, Sequence

from graceful_http.inherited import Inherited
from graceful_http.listenfds import LISTEN_FDS_START, successor_environ
from graceful_http.pidfd import inode_id

# argv: pipe fd, nice ("" for none), then the command. Only os, so it needs nothing but the interpreter.
TRAMPOLINE = r"""
import os, sys
pipe, nice, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    try:
        os.close(pipe)
        os.setsid()
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, int(nice))
            except OSError:
                pass
        me = os.getpid()
        env = dict(os.environb)
        for name in (b"LISTEN_PID", b"WATCHDOG_PID"):
            if name in env:
                env[name] = str(me).encode()
        if b"LISTEN_PIDFDID" in env:
            fd = os.pidfd_open(me)
            env[b"LISTEN_PIDFDID"] = str(os.fstat(fd).st_ino).encode()
            os.close(fd)
        os.execve(command[0], command, env)
    except BaseException as exc:
        os.write(2, f"graceful-http: cannot start a new process: {exc}\n".encode())
    os._exit(127)
os.write(pipe, str(pid).encode())
"""


def trampoline_argv(pipe_fd: int, nice: int | None, command: Sequence[str]) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(pipe_fd), "" if nice is None else str(nice), *command]


def spawn_detached(
    listen_fds: Sequence[int],
    names: Sequence[str],
    channel_fd: int,
    inherited: Inherited,
    environ: Mapping[str, str],
    command: Sequence[str],
    nice: int | None = None,
) -> tuple[int, int]:
    """posix_spawn the trampoline with the sockets at fd 3…, the channel after them and the pid pipe after that;
    return (the trampoline's pid, the pipe's read end), as `spawn.fork_successor` does."""
    count = len(listen_fds)
    pipe_at = LISTEN_FDS_START + count + 1
    # The pid placeholders are ours: the trampoline's child puts its own in (see TRAMPOLINE).
    env = inherited.with_channel(LISTEN_FDS_START + count).to_environ(
        successor_environ(environ, names, os.getpid(), inode_id(os.getpid())))
    pid_read, pid_write = os.pipe()
    temporaries: list[int] = []
    try:
        # Above every target first, so placing them at 3… never overwrites one still to be placed.
        for fd in [*listen_fds, channel_fd, pid_write]:
            temporaries.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, pipe_at + 1))
        actions = [(os.POSIX_SPAWN_DUP2, fd, LISTEN_FDS_START + index) for index, fd in enumerate(temporaries)]
        argv = trampoline_argv(pipe_at, nice, command)
        trampoline = os.posix_spawn(sys.executable, argv, env, file_actions=actions)
    except BaseException:
        os.close(pid_read)
        raise
    finally:
        os.close(pid_write)
        for fd in temporaries:
            os.close(fd)
    return trampoline, pid_read
