"""Ending WebSockets cleanly when a generation drains: a close frame the client and the app both see.

An upgraded connection carries the app's state, so it cannot move to the new
generation. The best a server can do is what a polite peer does: send a close
frame (1012 Service Restart at a reload, 1001 Going Away at a stop), tell the
app (`websocket.disconnect` with that code), let its handler finish, and wait
for the client's echo. The closes are spread over a window so that thousands
of clients do not reconnect to the new generation in the same millisecond.

uvicorn has three WebSocket implementations across the versions we support
(wsproto, websockets' sans-I/O protocol, websockets' legacy protocol); its
own `shutdown()` closes the transport right after the close frame, without
the closing handshake and, on the legacy protocol of uvicorn 0.17.6, without a
close frame at all. `begin_close` starts the closing handshake on each, the
way the implementation itself does when the app asks to close.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

SERVICE_RESTART = 1012
GOING_AWAY = 1001
CLOSE_TIMEOUT = 5.0  # how long the client has to echo our close frame

_closing: set[asyncio.Task] = set()


def is_websocket(connection) -> bool:
    return type(connection).__module__.startswith("uvicorn.protocols.websockets")


def close_delays(count: int, spread: float, rng: Callable[[], float] = random.random) -> list[float]:
    """When to close each of `count` WebSockets: uniformly over [0, spread) seconds."""
    return [rng() * spread for _ in range(count)] if spread > 0 else [0.0] * count


def capped_spread(spread: float, graceful_timeout: float) -> float:
    """Spread the closes over at most half the graceful timeout, so that handlers have time to finish."""
    return max(0.0, min(spread, graceful_timeout / 2))


def handshake_complete(connection) -> bool:
    for name in ("handshake_complete", "handshake_completed_event"):
        value = getattr(connection, name, None)
        if value is not None:
            return value.is_set() if isinstance(value, asyncio.Event) else bool(value)
    return False


def begin_close(connection, code: int, reason: str = "", timeout: float = CLOSE_TIMEOUT) -> bool:
    """Start the closing handshake with `code`; False if it was closing already (or never opened)."""
    transport = connection.transport
    if transport.is_closing() or getattr(connection, "close_sent", False) or not handshake_complete(connection):
        return False
    loop = asyncio.get_running_loop()
    conn = getattr(connection, "conn", None)
    if conn is not None and hasattr(conn, "send_close"):  # websockets' sans-I/O protocol
        connection.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        conn.send_close(code, reason)
        transport.write(b"".join(conn.data_to_send()))
    elif conn is not None:  # wsproto
        import wsproto.events

        connection.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        transport.write(conn.send(wsproto.events.CloseConnection(code=code, reason=reason)))
    elif hasattr(connection, "close") and hasattr(connection, "recv"):  # websockets' legacy protocol
        task = loop.create_task(connection.close(code, reason))  # its own handshake and timeout
        _closing.add(task)  # the event loop holds tasks weakly
        task.add_done_callback(_closing.discard)
        return True
    else:
        return False
    if hasattr(connection, "close_sent"):
        connection.close_sent = True  # newer uvicorn then closes the transport when the client echoes
    if getattr(connection, "read_paused", False):
        connection.read_paused = False
        transport.resume_reading()
    timer = loop.call_later(timeout, transport.close)  # a client that never echoes
    if hasattr(connection, "close_timer"):
        connection.close_timer = timer
    return True


class WebSocketCloser:
    """One drain's WebSockets: each closed at its moment in the spread window, counted."""

    def __init__(self, code: int, spread: float, rng: Callable[[], float] = random.random):
        self.code = code
        self.spread = spread
        self.rng = rng
        self.scheduled: dict[int, asyncio.TimerHandle] = {}
        self.closed = 0

    def schedule(self, websockets: Sequence) -> None:
        """Give every WebSocket not yet scheduled its moment (those upgraded during the drain too)."""
        new = [ws for ws in websockets if id(ws) not in self.scheduled]
        loop = asyncio.get_running_loop()
        for ws, delay in zip(new, close_delays(len(new), self.spread, self.rng)):
            self.scheduled[id(ws)] = loop.call_later(delay, self._close, ws)

    def _close(self, ws) -> None:
        if begin_close(ws, self.code, "server restart" if self.code == SERVICE_RESTART else "server shutdown"):
            self.closed += 1

    def cancel(self) -> None:
        for handle in self.scheduled.values():
            handle.cancel()
