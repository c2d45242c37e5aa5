"""The stable-pid holder's decisions, as pure code: whether to hold, whom to signal, what to exit with.

Outside systemd nobody follows a MAINPID handoff: a container runtime,
supervisord or a shell's `$!` keeps the pid it started. So the first process
stays for the service's whole life as a holder, and the generations hand over
among themselves below it. The holder learns the current main from each new
main's report (a datagram on a channel every generation inherits), forwards
the signals an admin or a runtime sends to it, and exits with the status of
the last main once no process of the service is left.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from graceful_http.inherited import HOLDER_FD

HOLDER_FD_VARIABLE = HOLDER_FD  # set in every generation that runs under a holder (inherited.py names it)
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
MAIN_REPORT = "main"
NO_MAIN_EXIT_CODE = 1


def holder_wanted(stable_pid: bool | None, pid: int, environ: Mapping[str, str]) -> bool:
    """Should this `serve` process stay as the holder (rather than be generation 1 itself)?

    PID 1 always holds: its exit would kill every process in its PID namespace,
    and orphans must be reaped. Under systemd (NOTIFY_SOCKET) the MAINPID
    handoff keeps systemd tracking the service, so there is none. Anywhere else
    it holds unless `--no-stable-pid` says not to.
    """
    if HOLDER_FD_VARIABLE in environ:
        return False  # a generation started under a holder
    if pid == 1:
        return True
    if environ.get("NOTIFY_SOCKET"):
        return False
    return stable_pid is not False


def exit_code_of(wait_status: int) -> int:
    """A child's wait status as a process exit code: its own, or 128 + the signal that killed it (as shells say)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def parse_report(message: bytes) -> int | None:
    """The generation number in a main's report (`main <generation>`), or None if it is not one."""
    word, _, generation = message.decode(errors="replace").strip().partition(" ")
    if word != MAIN_REPORT or not (generation.isascii() and generation.isdigit()):
        return None
    return int(generation)


@dataclass
class Service:
    """What the holder knows of the service below it: the current main and the last main's exit."""

    main: int | None
    generation: int = 1
    last_main_exit: int | None = None
    pending_stop: int | None = None  # a stop signal that came while no main was known
    stopping: bool = False

    def main_reported(self, pid: int, generation: int) -> list[tuple[int, int]]:
        """A new main said it took over; return the signals to deliver to it now (a stop it missed)."""
        self.main, self.generation = pid, generation
        if self.pending_stop is None:
            return []
        signum, self.pending_stop = self.pending_stop, None
        return [(pid, signum)]

    def reaped(self, pid: int, wait_status: int) -> bool:
        """A child exited; True if it was the current main."""
        if pid != self.main:
            return False
        self.last_main_exit = exit_code_of(wait_status)
        self.main = None
        return True

    def signal_received(self, signum: int) -> list[tuple[int, int]]:
        """(pid, signal) to send for a signal the holder received: the current main gets it.

        With no main known (between a main's exit and its successor's report),
        a stop waits for the next main; a reload or anything else is dropped.
        """
        if signum in STOP_SIGNALS:
            self.stopping = True
        if self.main is not None:
            return [(self.main, signum)]
        if signum in STOP_SIGNALS:
            self.pending_stop = signum
        return []

    def exit_code(self) -> int:
        """Once no process is left: the last main's exit code."""
        return self.last_main_exit if self.last_main_exit is not None else NO_MAIN_EXIT_CODE
