"""The client half of the control socket: what `graceful-http reload` (ExecReload=) runs.

Standard library only, no asyncio: systemd starts this process for every
`systemctl reload`, and its start-up time is part of every reload.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

FINAL_CODES = ("done", "failed", "refused")


class Outcome(NamedTuple):
    code: str
    detail: str
    pid: int | None = None


class ControlError(Exception):
    """Could not reach the service's control socket."""


def address_for(pid: int) -> bytes:
    namespace = os.stat("/proc/self/ns/pid").st_ino
    return f"\0graceful-http/{namespace}/{pid}".encode()


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def parse_line(line: str) -> Outcome:
    code, _, rest = line.strip().partition(" ")
    pid_text, _, detail = rest.partition(" ")
    return Outcome(code, detail, int(pid_text) if pid_text.isdigit() else None)


def request_reload(pid: int, timeout: float, on_progress: Callable[[Outcome], None]) -> Outcome:
    """Ask process `pid` for a reload and wait for the final outcome."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address_for(pid))
        except OSError as exc:
            raise ControlError(f"cannot reach graceful-http pid {pid}: {exc.strerror or exc}"
                               " (is it running, and is it the main process?)") from None
        # Abstract socket names are first come, first served: make sure pid itself answers.
        if (holder := peer_pid(sock)) != pid:
            raise ControlError(f"the control socket of pid {pid} is held by pid {holder}, not by pid {pid}")
        sock.sendall(b"reload\n")
        reader = sock.makefile("r", encoding="utf-8", errors="replace")
        for line in reader:
            outcome = parse_line(line)
            if outcome.code in FINAL_CODES:
                return outcome
            on_progress(outcome)
        return Outcome("failed", f"pid {pid} closed the control connection before the reload finished")
    except TimeoutError:
        return Outcome("failed", f"no answer from pid {pid} within {timeout:g}s")
    finally:
        sock.close()
