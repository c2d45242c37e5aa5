"""Whether a keep-alive connection can move to another process right now, pure.

A connection moves as a bare descriptor: whatever the old process holds in
user space (a half-parsed request, a queued pipelined one, response bytes not
yet written, a protocol other than HTTP/1.1 on top) would be lost or
duplicated. So only a connection between two requests, with everything it
sent still in the kernel and everything we sent already in it, may move.
`engine.connection_state` reads this view from uvicorn's protocol objects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionState:
    """What the decision needs to know of one connection, whatever the engine."""

    upgraded: bool = False  # another protocol (WebSocket) took over the transport
    encrypted: bool = False  # TLS state lives in this process
    closing: bool = False  # the transport is closing or closed
    keep_alive: bool = True  # the last exchange allows another request on this connection
    response_complete: bool = True  # no response under way (or no request yet)
    request_pending: bool = False  # the parser holds part of a request, or a queued pipelined one
    body_unread: bool = False  # answered before its request body ended: where the next request starts is unknown
    unsent_bytes: int = 0  # response bytes still in our write buffer (an abort would drop them)


class Verdict(enum.Enum):
    MOVE = "move"  # hand it over now
    WAIT = "wait"  # busy: ask again once it is idle
    NEVER = "never"  # it can't move: drain it here


def judge(state: ConnectionState) -> tuple[Verdict, str]:
    """(verdict, why) for one connection. The permanent reasons come first: a connection that will
    never move must not be waited for."""
    if state.upgraded:
        return Verdict.NEVER, "upgraded to another protocol"
    if state.encrypted:
        return Verdict.NEVER, "TLS"
    if state.closing:
        return Verdict.NEVER, "closing"
    if not state.keep_alive:
        return Verdict.NEVER, "keep-alive is off (Connection: close)"
    if state.body_unread:
        return Verdict.NEVER, "answered before its request body was read"
    if not state.response_complete:
        return Verdict.WAIT, "a response is under way"
    if state.request_pending:
        return Verdict.WAIT, "a request is partly read or queued"
    if state.unsent_bytes:
        return Verdict.WAIT, "the response is not yet flushed"
    return Verdict.MOVE, "idle"
