"""A standby for the next generation: a fork of a one-process main taken before it imports the app, idle
until a reload, when it forks the new generation from itself.

Why: a main that serves (`--workers 1`) has imported the app, so its successor cannot be a fork of it (it
would keep the old code; see `zygote`). It was exec'd, and its start (an interpreter, graceful-http's and
uvicorn's imports: about 180 ms of CPU, measured) ran while the old generation served on the same CPUs;
and the fork that exec follows was of the serving main, whose loop stalled while its pages were copied.
The standby has imported graceful-http and uvicorn, not the app: at a reload the old main hands it the
sockets and the handoff channel, and it forks the new generation, which goes on from there without exec
(`zygote.continue_as_successor`, with the same checks: a changed graceful-http, uvicorn or Python on disk
is exec'd as always) and imports the app anew. The serving main forks nothing.

What it costs: one idle process beside each one-process main, sharing most of its pages with it
(copy-on-write). It holds none of the service's sockets (a stopping main closes its listeners and new
connections are refused), and it ends with its main: its channel closes, and PR_SET_PDEATHSIG.

The request (main → standby, one SOCK_SEQPACKET message): JSON {names, environ, inherited, nice, idle}, with the
listening sockets and the handoff channel's end as SCM_RIGHTS descriptors. The answer: {"pid": n}, or
{"error": why} (then the main starts the new generation itself, as before).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
from collections.abc import Iterable, Mapping, Sequence

from graceful_http.inherited import Inherited

log = logging.getLogger("graceful_http")

MAX_REQUEST = 1 << 20  # bytes: an environment, a few names
MAX_DESCRIPTORS = 253  # the kernel's limit for one message
ANSWER_TIMEOUT = 10.0  # seconds: a fork and a pid read, normally a few ms


class StandbyUnavailable(OSError):
    """The standby forked nothing (it was gone before the request, or could not): start the generation here."""


def wanted(workers: int, metrics: bool) -> bool:
    """Only a main that serves by itself needs one (a main of workers is a fork of its predecessor already,
    see `zygote`), and only where the new generation can be a fork (not with prometheus_client imported)."""
    return workers == 1 and not metrics


class Standby:
    """The main's end: the standby's pid and channel."""

    def __init__(self, pid: int, channel: socket.socket):
        self.pid = pid
        self.channel = channel

    @classmethod
    def fork(cls, not_for_the_standby: Iterable[int]) -> Standby | None:
        """Fork the standby, before the app is imported and before any event loop runs; None if it cannot be.
        `not_for_the_standby`: descriptors it must not hold (the listeners, connections, the handoff channel)."""
        import ctypes  # noqa: F401 - what the standby imports (`die_with_parent`), before the files are listed

        from graceful_http.spawn import flush_standard_streams
        from graceful_http.zygote import list_module_files_ahead

        list_module_files_ahead()
        closing = list(not_for_the_standby)
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            log.warning("no standby for the next generation (it will be exec'd): %s", exc)
            return None
        flush_standard_streams()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            mine.close()
            theirs.close()
            log.warning("no standby for the next generation (it will be exec'd): %s", exc.strerror or exc)
            return None
        if pid == 0:  # pragma: no cover - the standby
            try:
                mine.close()
                _stand_by(theirs, closing, parent)
            finally:
                os._exit(0)
        theirs.close()
        mine.setblocking(False)
        return cls(pid, mine)

    @property
    def usable(self) -> bool:
        return self.channel.fileno() != -1

    async def start(self, listen_fds: Sequence[int], names: Sequence[str], handoff_fd: int, inherited: Inherited,
                    environ: Mapping[str, str], nice: int | None, idle: bool = False) -> int:
        """Have the standby fork the new generation; its pid. StandbyUnavailable if it forked nothing (then
        the caller forks); another OSError if it may have forked but did not say so in time (it is killed
        and never asked again, and this start fails: a second generation on the same channel is worse)."""
        request = json.dumps({"names": list(names), "environ": dict(environ), "nice": nice, "idle": idle,
                              "inherited": inherited.to_environ({})}).encode()
        try:
            socket.send_fds(self.channel, [request], [*listen_fds, handoff_fd])
        except OSError as exc:
            self.close()
            raise StandbyUnavailable(f"the standby (pid {self.pid}) is gone: {exc.strerror or exc}") from None
        try:
            answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.channel, 4096), ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            self.close(kill=True)
            raise OSError(f"the standby (pid {self.pid}) did not answer within {ANSWER_TIMEOUT:g}s") from None
        if not answer:
            self.close()
            raise OSError(f"the standby (pid {self.pid}) ended before it answered")
        reply = json.loads(answer)
        if "pid" not in reply:
            raise StandbyUnavailable(reply.get("error") or "the standby could not fork")
        return int(reply["pid"])

    def close(self, kill: bool = False) -> None:
        """It sees its channel close and exits (`kill`: SIGKILL, for one that does not answer)."""
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self.channel.close()


def _stand_by(channel: socket.socket, closing: list[int], parent: int) -> None:  # pragma: no cover - standby
    """The standby's life: drop what is not its own, then fork a new generation at each request."""
    from graceful_http.spawn import die_with_parent, reset_signals_after_fork
    from graceful_http.startpriority import idle_start_allowed, start_idle

    reset_signals_after_fork()
    die_with_parent()
    if os.getppid() != parent:  # the main died before the line above took effect
        return
    if idle_start_allowed():  # its forks, and the new generation's start, run idle (see `startpriority`)
        start_idle()
    for fd in closing:
        try:
            os.close(fd)
        except OSError:
            pass
    channel.setblocking(True)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, MAX_REQUEST, MAX_DESCRIPTORS, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        except OSError:
            return
        if not message:
            return  # the main is gone, or done with us
        try:
            reply = {"pid": _fork_generation(json.loads(message), fds)}
        except Exception as exc:  # noqa: BLE001 - told to the main, which starts the generation itself
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            channel.send(json.dumps(reply).encode())
        except OSError:
            return


def _fork_generation(request: dict, fds: list[int]) -> int:  # pragma: no cover - runs in the standby
    """Fork the new generation as the old main would (see `spawn.fork_successor`), as a fork of this process
    where `zygote` allows it; its pid. The received descriptors are close-on-exec: the new generation keeps
    only the copies placed at 3, 4, …"""
    from graceful_http.spawn import fork_successor, new_generation_pid_blocking
    from graceful_http.zygote import KEPT_BY_A_STANDBY_FORK, fork_to_go_on_here

    if len(fds) < 2 or len(fds) != len(request["names"]) + 1:
        raise ValueError(f"{len(fds)} descriptors for {len(request['names'])} sockets and a channel")
    inherited = Inherited.from_environ(dict(request["inherited"]))
    return new_generation_pid_blocking(*fork_to_go_on_here(functools.partial(
        fork_successor, fds[:-1], request["names"], fds[-1], inherited, request["environ"], nice=request["nice"],
        idle=request.get("idle", False)),
        KEPT_BY_A_STANDBY_FORK))
