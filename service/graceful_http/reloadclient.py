"""The client half of the control socket: what `graceful-http reload` (ExecReload=) runs.

Standard library only, no asyncio, nothing of the server: systemd starts this
process for every `systemctl reload`, and its start-up time is part of every reload
(hence `_socket`, not `socket`, whose import is 3 ms of CPU with the enums it makes).
"""

from __future__ import annotations

import _socket
from collections.abc import Callable

from graceful_http.wire import FINAL_CODES, Outcome, control_address, parse_outcome, peer_credentials


class ControlError(Exception):
    """Could not reach the service's control socket."""


def request_reload(pid: int, timeout: float, on_progress: Callable[[Outcome], None],
                   canary: float | None = None) -> Outcome:
    """Ask process `pid` for a reload (with a canary of `canary` seconds, if given) and wait for the final
    outcome."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(control_address(pid))
        except OSError as exc:
            raise ControlError(f"cannot reach graceful-http pid {pid}: {exc.strerror or exc}"
                               " (is it running, and is it the main process?)") from None
        # Abstract socket names are first come, first served: make sure pid itself answers.
        if (holder := peer_credentials(sock)[0]) != pid:
            raise ControlError(f"the control socket of pid {pid} is held by pid {holder}, not by pid {pid}")
        sock.sendall(b"reload\n" if canary is None else f"reload canary={canary:g}\n".encode())
        for line in _lines(sock):
            outcome = parse_outcome(line.decode("utf-8", errors="replace"))
            if outcome.code in FINAL_CODES:
                return outcome
            on_progress(outcome)
        return Outcome("failed", f"pid {pid} closed the control connection before the reload finished")
    except TimeoutError:
        return Outcome("failed", f"no answer from pid {pid} within {timeout:g}s")
    finally:
        sock.close()


def _lines(sock):
    """The lines `sock` receives until it closes (a last one without a newline too)."""
    pending = b""
    while chunk := sock.recv(4096):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending
