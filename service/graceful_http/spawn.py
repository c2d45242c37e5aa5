"""Start processes that inherit the listening sockets: the only fork/exec in graceful-http.

Both a new generation and a worker run the same command line
(`sys.executable` plus the interpreter's original arguments, so `python -m
graceful_http` starts survive and `ps` shows the same arguments), and receive
the listening sockets at fd 3… with LISTEN_PID set to their own pid, plus one
private channel fd named in an environment variable.

A new generation is double-forked so that it is not our child: systemd 252
treats a MAINPID that is not its own child as alien and would SIGKILL it on
stop instead of letting it drain. A worker stays our child, and dies with us.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from graceful_http.listenfds import LISTEN_FDS_START, successor_environ

HANDOFF_FD_VARIABLE = "GRACEFUL_HTTP_HANDOFF_FD"
WORKER_FD_VARIABLE = "GRACEFUL_HTTP_WORKER_FD"
_PR_SET_PDEATHSIG = 1


def successor_command() -> list[str]:
    """The command line of a new process: this interpreter, our original arguments."""
    return [sys.executable, *sys.orig_argv[1:]]


def spawn_successor(
    listen_fds: Sequence[int],
    names: Sequence[str],
    handoff_fd: int,
    environ: Mapping[str, str],
    command: Sequence[str] | None = None,
) -> int:
    """Fork twice and exec the new generation; return its pid.

    The intermediate process exits at once, so the new generation is adopted
    by PID 1 (the service manager). It leads a new session, so it and
    everything it starts can be killed as one process group.
    """
    command = list(command or successor_command())
    pid_read, pid_write = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(pid_read)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(pid_write)
                os.setsid()
                _exec_with_sockets(listen_fds, names, handoff_fd, HANDOFF_FD_VARIABLE, environ, command)
            os.write(pid_write, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(pid_write)
    try:
        os.waitpid(intermediate, 0)
        data = b""
        while chunk := os.read(pid_read, 32):
            data += chunk
    finally:
        os.close(pid_read)
    if not data:
        raise OSError("could not fork the new generation")
    return int(data)


def spawn_worker(
    listen_fds: Sequence[int],
    names: Sequence[str],
    channel_fd: int,
    environ: Mapping[str, str],
    command: Sequence[str] | None = None,
) -> int:
    """Fork and exec a worker of this generation; it gets SIGTERM if we die (no orphans)."""
    command = list(command or successor_command())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        finally:
            _exec_with_sockets(listen_fds, names, channel_fd, WORKER_FD_VARIABLE, environ, command)
    return pid


def _exec_with_sockets(listen_fds, names, channel_fd, channel_variable, environ, command) -> None:  # pragma: no cover
    try:
        count = len(listen_fds)
        # Move every fd we pass above the target range first, so placing them at
        # 3… never overwrites one we still need. The temporaries are CLOEXEC.
        floor = LISTEN_FDS_START + count + 1
        temporaries = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in [*listen_fds, channel_fd]]
        for index, fd in enumerate(temporaries):
            os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        env = successor_environ(environ, names, os.getpid())
        env[channel_variable] = str(LISTEN_FDS_START + count)
        os.execve(command[0], command, env)
    except BaseException as exc:
        os.write(2, f"graceful-http: cannot start a new process: {exc}\n".encode())
    os._exit(127)
