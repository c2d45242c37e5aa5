"""The control layer: `/graceful` and `/healthz`, served before the app on every listener.

It also does the per-request work of a draining generation (`Connection:
close` on every response, so clients move to the new generation) and the
access log. Requests that need neither pass straight to the app: the hot
path costs one call and no coroutine of its own.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from graceful_http.generation import Outcome
from graceful_http.settings import IPNetwork

log = logging.getLogger("graceful_http")

CONNECTION_CLOSE = (b"connection", b"close")


@dataclass
class ControlState:
    """What the supervisor shares with the control layer."""

    request_reload: Callable[[str], Outcome | Awaitable[Outcome]]
    accepting: bool = True  # False once this generation drains or stops
    connections_move: bool = False  # draining hands connections over: no `Connection: close` (the engine
    # says it itself on each connection that can't move)
    failed: int = 0  # requests answered 5xx or whose app raised (counted with `observe_all`, for a canary)


@dataclass(frozen=True)
class ControlPolicy:
    """Who may POST /graceful on a listener.

    The rule: a peer address is never a credential by itself. Behind a
    reverse proxy on the same host (nginx, HAProxy, a sidecar) every request
    arrives from loopback, or over a unix socket, whoever sent it, and
    forwarding headers are whatever the client or proxy wrote. So:

    - `trusted` (the admins' unix control socket, guarded by its file mode):
      always.
    - With a token configured: the request must carry it, from wherever it
      comes. This is the way through a proxy.
    - Without a token: only if the admin named networks with `allow`, the TCP
      peer is in one of them and the request carries no forwarding header (a
      proxied request says nothing about who sent it). Unix-socket peers have
      no address to match. By default `allow` is empty: refused.
    - When a control socket exists (the shipped units) and no token is
      configured, public listeners refuse: the control socket is the way in.

    Local admins always have SIGHUP and `graceful-http reload`.
    """

    allow: tuple[IPNetwork, ...] = ()
    token: str | None = None
    control_socket_elsewhere: bool = False
    trusted: bool = False

    def refusal(self, scope) -> str | None:
        """Why this request may not reload, or None if it may."""
        if self.trusted:
            return None
        client = scope.get("client")
        if self.token is not None:
            if not token_matches(scope, self.token):
                return "reload needs the control token (Authorization: Bearer <token>)"
            return None
        if self.control_socket_elsewhere:
            return "reloads are accepted on the control socket only (or configure a control token)"
        if not self.allow:
            return ("POST /graceful on a public listener needs the control token (control_token_file) or"
                    " --control-allow; from this host, use SIGHUP or `graceful-http reload`")
        if client is None:
            return "reload over a unix-socket listener needs the control token (control_token_file)"
        if not peer_allowed(client, self.allow):
            return f"reload not allowed from {describe_peer(client)}"
        if forwarding_chain(scope):
            return "a proxied request (it carries forwarding headers) may not reload without the control token"
        return None


# Headers by which proxies say who the client was. Their presence marks a request as proxied; their
# values prove nothing (any client can send them).
FORWARDING_HEADERS = frozenset({
    b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-proto",
    b"x-forwarded-server", b"x-client-ip", b"true-client-ip", b"cf-connecting-ip", b"x-cluster-client-ip",
    b"fastly-client-ip", b"client-ip", b"via",
})


def forwarding_chain(scope) -> str:
    """The request's forwarding headers as one line (`name: value; …`), empty if there are none."""
    found = [f"{name.decode('latin-1')}: {value.decode('latin-1')}"
             for name, value in scope.get("headers", ()) if name in FORWARDING_HEADERS]
    return "; ".join(found)


def describe_peer(client) -> str:
    return client[0] if client else "a unix-socket peer"


def token_matches(scope, token: str) -> bool:
    """Compare the bearer token in constant time."""
    from hmac import compare_digest  # only with a token: hmac brings OpenSSL, which a start need not load

    expected = b"bearer " + token.encode()
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return compare_digest(scheme.lower() + b" " + given.strip(), expected)
    return False


async def not_found(scope, receive, send):
    """The app behind the control socket: nothing but the control endpoints."""
    if scope["type"] == "http":
        await _plain(send, 404, "the control socket serves /graceful and /healthz only\n")


def peer_allowed(client: tuple[str, int] | None, allow: tuple[IPNetwork, ...]) -> bool:
    """Is this IP peer in one of the networks? Unix-socket peers (no address) are in none."""
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        mapped = address.ipv4_mapped
        if any(mapped in network for network in allow if network.version == 4):
            return True
    return any(address in network for network in allow if network.version == address.version)


async def _plain(send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body})


_OUTCOME_STATUS = {"started": 202, "refused": 409, "failed": 409, "done": 200}
HTTP_VERSIONS = ("1.0", "1.1")


def framed_twice(headers) -> bool:
    """Content-Length and Transfer-Encoding both: answer (if at all), then close (RFC 9112, 6.1)."""
    names = {name for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


class ControlLayer:
    """The control endpoints, then the app. A request it has nothing to do for (not a control path, an
    HTTP version the app may see, no access log, metrics or failure counting, not draining) costs one call
    that hands back the app's own coroutine: no coroutine layer of its own on the hot path.

    `check_framing`: refuse-or-close requests framed twice (Content-Length and Transfer-Encoding); off
    when the HTTP parser refuses them itself (httptools' llhttp does, h11 does not).
    `observe_all`: every request's status is seen (to count failures, for a canary), even with nothing to log.
    """

    def __init__(self, app, state: ControlState, policy: ControlPolicy, access_logger=None, metrics=None,
                 observe_all: bool = False, check_framing: bool = True):
        self.app = app
        self.state = state
        self.policy = policy
        self.access_logger = access_logger
        self.metrics = metrics
        self.check_framing = check_framing
        self._plain_path = access_logger is None and metrics is None and not observe_all
        self._straight = self._plain_path and not check_framing  # what is left to check is the request's own

    def __call__(self, scope, receive, send):  # for callers holding the layer itself: the server calls `entry()`
        return self.entry()(scope, receive, send)

    def entry(self):
        """What the HTTP server calls for each request (and the lifespan). When all a request may need from
        this layer is a look at its path and HTTP version, that is a plain function whose names are its
        own (no attribute lookups, no bound method) and that hands back the app's own coroutine: the hot
        path costs one call and two string comparisons."""
        if not self._straight:
            return self._dispatch
        app, state, dispatch = self.app, self.state, self._dispatch

        def straight(scope, receive, send):
            if state.accepting:
                try:  # (free in Python 3.11 unless raised: a lifespan scope has no path)
                    path, version = scope["path"], scope["http_version"]
                except KeyError:
                    return dispatch(scope, receive, send)
                # Each comparison in an `if` of its own: Python 3.11 specialises a string comparison only
                # when a jump follows it (and comparing is cheaper than hashing a new string for a set).
                if version == "1.1" or version == "1.0":
                    if path != "/graceful" and path != "/healthz" and path != "/metrics":
                        return app(scope, receive, send)  # a WebSocket too: nothing to do for it without metrics
            return dispatch(scope, receive, send)

        return straight

    async def _dispatch(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.metrics is not None:
                return await self._websocket(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("http_version", "1.1") not in HTTP_VERSIONS:  # h11 takes any HTTP/d.d for 1.1
            return await _plain(send, 505, "HTTP/1.0 and HTTP/1.1 only\n", [CONNECTION_CLOSE])
        close = self.check_framing and framed_twice(scope["headers"])
        path = scope["path"]
        if path == "/graceful":
            endpoint = self._graceful
        elif path == "/healthz":
            endpoint = self._healthz
        elif path == "/metrics" and self.metrics is not None:
            endpoint = self._metrics
        elif self.state.accepting and self._plain_path and not close:
            return await self.app(scope, receive, send)
        else:
            endpoint = self.app
        return await self._observed(endpoint, scope, receive, send, close)

    async def _websocket(self, scope, receive, send):
        self.metrics.websockets.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.websockets.dec()

    async def _graceful(self, scope, receive, send):
        if scope["method"] != "POST":
            return await _plain(send, 405, "use POST /graceful to start a reload\n", [(b"allow", b"POST")])
        refusal = self.policy.refusal(scope)
        if refusal is not None:
            chain = forwarding_chain(scope)
            log.warning("refused POST /graceful from %s%s: %s", describe_peer(scope.get("client")),
                        f" (forwarded: {chain[:200]})" if chain else "", refusal)
            return await _plain(send, 403, f"{refusal}\n")
        client = scope.get("client")
        who = f"POST /graceful from {client[0] if client else 'the control socket'}"
        outcome = self.state.request_reload(who)
        if inspect.isawaitable(outcome):  # a worker asks its main
            outcome = await outcome
        return await _plain(send, _OUTCOME_STATUS[outcome.code], f"{outcome.code}: {outcome.detail}\n")

    async def _healthz(self, scope, receive, send):
        if scope["method"] not in ("GET", "HEAD"):
            return await _plain(send, 405, "use GET /healthz\n", [(b"allow", b"GET, HEAD")])
        if self.state.accepting:
            return await _plain(send, 200, "ok\n")
        return await _plain(send, 503, "draining\n")  # _observed adds Connection: close

    async def _metrics(self, scope, receive, send):
        if scope["method"] not in ("GET", "HEAD"):
            return await _plain(send, 405, "use GET /metrics\n", [(b"allow", b"GET, HEAD")])
        body, content_type = self.metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _observed(self, endpoint, scope, receive, send, close: bool = False):
        """`endpoint`, with `Connection: close` while draining (or when `close`) and/or an access-log line."""
        state = self.state
        started = time.perf_counter()
        status = None

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if close or not (state.accepting or state.connections_move):  # decided at the response's start
                    message = {**message, "headers": [*message.get("headers", ()), CONNECTION_CLOSE]}
            await send(message)

        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        try:
            await endpoint(scope, receive, observed_send)
        finally:
            duration = time.perf_counter() - started
            if status is None or status >= 500:
                state.failed += 1
            if metrics is not None:
                metrics.in_flight.dec()
                metrics.observe(status, duration)
            if self.access_logger is not None:
                self.access_logger(scope, status, duration)
