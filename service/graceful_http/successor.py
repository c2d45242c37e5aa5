"""An old main's view of the new generation it starts at a reload (as `workers.WorkerPool` is a main's view
of its workers): start it, learn whether it became ready, hand over to it, or kill it."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import time
from collections.abc import Sequence

from graceful_http import generation as g
from graceful_http.handoff import CONFIRM_TIMEOUT, SuccessorLink
from graceful_http.inherited import Inherited
from graceful_http.spawn import fork_successor, kill_group, new_generation_pid, wait_exit
from graceful_http.standby import Standby, StandbyUnavailable
from graceful_http.startpriority import (
    RESTORE_AFTER,
    START_NICE,
    idle_start_allowed,
    leave_idle_start_of,
    restore,
    start_nice,
)
from graceful_http.wire import ADOPTS, FAILED, READY, ROLLOUT

log = logging.getLogger("graceful_http")


class Successor:
    """The new generation being started: its pid, its handoff link and its exit."""

    def __init__(self, attempt: int, pid: int, link: SuccessorLink, restore_nice: int | None = None,
                 idle: bool = False):
        self.attempt = attempt
        self.pid = pid
        self.link = link
        self.restore_nice = restore_nice  # it starts at a lower CPU priority: this one is given back when ready
        self.idle = idle  # it starts at SCHED_IDLE and leaves it when ready (or we make it, if starved)
        self.pidfd = exit_watch(pid)
        self.adopts = False  # it said it takes over our keep-alive connections (`ready adopts`)
        self.rolls = False  # it started one worker and wants ours retired one by one (`ready adopts rollout`)

    @classmethod
    async def start(cls, attempt: int, generation: int, listeners: Sequence, inherited: Inherited,
                    environ: dict[str, str], fork_only: bool = False, wanted_nice: int = START_NICE,
                    standby: Standby | None = None) -> Successor:
        """Start generation `generation` on our `listeners` (at nice `wanted_nice` where we can give our priority
        back); OSError if it cannot even be forked. `fork_only`: without exec if the code on disk is the code
        loaded here (see `zygote`); `standby`: have it fork the new generation (see `standby`), or else fork
        here."""
        from graceful_http.zygote import KEPT_BY_A_FORKED_MAIN, fork_to_go_on_here

        link = SuccessorLink()
        nice, restore_nice = start_nice(wanted_nice) or (None, None)
        idle = idle_start_allowed()
        listen_fds, names = [item.sock.fileno() for item in listeners], [item.name for item in listeners]
        fork = functools.partial(fork_successor, listen_fds, names, link.theirs.fileno(), inherited, environ, nice=nice,
                                 idle=idle)
        # The standby, the forks and the new generation run idle until it answers, then its processes until
        # ready (see `until_ready`); busy CPUs may leave them next to nothing: after a while, ours.
        starved = asyncio.get_running_loop().call_later(RESTORE_AFTER, leave_idle_start_of, None,
                                                        os.getpid()) if idle else None
        try:
            pid = None
            if standby is not None and standby.usable:
                try:
                    pid = await standby.start(listen_fds, names, link.theirs.fileno(), inherited, environ, nice,
                                              idle)
                except StandbyUnavailable as exc:
                    log.warning("the standby could not start the new generation (%s): forking it here", exc)
            if pid is None:
                forked = fork_to_go_on_here(fork, KEPT_BY_A_FORKED_MAIN) if fork_only else fork()
                pid = await new_generation_pid(*forked)
        except OSError:
            link.close()
            raise
        finally:
            if starved is not None:
                starved.cancel()
        link.close_theirs()
        return cls(attempt, pid, link, restore_nice, idle)

    async def until_ready(self) -> g.ChildReady | g.ChildFailed:
        """What became of it: ready, or failed (it said why, or it exited)."""
        message = asyncio.create_task(self.link.next_message())
        exit_wait = asyncio.create_task(wait_exit(self.pidfd))
        starved = None
        if self.restore_nice is not None:
            starved = asyncio.get_running_loop().call_later(RESTORE_AFTER, restore, self.pid, self.restore_nice)
        idle_starved = None
        if self.idle:  # busy CPUs leave an idle start next to nothing: after a while it starts at ours
            idle_starved = asyncio.get_running_loop().call_later(RESTORE_AFTER, leave_idle_start_of, self.pid,
                                                                 os.getpid())
        try:
            done, _ = await asyncio.wait({message, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            gone = f"new generation (pid {self.pid}) exited before it was ready"
            if message in done:
                word, detail = message.result()
                if word == READY:
                    self.adopts = ADOPTS in detail.split()
                    self.rolls = ROLLOUT in detail.split()
                    return g.ChildReady(self.attempt, self.pid)
                if word == FAILED:
                    return g.ChildFailed(self.attempt, detail or gone)
                await exit_wait  # the channel closed: it is exiting
            return g.ChildFailed(self.attempt, self.link.pending_failure() or gone)
        finally:
            message.cancel()
            exit_wait.cancel()
            if starved is not None:
                starved.cancel()
                restore(self.pid, self.restore_nice)  # ready (or failed: then it is killed anyway)
            if idle_starved is not None:
                idle_starved.cancel()  # ready: it left SCHED_IDLE itself (or failed: then it is killed anyway)

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def tell_main(self, rollout: bool = False) -> None:
        """systemd knows it as the main process now: it may talk to systemd (`rollout`: we retire our
        workers one by one as it asks)."""
        self.link.tell_main(rollout)

    async def until_serving(self) -> bool:
        """True once it confirms it serves as main (or says nothing but lives on); False if it exited."""
        if await self.link.serving_confirmed():
            return True
        if await wait_exit(self.pidfd, 1.0):  # its closed channel may precede its exit by a moment
            return False
        log.warning("the new generation (pid %d) did not confirm it serves as main within %gs;"
                    " considering it main", self.pid, CONFIRM_TIMEOUT)
        return True

    def kill(self) -> None:
        kill_group(self.pid)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)  # a wait on it may still be cancelling
        os.close(self.pidfd)
        self.link.close()


def exit_watch(pid: int) -> int:
    """A descriptor that becomes readable once `pid` exits: its pidfd, or, if it has exited and been reaped
    already (a new generation that failed at once, reaped by PID 1 before we knew its pid: its reason is on
    the handoff channel), one that is readable now."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        read, write = os.pipe()
        os.close(write)  # at its end: readable from the start
        return read


def wait_until_reaped(pid: int, timeout: float = 2.0) -> bool:
    """Wait (a few ms, typically) until the exited process `pid` is reaped by its parent (PID 1 here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # a zombie still counts
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.001)
    return False
