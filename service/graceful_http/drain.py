"""Lame-duck draining decisions, pure.

Closing an idle keep-alive connection races with the client's next request
on it (under load a connection is almost always between two requests). So a
draining generation keeps serving requests that arrive on connections it
already holds (answering them with `Connection: close`) and only closes a
connection that has been idle, with no bytes received, for a short grace.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionView:
    """What the drain needs to know of one connection."""

    key: int
    busy: bool  # a request is being received or answered
    last_data_at: float  # monotonic time of the last bytes received (0 if none)


class IdleCloser:
    """Tracks how long each connection has been idle; says which to close now."""

    def __init__(self, grace: float):
        self.grace = grace
        self._idle_since: dict[int, float] = {}

    def due(self, connections: list[ConnectionView], now: float) -> list[int]:
        due = []
        seen = set()
        for conn in connections:
            seen.add(conn.key)
            if conn.busy:
                self._idle_since.pop(conn.key, None)
                continue
            since = max(self._idle_since.setdefault(conn.key, now), conn.last_data_at)
            self._idle_since[conn.key] = since
            if now - since >= self.grace:
                due.append(conn.key)
        for key in set(self._idle_since) - seen:
            del self._idle_since[key]
        return due
