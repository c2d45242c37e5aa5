"""`control.ControlLayer` driven as a plain ASGI app: no server, fake receive/send."""

from __future__ import annotations

import asyncio

import pytest

from graceful_http.control import ControlLayer, ControlPolicy, ControlState, not_found, token_matches
from graceful_http.generation import Outcome
from graceful_http.settings import parse_network

LOOPBACK = tuple(parse_network(n) for n in ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"))
CONNECTION_CLOSE = (b"connection", b"close")


def http_scope(method="GET", path="/", client=("127.0.0.1", 50000), headers=()):
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), *headers], "client": client, "server": ("127.0.0.1", 9999),
    }


class Response:
    def __init__(self, messages):
        self.messages = messages
        start = messages[0]
        assert start["type"] == "http.response.start", messages
        self.status = start["status"]
        self.headers = list(start.get("headers", []))
        self.body = b"".join(m.get("body", b"") for m in messages[1:] if m["type"] == "http.response.body")

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


def call(layer, scope) -> Response:
    sent = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop(0)
        await asyncio.sleep(3600)  # a real server would wait for the disconnect

    async def send(message):
        sent.append(message)

    asyncio.run(layer(scope, receive, send))
    return Response(sent)


class FakeApp:
    """Answers 200 with its own header; records that it was called."""

    def __init__(self, status=200, raises=None):
        self.calls = []
        self.status = status
        self.raises = raises

    async def __call__(self, scope, receive, send):
        self.calls.append(scope)
        if self.raises is not None:
            raise self.raises
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"text/plain"), (b"x-app", b"yes")]})
        await send({"type": "http.response.body", "body": b"from the app\n"})


class Reloads:
    """A request_reload that answers a fixed outcome and records its callers."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.sources = []

    def __call__(self, source):
        self.sources.append(source)
        return self.outcome


def make(outcome=Outcome("started", "reloading: starting pid 4321", 4321), allow=LOOPBACK, access_logger=None,
         app=None, policy=None):
    reloads = Reloads(outcome)
    state = ControlState(request_reload=reloads)
    app = app or FakeApp()
    return ControlLayer(app, state, policy or ControlPolicy(allow=allow), access_logger), state, reloads, app


# ---- /graceful ------------------------------------------------------------------


def test_post_graceful_started_is_202():
    layer, _, reloads, app = make(Outcome("started", "reloading: starting pid 4321", 4321))
    response = call(layer, http_scope("POST", "/graceful"))
    assert response.status == 202
    assert response.body == b"started: reloading: starting pid 4321\n"
    assert response.header(b"content-length") == [str(len(response.body)).encode()]
    assert reloads.sources == ["POST /graceful from 127.0.0.1"]
    assert app.calls == []


@pytest.mark.parametrize("outcome, status", [
    (Outcome("refused", "reload already in progress", 4321), 409),
    (Outcome("failed", "cannot start the new generation: out of memory", 1), 409),
    (Outcome("done", "generation 2 (pid 5) is serving", 5), 200),
])
def test_post_graceful_other_outcomes(outcome, status):
    layer, _, reloads, _ = make(outcome)
    response = call(layer, http_scope("POST", "/graceful"))
    assert response.status == status
    assert response.body == f"{outcome.code}: {outcome.detail}\n".encode()
    assert len(reloads.sources) == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_graceful_needs_post(method):
    layer, _, reloads, app = make()
    response = call(layer, http_scope(method, "/graceful"))
    assert response.status == 405
    assert response.header(b"allow") == [b"POST"]
    assert reloads.sources == []
    assert app.calls == []


def test_post_graceful_from_a_foreign_network_is_403():
    layer, _, reloads, app = make()
    response = call(layer, http_scope("POST", "/graceful", client=("10.0.0.1", 40000)))
    assert response.status == 403
    assert response.body == b"reload not allowed from 10.0.0.1\n"
    assert reloads.sources == []
    assert app.calls == []


def test_post_graceful_allowed_once_the_network_is_added():
    layer, _, reloads, _ = make(allow=LOOPBACK + (parse_network("10.0.0.0/8"),))
    response = call(layer, http_scope("POST", "/graceful", client=("10.0.0.1", 40000)))
    assert response.status == 202
    assert reloads.sources == ["POST /graceful from 10.0.0.1"]
    assert call(layer, http_scope("POST", "/graceful", client=("11.0.0.1", 1))).status == 403


@pytest.mark.parametrize("client", [("::1", 1), ("::ffff:127.0.0.1", 1), ("127.0.0.2", 1)])
def test_post_graceful_from_loopback_variants(client):
    layer, _, reloads, _ = make()
    assert call(layer, http_scope("POST", "/graceful", client=client)).status == 202
    assert reloads.sources == [f"POST /graceful from {client[0]}"]


def test_post_graceful_over_a_public_unix_socket_needs_the_token():
    layer, _, reloads, _ = make()
    response = call(layer, http_scope("POST", "/graceful", client=None))
    assert response.status == 403
    assert response.body == b"reload over a unix-socket listener needs the control token (control_token_file)\n"
    assert reloads.sources == []
    layer, _, reloads, _ = make(policy=ControlPolicy(token=TOKEN))
    assert call(layer, http_scope("POST", "/graceful", client=None, headers=bearer(f"Bearer {TOKEN}"))).status == 202
    assert reloads.sources == ["POST /graceful from the control socket"]


def test_graceful_is_answered_even_while_draining():
    layer, state, reloads, _ = make(Outcome("refused", "this generation (pid 9) has handed over and is draining", 9))
    state.accepting = False
    response = call(layer, http_scope("POST", "/graceful"))
    assert response.status == 409
    assert b"has handed over and is draining" in response.body
    assert response.header(b"connection") == [b"close"]


# ---- who may reload: ControlPolicy ------------------------------------------------------

TOKEN = "0123456789abcdef-token"


def bearer(value: str) -> tuple:
    return ((b"authorization", value.encode()),)


@pytest.mark.parametrize("headers, allowed", [
    ((), False),
    (bearer(f"Bearer {TOKEN}"), True),
    (bearer(f"bearer {TOKEN}"), True),  # the scheme is case-insensitive
    (bearer(f"Bearer  {TOKEN} "), True),
    (bearer(f"Bearer {TOKEN}x"), False),
    (bearer(f"Basic {TOKEN}"), False),
    (bearer("Bearer"), False),
    (bearer(TOKEN), False),
])
def test_token_required_when_configured(headers, allowed):
    layer, _, reloads, _ = make(policy=ControlPolicy(token=TOKEN))
    response = call(layer, http_scope("POST", "/graceful", headers=headers))
    if allowed:
        assert response.status == 202
        assert len(reloads.sources) == 1
    else:
        assert response.status == 403
        assert response.body == b"reload needs the control token (Authorization: Bearer <token>)\n"
        assert reloads.sources == []


def test_with_a_token_configured_the_token_alone_decides():
    """`allow` is who may reload without a token; with one configured, every reload needs it."""
    layer, _, reloads, _ = make(policy=ControlPolicy(allow=LOOPBACK, token=TOKEN))
    response = call(layer, http_scope("POST", "/graceful"))
    assert response.status == 403
    assert response.body == b"reload needs the control token (Authorization: Bearer <token>)\n"
    response = call(layer, http_scope("POST", "/graceful", client=("10.0.0.1", 1), headers=bearer(f"Bearer {TOKEN}")))
    assert response.status == 202
    assert reloads.sources == ["POST /graceful from 10.0.0.1"]


def test_public_listener_refuses_reloads_when_a_control_socket_exists_and_no_token():
    layer, _, reloads, _ = make(policy=ControlPolicy(allow=LOOPBACK, control_socket_elsewhere=True))
    response = call(layer, http_scope("POST", "/graceful"))
    assert response.status == 403
    assert response.body == b"reloads are accepted on the control socket only (or configure a control token)\n"
    assert reloads.sources == []
    layer, _, reloads, _ = make(policy=ControlPolicy(allow=LOOPBACK, token=TOKEN, control_socket_elsewhere=True))
    assert call(layer, http_scope("POST", "/graceful", headers=bearer(f"Bearer {TOKEN}"))).status == 202


def test_trusted_control_socket_reloads_without_further_checks():
    layer, _, reloads, _ = make(app=not_found, policy=ControlPolicy(trusted=True, token=TOKEN))
    assert call(layer, http_scope("POST", "/graceful", client=None)).status == 202
    assert reloads.sources == ["POST /graceful from the control socket"]
    response = call(layer, http_scope("GET", "/"))
    assert response.status == 404
    assert call(layer, http_scope("GET", "/healthz", client=None)).status == 200


def test_token_matches_only_the_first_authorization_header():
    scope = http_scope(headers=bearer("Bearer wrong") + bearer(f"Bearer {TOKEN}"))
    assert not token_matches(scope, TOKEN)
    assert token_matches(http_scope(headers=bearer(f"Bearer {TOKEN}")), TOKEN)


# ---- /healthz -------------------------------------------------------------------


def test_healthz_ok_then_503_when_draining():
    layer, state, _, app = make()
    response = call(layer, http_scope("GET", "/healthz"))
    assert (response.status, response.body) == (200, b"ok\n")
    assert response.header(b"connection") == []

    state.accepting = False
    response = call(layer, http_scope("GET", "/healthz"))
    assert (response.status, response.body) == (503, b"draining\n")
    assert response.header(b"connection") == [b"close"]
    assert app.calls == []


def test_healthz_head_and_wrong_method():
    layer, _, _, _ = make()
    assert call(layer, http_scope("HEAD", "/healthz")).status == 200
    response = call(layer, http_scope("POST", "/healthz"))
    assert response.status == 405
    assert response.header(b"allow") == [b"GET, HEAD"]


# ---- the app behind it -------------------------------------------------------------


def test_app_passes_through_untouched_while_accepting():
    layer, _, reloads, app = make()
    response = call(layer, http_scope("GET", "/anything"))
    assert response.status == 200
    assert response.body == b"from the app\n"
    assert response.headers == [(b"content-type", b"text/plain"), (b"x-app", b"yes")]
    assert [scope["path"] for scope in app.calls] == ["/anything"]
    assert reloads.sources == []


def test_app_responses_get_connection_close_while_not_accepting():
    layer, state, _, app = make()
    state.accepting = False
    response = call(layer, http_scope("GET", "/"))
    assert response.status == 200
    assert response.body == b"from the app\n"
    assert response.headers == [(b"content-type", b"text/plain"), (b"x-app", b"yes"), CONNECTION_CLOSE]
    assert len(app.calls) == 1


def test_graceful_prefix_paths_go_to_the_app():
    layer, _, reloads, app = make()
    assert call(layer, http_scope("POST", "/graceful/")).body == b"from the app\n"
    assert call(layer, http_scope("GET", "/healthz2")).body == b"from the app\n"
    assert reloads.sources == [] and len(app.calls) == 2


def test_non_http_scopes_go_to_the_app():
    app = FakeApp()
    layer, _, _, _ = make(app=app)
    received = []

    async def run():
        async def inner(scope, receive, send):
            received.append(scope["type"])
        layer.app = inner
        await layer({"type": "lifespan"}, None, None)
        await layer({"type": "websocket", "path": "/graceful"}, None, None)

    asyncio.run(run())
    assert received == ["lifespan", "websocket"]


# ---- access log --------------------------------------------------------------------


def test_access_logger_gets_status_and_duration():
    lines = []
    layer, _, _, _ = make(access_logger=lambda scope, status, duration: lines.append((scope["path"], status, duration)),
                          app=FakeApp(status=201))
    response = call(layer, http_scope("GET", "/created"))
    assert response.status == 201
    assert response.header(b"connection") == []  # logging alone does not close connections
    assert len(lines) == 1
    path, status, duration = lines[0]
    assert (path, status) == ("/created", 201)
    assert 0 <= duration < 5


def test_access_logger_and_connection_close_together():
    lines = []
    layer, state, _, _ = make(access_logger=lambda scope, status, duration: lines.append(status))
    state.accepting = False
    response = call(layer, http_scope("GET", "/"))
    assert response.header(b"connection") == [b"close"]
    assert lines == [200]


def test_access_logger_called_when_the_app_raises():
    lines = []
    layer, _, _, _ = make(access_logger=lambda scope, status, duration: lines.append((status, duration)),
                          app=FakeApp(raises=RuntimeError("app bug")))
    with pytest.raises(RuntimeError, match="app bug"):
        asyncio.run(layer(http_scope("GET", "/"), None, None))
    assert len(lines) == 1 and lines[0][0] is None


def test_duration_covers_the_app():
    lines = []

    async def slow(scope, receive, send):
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    layer, _, _, _ = make(access_logger=lambda scope, status, duration: lines.append(duration), app=slow)
    call(layer, http_scope("GET", "/"))
    assert 0.05 <= lines[0] < 5


# ---- the rule against reloads through a same-host proxy ----------------------------------------

NOT_BY_DEFAULT = (b"POST /graceful on a public listener needs the control token (control_token_file) or"
                  b" --control-allow; from this host, use SIGHUP or `graceful-http reload`\n")


@pytest.mark.parametrize("client", [("127.0.0.1", 1), ("::1", 1), ("::ffff:127.0.0.1", 1), ("10.0.0.1", 1)])
def test_by_default_no_peer_address_may_reload(client):
    """Behind a same-host proxy every request comes from loopback: loopback is no credential."""
    layer, _, reloads, _ = make(policy=ControlPolicy())
    response = call(layer, http_scope("POST", "/graceful", client=client))
    assert response.status == 403
    assert response.body == NOT_BY_DEFAULT
    assert reloads.sources == []


FORWARDED = {
    "nginx $proxy_add_x_forwarded_for": (b"x-forwarded-for", b"203.0.113.9"),
    "a spoofed X-Forwarded-For": (b"x-forwarded-for", b"127.0.0.1"),
    "X-Real-IP": (b"x-real-ip", b"127.0.0.1"),
    "RFC 7239 Forwarded": (b"forwarded", b"for=127.0.0.1;proto=http"),
    "Via": (b"via", b"1.1 proxy"),
    "X-Forwarded-Proto only": (b"x-forwarded-proto", b"https"),
}


@pytest.mark.parametrize("header", list(FORWARDED.values()), ids=list(FORWARDED))
def test_explicitly_allowed_network_still_refuses_proxied_requests(header):
    layer, _, reloads, _ = make(policy=ControlPolicy(allow=LOOPBACK))
    response = call(layer, http_scope("POST", "/graceful", headers=(header,)))
    assert response.status == 403
    assert response.body == b"a proxied request (it carries forwarding headers) may not reload without the control token\n"
    assert reloads.sources == []
    assert call(layer, http_scope("POST", "/graceful")).status == 202  # the same peer, not proxied


@pytest.mark.parametrize("header", list(FORWARDED.values()), ids=list(FORWARDED))
def test_the_token_reloads_through_a_proxy(header):
    layer, _, reloads, _ = make(policy=ControlPolicy(token=TOKEN))
    response = call(layer, http_scope("POST", "/graceful", headers=(header, *bearer(f"Bearer {TOKEN}"))))
    assert response.status == 202
    assert len(reloads.sources) == 1


def test_a_refusal_is_logged_with_the_peer_and_the_forwarding_chain(caplog):
    layer, _, _, _ = make(policy=ControlPolicy())
    headers = ((b"x-forwarded-for", b"127.0.0.1, 203.0.113.9"), (b"x-real-ip", b"203.0.113.9"))
    with caplog.at_level("WARNING", logger="graceful_http"):
        assert call(layer, http_scope("POST", "/graceful", headers=headers)).status == 403
    [record] = [r for r in caplog.records if "refused POST /graceful" in r.getMessage()]
    assert record.getMessage() == (
        "refused POST /graceful from 127.0.0.1 (forwarded: x-forwarded-for: 127.0.0.1, 203.0.113.9;"
        " x-real-ip: 203.0.113.9): " + NOT_BY_DEFAULT.decode().rstrip("\n"))
