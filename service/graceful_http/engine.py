"""uvicorn, embedded: we own the sockets, the signals and the way connections drain.

Works with uvicorn 0.17.6 (Debian 12) and the newest release: it only uses
names both have (`Config.load`, `Server.startup(sockets=…)`, `servers`,
`server_state`, a connection's `cycle` and `transport`, `lifespan`).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable
from email.utils import formatdate

from graceful_http import uvicorn_core
from graceful_http.balanced_accept import WatchedSet
from graceful_http.drain import ConnectionView, IdleCloser
from graceful_http.fdlimit import DescriptorWatch
from graceful_http.handover import Handover, fill_emptiest
from graceful_http.movable import ConnectionState, Verdict, judge
from graceful_http.settings import (
    DEFAULT_FORWARDED_ALLOW_IPS,
    FORWARDED_ALLOW_IPS_VARIABLE,
    ServeSettings,
    SettingsError,
    parse_trusted_proxies,
)
from graceful_http.tls import TLSError, server_context
from graceful_http.websocket_drain import (
    GOING_AWAY,
    SERVICE_RESTART,
    WebSocketCloser,
    begin_close,
    capped_spread,
    is_websocket,
)

uvicorn = uvicorn_core.load()  # without its command line: see uvicorn_core

log = logging.getLogger("graceful_http")

DRAIN_TICK = 0.05
HANDOVER_BATCH = 64  # connections detached and sent to the new generation at a time (see _hand_over_idle)


class StartupFailed(Exception):
    """The app's lifespan startup failed (uvicorn logged the details)."""


@functools.cache
def _protocol_base(http: str = "auto"):
    """httptools when available (as uvicorn's "auto" does), else h11; or the one asked for. Chosen once per
    process tree: where httptools is missing, each try is a failed import (a search of sys.path) that Python
    does not remember, and a forked worker would try again (twice) while the old generation serves."""
    if http in ("auto", "httptools"):
        try:
            import httptools  # noqa: F401
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def parser_refuses_double_framing(protocol: str = "auto") -> bool:
    """Does the HTTP parser an engine uses refuse a request framed by both Content-Length and
    Transfer-Encoding (request smuggling's tool) by itself? httptools (llhttp) does, h11 does not: the
    control layer checks each request only when the parser does not."""
    if _protocol_base(protocol).__name__ != "HttpToolsProtocol":
        return False
    import httptools

    class _Ignore:
        pass

    try:
        httptools.HttpRequestParser(_Ignore()).feed_data(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    except httptools.HttpParserError:
        return True
    return False


class EngineSettingError(Exception):
    """This uvicorn cannot do what a setting asks (e.g. a WebSocket implementation it lacks), or a setting's
    file cannot be used (a certificate that does not load)."""


def uvicorn_config(app, lifespan: bool | str, websockets: dict | None = None,
                   settings: ServeSettings | None = None, protocol: str = "auto") -> uvicorn.Config:
    """uvicorn's configuration: `settings`' HTTP options (the app's listeners), or none (the control socket).

    `websockets`: ws, ws_max_size, ws_ping_interval, ws_ping_timeout (uvicorn's names and meanings). The TLS
    context is not here: `Engine` loads it (`tls.server_context`) and hands it to uvicorn.
    """
    websockets = websockets or {}
    ws = websockets.get("ws", "auto")
    known = getattr(uvicorn.config, "WS_PROTOCOLS", {})
    if ws not in known:
        raise EngineSettingError(f"--ws {ws}: uvicorn {uvicorn.__version__} offers {', '.join(known)}")
    if isinstance(lifespan, bool):
        lifespan = "auto" if lifespan else "off"
    http = {"proxy_headers": False, "server_header": False}  # the control socket: no proxy, nothing to announce
    if settings is not None:
        http = {
            "root_path": settings.root_path,
            "proxy_headers": settings.proxy_headers,
            "forwarded_allow_ips": ",".join(trusted_proxies(settings)),
            # A whole number of seconds as an int, as uvicorn's own default: uvloop's call_later (the keep-alive
            # timer armed after every response) rounds a float delay the slow way.
            "timeout_keep_alive": _int_if_whole(settings.timeout_keep_alive),
            "limit_concurrency": settings.limit_concurrency,
            "backlog": settings.backlog,  # asyncio re-listens every socket it serves with this backlog
            "headers": [list(header) for header in settings.headers],
            "server_header": settings.server_header,
            "date_header": settings.date_header,
        }
    if settings is not None and settings.proxy_headers and not _trusts_networks():
        app = _ClientOfAnAllTrustedChain(app)
    protocol_class = tracked_protocol(_protocol_base(protocol))
    config = uvicorn.Config(
        app=app,
        interface="asgi3",  # the control layer is ASGI 3; it adapts the user's app itself
        http=protocol_class,
        lifespan=lifespan,
        access_log=False,
        log_config=None,
        **http,
        **websockets,
    )
    # uvicorn 0.17.6 has no such option: the tracked protocol applies it itself, to h11 and httptools alike.
    config.h11_max_incomplete_event_size = settings.h11_max_incomplete_event_size if settings else None
    if config.h11_max_incomplete_event_size is not None:  # on the class: not one more attribute per connection
        protocol_class.max_head_bytes = config.h11_max_incomplete_event_size
    return config


def _int_if_whole(seconds: float) -> float | int:
    return int(seconds) if seconds == int(seconds) else seconds


def trusted_proxies(settings: ServeSettings, environ=os.environ) -> tuple[str, ...]:
    """Whose X-Forwarded-For/-Proto to believe: the option, else $FORWARDED_ALLOW_IPS, else loopback.

    uvicorn 0.17.6 compares addresses as strings: a network there would trust no one, so it is refused.
    """
    if settings.forwarded_allow_ips is not None:
        trusted, where = settings.forwarded_allow_ips, "--forwarded-allow-ips"
    elif environ.get(FORWARDED_ALLOW_IPS_VARIABLE) is not None:
        where = FORWARDED_ALLOW_IPS_VARIABLE
        trusted = parse_trusted_proxies(environ[FORWARDED_ALLOW_IPS_VARIABLE], where)
    else:
        return DEFAULT_FORWARDED_ALLOW_IPS
    networks = [item for item in trusted if "/" in item]
    if networks and not _trusts_networks():
        raise SettingsError(f"invalid {where} {','.join(trusted)!r}: uvicorn {uvicorn.__version__} trusts single"
                            f" addresses only, not networks such as {networks[0]} (newer uvicorn does)")
    return trusted


class _ClientOfAnAllTrustedChain:
    """uvicorn 0.17.6 makes the client `(None, 0)` when every X-Forwarded-For address is a trusted proxy (which
    breaks apps that read the client's address); newer uvicorn takes the leftmost address, as this does."""

    def __init__(self, app):
        self.app = app

    def __call__(self, scope, receive, send):  # returns the app's awaitable: no coroutine layer of its own
        client = scope.get("client")
        if client is not None and client[0] is None:
            for name, value in scope.get("headers", ()):
                if name == b"x-forwarded-for":
                    scope = {**scope, "client": (value.decode("latin-1").split(",")[0].strip(), 0)}
                    break
        return self.app(scope, receive, send)


def _trusts_networks() -> bool:
    from uvicorn.middleware import proxy_headers

    return hasattr(proxy_headers, "_TrustedHosts")


def preload() -> None:
    """Import now what starting an Engine imports (its protocols, lifespan, websockets: about as long again
    as importing uvicorn), for workers forked from a main that does not serve itself."""
    uvicorn_config(_no_app, lifespan=True).load()


async def _no_app(scope, receive, send) -> None:  # pragma: no cover - never called
    raise RuntimeError("preload's placeholder app")


# A client has this long to send a complete request head (from connecting, or from its first byte after a
# response: until then uvicorn's keep-alive timeout governs), and this many bytes for it (unless
# --h11-max-incomplete-event-size says otherwise): uvicorn's keep-alive timer only runs between requests and
# any byte received cancels it, and httptools buffers a head of any size. (nginx: 60 s and 32 KiB.)
HEAD_TIMEOUT = 10.0
MAX_HEAD_BYTES = 64 * 1024


def head_too_large(limit: int) -> bytes:
    body = f"request head larger than {limit} bytes\n".encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


def tracked_protocol(base):
    """uvicorn's protocol, plus: limits on request heads, what deciding whether the connection may move to
    another process needs (`handover_state`), and, once its engine drains (`begin_draining`), when it last
    received bytes (to judge idleness) and a wake-up of the drain at each response.

    The steady state costs two attribute reads per chunk received, in uvicorn's own `data_received` (written
    out for httptools: see the parser's mixin), and reads no flag unless the chunk completed no request head: the head's
    time limit is enforced by the engine's once-a-second sweep (`sweep_heads`), not by a timer per request,
    and nothing else runs per chunk or request unless the connection is `watched` (in systemd's fd store, or
    its engine drains).
    """
    parser_tracking = _HttpToolsMessages if base.__name__ == "HttpToolsProtocol" else _H11Messages
    base_on_response_complete = base.on_response_complete

    class Tracked(parser_tracking, base):
        # uvicorn's protocol has 28 attributes (with `url`), and CPython 3.11 keeps a class's instances
        # compact only up to 29 names in all: an instance that sets one more gets a dict, and every attribute
        # read of uvicorn's code on it costs more (about 13 % more instructions per request, measured with
        # bench/instructions.py). So what every connection keeps is in slots (outside those names, and read
        # fast, which a class attribute read through an instance is not), the rest lives on the class, and
        # only connections that are ending (draining) or stored in the fd store set more than one name.
        __slots__ = (
            "watched",  # stored in the fd store, or draining: every chunk received is looked at
            # (cycle, busy, since, head bytes): since when the connection has been busy with `cycle`, or waiting
            # for the request head after it (None: the first), as the sweep or the drain first saw it (0.0:
            # not yet), and how many bytes of that head arrived so far.
            "_since",
        )
        last_data_at = 0.0  # while draining only: when the last bytes arrived
        adopted = False  # True on the class `Engine.adopt` makes (see `Adopted` below)
        lame_duck = False  # set by a draining engine that can't hand it over: each response closes it
        _fd_name = None  # see `fd_name`
        draining = False  # set by `begin_draining`
        held = False  # set by `hold_for_handover`
        max_head_bytes = MAX_HEAD_BYTES

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.watched = False
            self._since = None
            limit = getattr(self.config, "h11_max_incomplete_event_size", None)
            if limit is not None:
                if hasattr(self, "conn") and type(self.conn).__module__.startswith("h11"):
                    import h11

                    self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)

        def connection_made(self, transport):
            super().connection_made(transport)
            if self.adopted:  # idle between two requests, as after a response: uvicorn's keep-alive timer runs
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
            if self.lame_duck:
                self.begin_draining()

        @property
        def fd_name(self) -> str | None:
            """Its name in systemd's fd store while it is stored there (see fdstore_systemd)."""
            return self._fd_name

        @fd_name.setter
        def fd_name(self, name: str | None) -> None:
            self._fd_name = name
            self.watched = name is not None or self.draining

        def _received(self, before, data):
            """After a chunk that completed no request head (part of a head or a body, an upgrade), or any
            chunk while watched."""
            if self._fd_name is not None:  # busy now: out of the store
                self.server_state.fd_store.got_busy_or_closed(self)
            if self.draining:
                self.last_data_at = time.monotonic()
            if self.cycle is not before or self.transport.get_protocol() is not self:
                if self.draining:  # a request head is complete (or the connection was upgraded)
                    self._state_since(self.last_data_at)
                    if self.lame_duck:
                        _close_after_response(self)
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # part of a request head
                since = self._since
                if since is None or since[0] is not cycle or since[1]:
                    since = (cycle, False, 0.0, 0)
                head_bytes = since[3] + len(data)
                self._since = (cycle, False, since[2], head_bytes)
                if head_bytes > self.max_head_bytes and not self.transport.is_closing():
                    self.transport.write(head_too_large(self.max_head_bytes))
                    self.transport.close()

        def begin_draining(self):
            """From now on, note when bytes arrive and wake the draining engine at each response."""
            if self.draining:
                return
            self.draining = self.watched = True
            self.on_response_complete = self._responded_while_draining  # what new cycles will call
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.on_response = self._responded_while_draining

        def _responded_while_draining(self):
            before = self.cycle
            base_on_response_complete(self)
            if self.lame_duck and self.cycle is not before:  # a pipelined request started
                _close_after_response(self)
            state = self.server_state
            if getattr(state, "hold_idle", False) and self.cycle is before and not self.lame_duck:
                hold_for_handover(self)
            wake = getattr(state, "wake_drain", None)
            if wake is not None:  # a draining engine hands over connections as soon as they are idle
                wake()

        def _state_since(self, now: float) -> float:
            """Since when the connection has been in its current state (busy with a request, or waiting for
            a head), stamping `now` if nobody saw this state yet."""
            cycle = self.cycle
            busy = cycle is not None and not cycle.response_complete
            since = self._since
            if since is None or since[0] is not cycle or since[1] is not busy:
                since = (cycle, busy, 0.0, 0)
            if not since[2]:
                self._since = since = (cycle, busy, now, since[3])
            return since[2]

        @property
        def request_started_at(self) -> float:
            """When the request in progress began (as the sweep or the drain first saw it), 0 if none."""
            since, cycle = self._since, self.cycle
            return since[2] if since is not None and since[1] and since[0] is cycle else 0.0

        def sweep(self, now: float) -> None:
            """The engine's periodic look at this connection: close it if a request head has taken longer
            than HEAD_TIMEOUT (counted from the first sweep that saw it waiting with uvicorn's keep-alive
            timer stopped, i.e. once a byte of it arrived, or from the connection's start); note when a
            request in progress began, for the graceful timeout's log line."""
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and self.timeout_keep_alive_task is not None \
                    and not (self._body_unread(cycle) or self._request_pending()):
                return  # idle between two requests: uvicorn's keep-alive timer governs
            # (Answered before its body ended, the rest of the body must come within the head's limit.)
            since = self._state_since(now)
            busy = cycle is not None and not cycle.response_complete
            if not busy and now - since >= HEAD_TIMEOUT and self.transport.get_protocol() is self:
                self.transport.close()

        def handover_state(self) -> ConnectionState:
            transport = self.transport
            cycle = self.cycle
            flow = getattr(self, "flow", None)
            return ConnectionState(
                upgraded=transport.get_protocol() is not self,
                encrypted=transport.get_extra_info("sslcontext") is not None,
                closing=transport.is_closing(),
                keep_alive=self._keeps_alive(cycle),
                response_complete=cycle is None or cycle.response_complete,
                request_pending=self._request_pending() or bool(flow is not None and flow.read_paused),
                body_unread=self._body_unread(cycle),
                unsent_bytes=transport.get_write_buffer_size(),
            )

        def connection_lost(self, exc):
            if self.fd_name is not None:  # a stored copy would keep it open
                self.server_state.fd_store.got_busy_or_closed(self)
            super().connection_lost(exc)

        def quiesce(self) -> None:
            """Stop every timer of this connection: it is leaving this process."""
            if self.fd_name is not None:
                self.server_state.fd_store.leaving(self)
            self._unset_keepalive_if_required()

    class Adopted(Tracked):
        """A connection another process detached, idle: a class of its own rather than one more attribute."""

        adopted = True

    Tracked.__name__ = f"Tracked{base.__name__}"
    Tracked.adopted_class = Adopted
    return Tracked


class _HttpToolsMessages:
    """httptools keeps its parser state to itself: read where a request message stands from what uvicorn
    does at its steps (a new scope at its start, a cycle at the end of its head, `more_body` cleared at
    its end), so that no step costs an extra call."""

    def data_received(self, data) -> None:
        # uvicorn's own (httptools_impl), written out for one addition at no cost per request (a method that
        # called uvicorn's cost about 500 more instructions per request, counted with bench/instructions.py):
        # a chunk that completed no request head, or any chunk of a watched connection, is looked at
        # (`Tracked._received`). Its first step, `_unset_keepalive_if_required`, is written out too (a call
        # less per chunk).
        cycle = self.cycle
        keep_alive = self.timeout_keep_alive_task
        if keep_alive is not None:
            keep_alive.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # (free unless raised, as uvicorn's two except clauses)
            self._parser_raised(exc)
        if self.cycle is cycle or self.watched:  # no request head completed, or watched: rare
            self._received(cycle, data)

    def _parser_raised(self, exc: Exception) -> None:
        """What uvicorn does when the parser stops: an upgrade, or a 400 for a malformed request."""
        import httptools

        if isinstance(exc, httptools.HttpParserUpgrade):
            older = getattr(self, "handle_upgrade", None)  # uvicorn before _should_upgrade decides and answers
            if older is not None:
                older()
            elif self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        elif isinstance(exc, httptools.HttpParserError):
            msg = "Invalid HTTP request received."
            self.logger.warning(msg, exc_info=exc)  # one line (see OneLineProtocolErrors), as uvicorn 0.17.6 logs it
            self.send_400_response(msg)
        else:
            raise exc

    def _request_pending(self) -> bool:
        scope, cycle = self.scope, self.cycle
        head_under_way = scope is not None and (cycle is None or cycle.scope is not scope)
        body_under_way = cycle is not None and cycle.more_body and not cycle.response_complete
        return head_under_way or body_under_way or bool(self.pipeline)

    def on_message_complete(self) -> None:
        # uvicorn's own (httptools_impl: the message's end wakes the app's `receive`), written out here for one
        # addition at no cost per request: a request answered before its body ended (which uvicorn ignores
        # from then on) has now been read to its end, so the connection is between two requests again, which
        # a handover needs to know (see `_body_unread`).
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            cycle.more_body = False
            return
        if self.parser.should_upgrade():
            wanted = getattr(self, "_should_upgrade", None)  # (older uvicorn has none: it skips every upgrade)
            if wanted is None or wanted():
                return
        cycle.more_body = False
        cycle.message_event.set()

    def _body_unread(self, cycle) -> bool:
        # uvicorn stops following a request's body once its response is complete: until the parser reaches
        # the body's end (`on_message_complete` above), nobody can tell where the next request starts.
        return cycle is not None and cycle.response_complete and cycle.more_body and cycle.scope is self.scope

    def _keeps_alive(self, cycle) -> bool:
        return cycle is None or bool(cycle.keep_alive)


class _H11Messages:
    """h11 says it all: both sides IDLE between requests, unparsed bytes in `trailing_data`."""

    def data_received(self, data) -> None:
        # uvicorn's own, then the look the httptools one takes (see there; h11 is not the fast engine anyway)
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is cycle or self.watched:
            self._received(cycle, data)

    def _request_pending(self) -> bool:
        import h11

        conn = self.conn
        return not (conn.our_state is h11.IDLE and conn.their_state is h11.IDLE) or bool(conn.trailing_data[0])

    def _body_unread(self, cycle) -> bool:
        return False  # h11 reads (and discards) what the app left unread before the next request

    def _keeps_alive(self, cycle) -> bool:
        import h11

        closing = (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
        conn = self.conn
        return conn.our_state not in closing and conn.their_state not in closing and (
            cycle is None or getattr(cycle, "keep_alive", True))


def sweep_heads(connections, now: float) -> None:
    """Enforce HEAD_TIMEOUT on every connection of ours (WebSockets are not ours: they have no `sweep`)."""
    for connection in list(connections):
        sweep = getattr(connection, "sweep", None)
        if sweep is not None:
            sweep(now)


def begin_draining(connection, now: float) -> None:
    """Have a connection of ours report what a drain needs (when bytes arrive, each response)."""
    begin = getattr(connection, "begin_draining", None)
    if begin is not None:
        begin()
        if _busy(connection):
            connection._state_since(now)


def hold_for_handover(connection) -> None:
    """Stop reading a connection the moment its response is complete, if it may move now: the drain hands it
    over at its next turn, and its client's next request waits in the kernel for the process that adopts it.
    Read here, that request would keep the connection here one more time, and under load again and again:
    each next request arrived before the drain's next turn (50 busy connections took 40–100 ms to move)."""
    if judge(connection.handover_state())[0] is Verdict.MOVE:
        connection.transport.pause_reading()
        connection.held = True


def release_held(connection) -> None:
    """Read a held connection again: it stays and drains here after all."""
    if getattr(connection, "held", False):
        connection.held = False
        if not connection.transport.is_closing():
            connection.transport.resume_reading()


def connection_state(connection) -> ConnectionState:
    """The handover view of anything in `server_state.connections` (a WebSocket protocol is not ours)."""
    state = getattr(connection, "handover_state", None)
    return state() if state is not None else ConnectionState(upgraded=True)


class LifespanGuard:
    """Report an exception raised by the app's lifespan startup as a failed startup.

    uvicorn's lifespan "auto" mode reads any exception from the lifespan call
    as "this app does not support lifespan" and serves anyway. That is right
    for apps that reject the lifespan scope before taking a message (Django,
    WSGI adapters), wrong for an app whose startup code raised after taking
    `lifespan.startup`: a new generation would take over with its startup
    not done. Such an exception becomes `lifespan.startup.failed`.
    """

    def __init__(self, app):
        self.app = app
        self.failure: str | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        starting = False

        async def guarded_receive():
            nonlocal starting
            message = await receive()
            starting = message["type"] == "lifespan.startup"
            return message

        async def guarded_send(message):
            nonlocal starting
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                starting = False
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except (Exception, SystemExit) as exc:
            if not starting:
                raise
            self.failure = f"the app's lifespan startup raised {type(exc).__name__}: {exc}"
            log.error("the app's lifespan startup raised an exception", exc_info=exc)
            await send({"type": "lifespan.startup.failed", "message": self.failure})


def _close_after_response(connection) -> None:
    """Make a request in flight end its connection, telling the client if the response has not started.

    httptools' cycle adds `Connection: close` itself when keep_alive is off;
    h11 adds it when its connection state has keep-alive disabled.
    """
    cycle = getattr(connection, "cycle", None)
    if cycle is None or cycle.response_complete or getattr(cycle, "response_started", True):
        return
    cycle.keep_alive = False
    state = getattr(getattr(cycle, "conn", None), "_cstate", None)
    if state is not None and hasattr(state, "process_keep_alive_disabled"):
        state.process_keep_alive_disabled()


def _busy(connection) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


class OneLineProtocolErrors(logging.Filter):
    """A malformed request is the client's error, worth one line: uvicorn 0.17.6 logs a traceback of its
    parser for each one, which lets any client fill the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Invalid HTTP request"):
            record.msg = "invalid HTTP request received: %s"
            record.args = (record.exc_info[1],)
            record.exc_info = record.exc_text = None
        return True


def _takes_app_state(protocol_class) -> bool:
    """Does uvicorn's own protocol class (under our subclass) take `app_state` (newer uvicorn)?"""
    for klass in protocol_class.__mro__:
        if klass.__module__.startswith("uvicorn.protocols"):
            return "app_state" in inspect.signature(klass.__init__).parameters
    return False


def _peer(client) -> str:
    if isinstance(client, (tuple, list)) and len(client) >= 2:
        return f"the connection from {client[0]}:{client[1]}"
    return "a connection"


class NoCancelledTracebacks(logging.Filter):
    """A request cut at the graceful timeout is cancelled; uvicorn logs "Exception in ASGI application" with
    a CancelledError traceback for each (every reload of a Server-Sent-Events app). The drain logs one line
    per cut request instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def bytes_sent(transport) -> int | None:
    """Bytes the peer has acknowledged on this TCP connection (the kernel's count), None if not TCP."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(info[120:128], "little") if len(info) >= 128 else None


def describe_cut(connection, now: float) -> str:
    """One line for a request or WebSocket cut at the graceful timeout: what, how long, how much was sent."""
    if is_websocket(connection):
        scope = getattr(connection, "scope", None) or {}
        what = f"WebSocket {scope.get('path', '?')}"
        started = getattr(connection, "graceful_http_seen_at", None)
    else:
        cycle = getattr(connection, "cycle", None)
        scope = getattr(cycle, "scope", None) or {}
        streaming = getattr(cycle, "response_started", False)
        what = f"{'streaming response to ' if streaming else 'request '}{scope.get('method', '?')} {scope.get('path', '?')}"
        started = getattr(connection, "request_started_at", None) or None
    parts = [what]
    if started:
        parts.append(f"after {now - started:.1f}s")
    sent = bytes_sent(connection.transport)
    if sent is not None:
        parts.append(f"{sent} bytes sent on the connection")
    return ", ".join(parts)


class Engine:
    """One generation's HTTP server over already-listening sockets."""

    def __init__(self, app, sockets, *, idle_grace: float = 1.0, lifespan: bool = True,
                 websockets: dict | None = None, websocket_close_spread: float = 5.0,
                 settings: ServeSettings | None = None, protocol: str = "auto"):
        """`settings`' HTTP and TLS options apply (the app's listeners); without them, plain HTTP (the control
        socket). Raises EngineSettingError if the options cannot be used (a certificate that does not load)."""
        mode = (settings.lifespan if settings is not None else "auto") if lifespan else "off"
        if not (inspect.isfunction(app) or inspect.ismethod(app)):  # e.g. the control layer: calling its bound
            app = app.__call__  # __call__ costs less per request than calling the instance (no slot lookup)
        try:
            config = uvicorn_config(app, mode, websockets, settings, protocol)
            ssl_context = server_context(settings) if settings is not None else None
        except (SettingsError, TLSError) as exc:
            raise EngineSettingError(str(exc)) from None
        # uvicorn 0.17.6 wraps the app in its per-message trace logger whenever the "uvicorn.error"
        # logger has no level of its own, which log_config=None leaves it without.
        error_logger = logging.getLogger("uvicorn.error")
        if error_logger.level == logging.NOTSET:
            error_logger.setLevel(logging.getLogger().getEffectiveLevel())
        if not any(isinstance(f, OneLineProtocolErrors) for f in error_logger.filters):
            error_logger.addFilter(OneLineProtocolErrors())
            error_logger.addFilter(NoCancelledTracebacks())
        config.load()
        config.ssl = ssl_context  # what uvicorn's startup serves with
        self.server = uvicorn.Server(config)
        # The lifespan runs the app guarded, the requests run it bare: a copy of the configuration whose
        # app is the guarded one keeps the guard's layer off every request.
        self.lifespan_guard = LifespanGuard(config.loaded_app) if mode != "off" else None
        lifespan_config = config
        if self.lifespan_guard is not None:
            lifespan_config = copy.copy(config)
            lifespan_config.loaded_app = self.lifespan_guard
        self.server.lifespan = config.lifespan_class(lifespan_config)
        self.sockets = sockets
        self.idle_grace = idle_grace
        self.websocket_close_spread = websocket_close_spread
        self._listeners_closed = False
        self.adopts_connections = False  # the app's engine: a new generation takes the old one's connections here
        self.handed_over = 0  # connections another process took while we drained
        self.fell_back = 0  # connections that could not move and drained here
        self.adopted = 0  # connections we took from another process
        self.idle_keeper = None  # at a stop: takes an idle connection instead of closing it (see fdstore_systemd)
        self._moving = False
        # One per process: the app's engine watches descriptors (the control socket's has no lifespan).
        self.descriptors = DescriptorWatch(lambda: len(self.connections)) if lifespan else None
        self._ticker: asyncio.Task | None = None
        self._protocol_factory = None
        self.acceptor = None  # a worker's balanced accept loop (see balanced_accept): uvicorn's server accepts nothing

    def describe(self) -> str:
        protocol = "httptools" if "HttpTools" in self.server.config.http_protocol_class.__name__ else "h11"
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        tls = ", TLS" if self.server.config.ssl is not None else ""
        return f"uvicorn {uvicorn.__version__} ({protocol}, {loop} event loop{tls})"

    async def start(self) -> None:
        """Run the app's lifespan startup, then accept on every socket."""
        try:
            await self.server.startup(sockets=self.sockets if self.acceptor is None else [])
        except SystemExit:  # newer uvicorn exits on a failed lifespan startup
            raise StartupFailed(self._startup_failure()) from None
        if not self.server.started:
            raise StartupFailed(self._startup_failure())
        if self.descriptors is not None:
            self.descriptors.start()
        if self.acceptor is not None:
            state = self.server.server_state
            state.connections = WatchedSet(state.connections, self.acceptor.added, self.acceptor.publish)
            for sock in self.sockets:
                sock.listen(self.server.config.backlog)  # as asyncio's server would have
            self.acceptor.start(self.sockets, self.serve_accepted)
        self._ticker = asyncio.create_task(self._every_second())

    async def _every_second(self) -> None:
        """What uvicorn's own main loop does every second, which an embedded uvicorn must do itself: the
        headers of every response (Date, Server, --header) come from `server_state.default_headers`. And the
        request heads' time limit, for every connection at once (see `Tracked.sweep`)."""
        config = self.server.config
        while True:
            date = [(b"date", formatdate(time.time(), usegmt=True).encode())] if config.date_header else []
            self.server.server_state.default_headers = date + config.encoded_headers
            sweep_heads(self.connections, time.monotonic())
            await asyncio.sleep(1.0 - time.time() % 1.0)

    def _startup_failure(self) -> str:
        guard = self.lifespan_guard
        return (guard is not None and guard.failure) or "the app's lifespan startup failed"

    @property
    def connections(self):
        return self.server.server_state.connections

    @property
    def total_requests(self) -> int:
        return self.server.server_state.total_requests

    def in_flight(self) -> int:
        """Requests being answered and open WebSockets: the work a drain waits for."""
        return sum(1 for c in self.connections if _busy(c) or is_websocket(c))

    def stop_accepting(self, replaced: bool = False, moving_to: int | None = None) -> None:
        """Stop accepting now; close our copies of the listeners a loop turn later (in `drain`).

        Closing an asyncio server at once drops the connections it accepted in
        this same loop turn (their transports are still being attached): the
        kernel resets them. So we only stop watching the listeners here.
        Unless the connections are moving to a new generation (`moving_to`, its main), requests
        already in flight whose response has not started are told
        `Connection: close`, so their clients move to the new generation too.
        """
        loop = asyncio.get_running_loop()
        if self.acceptor is not None:
            self.acceptor.stop()
        watched = [loop.remove_reader(sock.fileno()) for server in self.server.servers for sock in server.sockets or ()]
        if not all(watched):  # not asyncio's selector loop (uvloop): its own close is safe
            self._close_listeners()
        self._moving = moving_to is not None
        now = time.monotonic()
        for connection in list(self.connections):
            begin_draining(connection, now)
        if not self._moving:
            for connection in list(self.connections):
                _close_after_response(connection)

    def _close_listeners(self) -> None:
        if self._listeners_closed:
            return
        self._listeners_closed = True
        for server in self.server.servers:
            server.close()
        for sock in self.sockets:  # an event loop may have used a duplicate
            sock.close()

    async def drain(self, deadline: float, websocket_code: int = SERVICE_RESTART, movers: list[Handover] | None = None,
                    arriving: Callable[[], bool] | None = None) -> tuple[int, int]:
        """Finish what clients started until done or `deadline` (monotonic).

        After `stop_accepting(moving=True)`, with `movers` (channels to the
        new generation), every keep-alive connection is handed over the moment
        it is idle: busy ones finish here first, and nobody is told
        `Connection: close`. One that can't move (see `movable`), or that the
        new generation did not take, falls back to the lame-duck drain: served
        here, each response with `Connection: close`, closed once idle for
        `idle_grace`. Without movers, every connection drains lame-duck style.
        Counts land in `handed_over` and `fell_back`. While `arriving()` says
        the previous generation may still hand us connections (it is draining
        too), the drain goes on even when empty.

        WebSockets are closed with `websocket_code` (1012 at a reload, 1001 at a stop), each at its moment
        in the spread window. Returns (requests served while draining, requests and WebSockets cut at the
        deadline).
        """
        served_before = self.total_requests
        closer = IdleCloser(self.idle_grace)
        spread = capped_spread(self.websocket_close_spread, deadline - time.monotonic())
        websockets = WebSocketCloser(websocket_code, spread)
        movers = list(movers or ())
        moving = self._moving
        nowhere = "the new generation does not adopt connections"
        state = self.server.server_state
        wakeup = asyncio.Event()
        state.wake_drain = wakeup.set
        state.hold_idle = bool(movers)  # each response's end holds its connection for the next batch

        acceptor = self.acceptor

        def done() -> bool:  # every connection gone, every handler finished (a WebSocket's may outlive it)
            return (not self.connections and not state.tasks and not (arriving and arriving())
                    and not (acceptor is not None and acceptor.pending))

        # Connections the event loop accepted just before we stopped are registered a few loop turns later: our
        # copies of the listeners close, and the drain may end, only a tick from now. A worker's own accept loop
        # (see balanced_accept) counts what it accepted and has not set up yet, and wakes us as each is: then
        # nothing arrives unseen and the drain ends as soon as nothing is left (an old worker of a rollout
        # waited the tick out, idle, before the next new worker could start: twice per reload with two
        # workers). Idle connections move at once (the sooner they all have, the shorter both generations
        # compete for the CPUs).
        settles_at = time.monotonic() + (0.0 if acceptor is not None else DRAIN_TICK)
        if acceptor is not None:
            acceptor.on_set_up = wakeup.set
        try:
            while time.monotonic() < deadline:
                # Cleared before looking, not before waiting: a response that completes while a batch is in
                # flight (the round trip to the new generation) holds its connection and wakes us; cleared
                # after the batch, that wake-up was lost and the held connections waited for the tick
                # (up to 50 ms for most of the load's connections, at most reloads).
                wakeup.clear()
                settled = time.monotonic() >= settles_at
                if settled:
                    self._close_listeners()
                    if done():
                        break
                more = False
                if movers:
                    movers, more = await self._hand_over_idle(movers)
                    nowhere = "the new generation's channel closed"
                    state.hold_idle = bool(movers)
                elif moving:  # nobody (left) to move them to: what is here drains here
                    self.fall_back_all(nowhere)
                now = time.monotonic()
                for connection in list(self.connections):  # those accepted just before we stopped, adopted ones
                    begin_draining(connection, now)
                by_key = {id(c): c for c in self.connections}
                upgraded = [c for c in by_key.values() if is_websocket(c)]
                for ws in upgraded:
                    if getattr(ws, "graceful_http_seen_at", None) is None:
                        ws.graceful_http_seen_at = now
                websockets.schedule(upgraded)
                views = [ConnectionView(key, _busy(c), getattr(c, "last_data_at", 0.0))
                         for key, c in by_key.items()
                         if not is_websocket(c) and (not moving or getattr(c, "lame_duck", False))]
                for key in closer.due(views, now):
                    if self.idle_keeper is None or not self.idle_keeper(by_key[key]):
                        by_key[key].transport.close()
                if settled and done():
                    break
                if more:  # idle connections left behind by a full batch: the next batch at once
                    continue
                try:
                    await asyncio.wait_for(wakeup.wait(), DRAIN_TICK if settled else max(0.0, settles_at - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        finally:
            state.wake_drain = None
            state.hold_idle = False
            if acceptor is not None:
                acceptor.on_set_up = None
            self._close_listeners()  # a deadline shorter than the tick
        websockets.cancel()
        cut = self.in_flight()
        if self.descriptors is not None:
            self.descriptors.stop()
        now = time.monotonic()
        for connection in list(self.connections):
            if (moving and not is_websocket(connection) and not getattr(connection, "lame_duck", False)
                    and not connection.transport.is_closing()):
                self.fell_back += 1  # neither moved nor drained here in time
            if _busy(connection) or is_websocket(connection):
                log.warning("graceful timeout: cut %s", describe_cut(connection, now))
            if is_websocket(connection) and begin_close(connection, GOING_AWAY, "server shutdown"):
                connection.transport.close()  # after the close frame, which abort() would discard
                continue
            connection.transport.abort()
        tasks = list(self.server.server_state.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        return self.total_requests - served_before, cut

    async def shutdown_app(self) -> None:
        """The app's lifespan shutdown (after the last request)."""
        if self._ticker is not None:
            self._ticker.cancel()
        await self.server.lifespan.shutdown()

    # ---- connection handover -------------------------------------------------------------------

    @staticmethod
    def movable(connection) -> tuple[Verdict, str]:
        """May `connection` move to another process now? (verdict, why)."""
        return judge(connection_state(connection))

    def detach(self, connection) -> int | None:
        """Let go of an idle connection without closing it: return a duplicate of its descriptor, or
        None if it is not movable now (see `movable`).

        Reading stops first, then the duplicate is made and our transport
        aborted: the kernel keeps the connection open (no FIN, no RST) while
        any descriptor refers to it, and whatever the client sends from now on
        waits in the kernel for whoever adopts the descriptor.
        """
        if self.movable(connection)[0] is not Verdict.MOVE:
            return None
        transport = connection.transport
        transport.pause_reading()
        fd = os.dup(transport.get_extra_info("socket").fileno())
        connection.quiesce()
        self.connections.discard(connection)
        transport.abort()
        return fd

    async def adopt(self, sock: socket.socket, lame_duck: bool = False):
        """Serve a connection another process detached, exactly as if we had accepted it: same protocol,
        counted in `connections` (draining, stats and head limits apply). Bytes the client sent while
        it was in flight are read at once. Returns the protocol; takes ownership of `sock`.
        `lame_duck`: it is being taken back by a draining engine, which closes it after each response."""
        sock.setblocking(False)
        try:
            _, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._adopted_protocol(lame_duck), sock=sock)
        except BaseException:
            sock.close()
            raise
        if not lame_duck:
            self.adopted += 1
        return protocol

    def serve_accepted(self, sock: socket.socket, created: Callable[[object], None]) -> asyncio.Future:
        """Serve a connection our own accept loop took, as uvicorn's server would have (`created(protocol)` as
        its protocol is made); done once set up."""
        def protocol():
            made = self._protocol()
            created(made)
            return made
        return asyncio.ensure_future(asyncio.get_running_loop().connect_accepted_socket(
            protocol, sock=sock, ssl=self.server.config.ssl))

    def _protocol(self, adopted: bool = False):
        """A new connection's protocol, as uvicorn's server makes it (of the protocol's `adopted_class` for a
        connection taken from another process)."""
        if self._protocol_factory is None:
            config = self.server.config
            protocol_class = config.http_protocol_class
            arguments = {"config": config, "server_state": self.server.server_state}
            if _takes_app_state(protocol_class):  # newer uvicorn
                arguments["app_state"] = self.server.lifespan.state
            self._protocol_factory = functools.partial(protocol_class, **arguments)
        factory = self._protocol_factory
        if adopted:
            return factory.func.adopted_class(*factory.args, **factory.keywords)
        return factory()

    def _adopted_protocol(self, lame_duck: bool):
        protocol = self._protocol(adopted=True)
        if lame_duck:  # (an attribute set only when needed: see Tracked on the instance's attributes)
            protocol.lame_duck = True
        return protocol

    async def _hand_over_idle(self, movers: list[Handover]) -> tuple[list[Handover], bool]:
        """Detach idle connections (at most `HANDOVER_BATCH`) and send them to the `movers` serving fewest; serve here
        (lame duck) what can never move or was not taken. Returns the movers still usable, and whether idle
        connections were left for the next batch.

        At most a batch at a time: under load every connection is idle for a moment at each loop turn, and all of
        them at once would wait, each with its client's next request, until the new generation has adopted
        them all; the others are served here meanwhile and move with the next batches. But each batch is a
        round trip through both loops (5–7 ms under load), through which both generations serve side by
        side: batches of 10 took 50 busy connections five of them. Interleaved A/B (`bench.reload_ab`, one
        worker, 8 pairs, twice), 10 → 64: p99 after ÷ steady, median 1.41× → 1.30× and 1.48× → 1.34×, slow
        requests per reload 355 → 310 and 401 → 260; two workers (25 connections each) unchanged."""
        batch = []
        more = False
        for connection in list(self.connections):
            if is_websocket(connection) or getattr(connection, "lame_duck", False):
                continue  # WebSockets drain their own way (see websocket_drain)
            verdict, why = self.movable(connection)
            if verdict is Verdict.MOVE:
                if len(batch) < HANDOVER_BATCH:
                    batch.append(self.detach(connection))
                else:
                    more = True
            elif verdict is Verdict.NEVER:
                self._fall_back(connection, why)
        if not batch:
            return movers, more
        groups, start = [], 0
        for share in fill_emptiest(len(batch), [mover.serving for mover in movers]):
            groups.append(batch[start:start + share])
            start += share
        sent = [(mover, group) for mover, group in zip(movers, groups) if group]
        taken = await asyncio.gather(*(mover.send(group) for mover, group in sent))
        for (_mover, group), count in zip(sent, taken):
            self.handed_over += count
            for fd in group[count:]:
                log.debug("connection handover: the new generation did not take a connection; it drains here")
                self.fell_back += 1
                try:
                    await self.adopt(socket.socket(fileno=fd), lame_duck=True)
                except OSError as exc:  # the client went away meanwhile
                    log.debug("connection handover: could not take a connection back: %s", exc)
        return [mover for mover in movers if mover.usable], more

    def fall_back_all(self, why: str) -> None:
        """Drain every connection here, lame-duck style: they can't move (`why`)."""
        for connection in list(self.connections):
            if not is_websocket(connection):
                self._fall_back(connection, why)

    def _fall_back(self, connection, why: str) -> None:
        if getattr(connection, "lame_duck", False):
            return
        release_held(connection)
        connection.lame_duck = True
        if connection.transport.is_closing():  # the client hung up (or we closed it): gone, not fallen back
            return
        self.fell_back += 1
        log.debug("connection handover: %s stays and drains here: %s", _peer(getattr(connection, "client", None)), why)
        _close_after_response(connection)
