"""sd_notify(3) messages: pure formatting plus a thin sender over systemd-python.

Only the current main process may talk to systemd (NotifyAccess=main), so the
supervisor decides *whether* to send; this module only decides *how*.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

# systemd processes MAINPID= before READY=/RELOADING= in one datagram; we keep
# that order in the text too so a reader of strace sees the same thing.
_FIELD_ORDER = ("MAINPID", "MAINPIDFDID", "READY", "RELOADING", "STOPPING", "STATUS", "WATCHDOG")


def format_message(fields: Mapping[str, object]) -> str:
    """`{"MAINPID": 5, "READY": 1}` -> "MAINPID=5\\nREADY=1"."""
    def rank(key: str) -> int:
        return _FIELD_ORDER.index(key) if key in _FIELD_ORDER else len(_FIELD_ORDER)

    lines = []
    for key in sorted(fields, key=rank):
        value = str(fields[key])
        if not key.isupper() or "=" in key or "\n" in value:
            raise ValueError(f"invalid notify field {key}={value!r}")
        lines.append(f"{key}={value}")
    return "\n".join(lines)


def parse_message(text: str) -> dict[str, str]:
    """The inverse of `format_message` (used by tests and the fake notify socket)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class Notifier:
    """Sends notify messages when systemd listens; a silent no-op otherwise."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))

    def send(self, **fields: object) -> bool:
        if not self.enabled:
            return False
        from systemd import daemon

        return daemon.notify(format_message(fields))

    async def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until systemd has processed everything sent before (BARRIER=1), without holding up the event
        loop: PID 1 answers when the CPUs let it, and the old main serves meanwhile (a blocking wait here
        stalled every connection of a reload's handover under load).

        systemd closes its copy of the attached pipe end once it reaches the
        barrier; our end then reads as closed. True if that happened within `timeout`.
        """
        if not self.enabled:
            return False
        from systemd import daemon

        read_end, write_end = os.pipe()
        try:
            sent = daemon.notify("BARRIER=1", fds=[write_end])
        finally:
            os.close(write_end)
        loop = asyncio.get_running_loop()
        closed = loop.create_future()
        try:
            if not sent:
                return False
            loop.add_reader(read_end, lambda: closed.done() or closed.set_result(True))
            try:
                return await asyncio.wait_for(closed, timeout)
            except asyncio.TimeoutError:
                return False
            finally:
                loop.remove_reader(read_end)
        finally:
            os.close(read_end)

def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is set for us."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2_000_000
