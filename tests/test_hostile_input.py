"""Hostile input: malformed HTTP, a fuzzer, the control surface, bad command lines and environments.

Everything here runs a real `python -m graceful_http serve` on this machine
(no systemd; PYTHONPATH=<checkout>/service), once per engine: "pypi" is the
venv's interpreter (the newest uvicorn from PyPI, httptools, uvloop),
"debian" is /usr/bin/python3 (Debian 12's python3-uvicorn 0.17.6, h11,
asyncio): the two HTTP parsers graceful-http can run on.

While a hostile client does its worst, a well-behaved one (support.load,
which never retries) keeps sending requests and must see every one answered.
`POST /graceful` relayed by a real reverse proxy (Debian's nginx) is tried
against graceful-http set up as the shipped units set it up: a public socket
named "http" and an admins' unix socket named "control" passed with
LISTEN_FDS.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import proxies
from harness.processes import alive, free_port
from support.load import Load, pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, clean_environ, installed_engine, run_cli, wait_until

TOKEN = "s3cret-token-for-tests-0123456789"

# How long a server may take to answer, or give up on, a malformed request.
QUICK = 3.0
# How long a connection that never completes its request head may be kept open.
HEAD_TIMEOUT_BOUND = 15.0
ONE_MIB = 1 << 20


# Tracebacks that uvicorn itself logs about clients' protocol errors (uvicorn 0.17.6 logs "Invalid HTTP request
# received." with one, and h11 can make a response to a request whose body turned out malformed fail): noise
# in the log, not a fault of graceful-http's.
PROTOCOL_ERRORS = re.compile(r"^(h11\._util\.(Remote|Local)ProtocolError|httptools\.parser\.errors\.\w+):", re.M)


def unexpected_tracebacks(log: str) -> list[str]:
    """The logged tracebacks (chains included) whose final exception is not a client's HTTP protocol error."""
    records = re.split(r"(?m)^(?=graceful-http\[\d+\] )", log)
    unexpected = []
    for record in records:
        if "Traceback (most recent call last):" not in record:
            continue
        endings = [line for line in record.splitlines()[1:]
                   if line and not line.startswith((" ", "Traceback", "During handling", "The above exception"))]
        if not endings or not PROTOCOL_ERRORS.match(endings[-1]):
            unexpected.append(record[:3000])
    return unexpected


@contextlib.contextmanager
def running(python: str, directory: Path, *args: str, **kwargs):
    """A server with a pid file of ours, serving; every generation of it killed at the end."""
    with ServeProcess(python, directory, *args, pid_file=True, **kwargs) as server:
        server.wait_serving(timeout=30)
        yield server


@pytest.fixture(params=list(ENGINES), scope="module")
def engine(request) -> str:
    installed_engine(request.param)
    return request.param


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """One server per engine for the malformed-HTTP tests: the demo app, and a control token (so that
    the fuzzer's `POST /graceful`s are refused rather than reloading it)."""
    directory = tmp_path_factory.mktemp(f"hostile-{engine}")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    with running(ENGINES[engine], directory, "--control-token-file", str(token_file)) as instance:
        yield instance
    assert unexpected_tracebacks(instance.log()) == []


# ---- raw HTTP ------------------------------------------------------------------------------------


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
            host: str = HOST, timeout: float = 10, source: str | None = None) -> tuple[int, bytes, dict]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@dataclass
class Exchange:
    data: bytes  # everything the server sent
    closed: bool  # the server closed the connection (EOF or reset)
    elapsed: float  # until it closed, or until we stopped waiting
    error: str = ""

    @property
    def status(self) -> int | None:
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.data)
        return int(match.group(1)) if match else None

    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", self.data)]


def exchange(port: int, payload: bytes, *, wait: float = 10, half_close: bool = False,
             pace: float = 0.0) -> Exchange:
    """Send `payload` (a byte every `pace` seconds, if set), then read until the server closes or `wait` passes."""
    sock = socket.create_connection((HOST, port), timeout=wait)
    started = time.monotonic()
    data = b""
    try:
        if pace:
            for index in range(len(payload)):
                sock.sendall(payload[index:index + 1])
                time.sleep(pace)
        else:
            sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        deadline = started + wait
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return Exchange(data, True, time.monotonic() - started)
            data += chunk
    except socket.timeout:
        return Exchange(data, False, time.monotonic() - started)
    except OSError as exc:  # a reset: closed too
        return Exchange(data, True, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()


def assert_refused_quickly(result: Exchange, bound: float = QUICK, allowed=(400, 405, 413, 414, 431, 501, 505)):
    """A 4xx (or 501/505) and a closed connection, or a closed connection without an answer, within `bound`."""
    assert result.data == b"" or result.status in allowed, f"answered {result.status}: {result.data[:300]!r}"
    assert result.closed, f"the connection is still open after {result.elapsed:.1f}s; got {result.data[:200]!r}"
    assert result.elapsed <= bound, f"took {result.elapsed:.1f}s (bound {bound}s): {result.data[:200]!r}"


@contextlib.contextmanager
def bystander(server: ServeProcess):
    """A well-behaved client for the length of the block: every one of its requests must be answered."""
    with Load(HOST, server.port, clients=2, pause=0.01) as load:
        load.wait_for_requests(20)
        yield load
        load.wait_for_requests(20)
    assert load.result.failures == [], load.result.summary()


def run_parallel(functions) -> list:
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda f: f(), functions))


# ---- malformed HTTP ----------------------------------------------------------------------------

GARBAGE = {
    "NUL and high bytes": b"\x00\xff\xfe\xfd garbage\r\n\r\n",
    "every byte value": bytes(range(256)) + b"\r\n\r\n",
    "a TLS ClientHello": bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\r\n\r\n",
    "no method": b" / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a control character in the method": b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a space in the target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "a header line without a colon": b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    "a space before the colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "a NUL in a header value": b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    "an empty header name": b"GET / HTTP/1.1\r\nHost: x\r\n: y\r\n\r\n",
}

VERSIONS = {
    "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "HTTP/2 connection preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "HTTP/3.0": b"GET / HTTP/3.0\r\nHost: x\r\n\r\n",
}

INVALID_CONTENT_LENGTH = {
    "not a number": b"Content-Length: abc\r\n",
    "negative": b"Content-Length: -1\r\n",
    "hexadecimal": b"Content-Length: 0x10\r\n",
    "two different values": b"Content-Length: 3\r\nContent-Length: 4\r\n",
    "a list of two values": b"Content-Length: 3, 4\r\n",
    "a sign": b"Content-Length: +3\r\n",
}


def post(headers: bytes, body: bytes = b"abcd") -> bytes:
    return b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_gets_400_or_a_closed_connection(server, name):
    with bystander(server):
        assert_refused_quickly(exchange(server.port, GARBAGE[name]))


@pytest.mark.parametrize("name", list(VERSIONS))
def test_other_http_versions_are_refused(server, name):
    """An HTTP version other than 1.0 and 1.1 is not answered as if it were 1.1 (505, 400 or closed)."""
    with bystander(server):
        assert_refused_quickly(exchange(server.port, VERSIONS[name]))


def test_oversized_request_line_is_refused(server):
    with bystander(server):
        assert_refused_quickly(exchange(server.port, b"GET /" + b"a" * ONE_MIB + b" HTTP/1.1\r\nHost: x\r\n\r\n"))


@pytest.mark.parametrize("shape", ["one huge header", "many headers"])
def test_oversized_request_head_is_refused(server, shape):
    """A request head of 1 MiB is refused (nginx's default limit is 32 KiB, h11's 16 KiB): a server that
    buffers any size of head can be made to hold a gigabyte per connection."""
    if shape == "one huge header":
        headers = b"X-Big: " + b"a" * ONE_MIB + b"\r\n"
    else:
        headers = b"".join(b"X-H%06d: v\r\n" % index for index in range(ONE_MIB // 13))
    with bystander(server):
        assert_refused_quickly(exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"))


@pytest.mark.parametrize("name", list(INVALID_CONTENT_LENGTH))
def test_invalid_content_length_is_refused(server, name):
    with bystander(server):
        assert_refused_quickly(exchange(server.port, post(INVALID_CONTENT_LENGTH[name])))


def test_a_malformed_request_is_logged_as_one_line(server):
    """A client's malformed request is the client's error: one log line, no traceback (uvicorn 0.17.6 logs
    its parser's traceback for each one, which would let any client fill the journal)."""
    before = len(server.log())
    with bystander(server):
        assert_refused_quickly(exchange(server.port, b"GARBAGE\r\n\r\n"))
    wait_until(lambda: "nvalid HTTP request received" in server.log()[before:], 10,
               "the malformed request to be logged", server.log_tail)
    logged = server.log()[before:]
    assert "Traceback" not in logged, logged


def test_content_length_with_chunked_closes_the_connection(server):
    """Content-Length and Transfer-Encoding together (request smuggling's tool): refused, or answered and
    the connection closed right after (RFC 9112, 6.1: the server MUST close it), never reused."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    payload = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\n" + smuggled)
    with bystander(server):
        result = exchange(server.port, payload)
        assert result.closed and result.elapsed <= QUICK, (result.elapsed, result.data[:300])
        assert len(result.statuses()) <= 1, result.data[:600]
        assert b"smuggled" not in result.data


def test_bad_chunked_body_is_refused(server):
    with bystander(server):
        assert_refused_quickly(exchange(server.port, post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nab\r\n0\r\n\r\n")))


def test_truncated_body_then_eof_closes_the_connection(server):
    """Fewer bytes than Content-Length, then the client's end of the connection closes."""
    with bystander(server):
        result = exchange(server.port, post(b"Content-Length: 100\r\n", b"abc"), half_close=True)
        assert result.closed and result.elapsed <= QUICK, (result.elapsed, result.data[:200])


def test_truncated_body_then_silence_is_answered_or_closed_in_bounded_time(server):
    """Fewer bytes than Content-Length, and nothing more: the demo app does not read bodies, so it answers;
    the connection, left with a body that never ends, is closed within the bound."""
    with bystander(server):
        result = exchange(server.port, post(b"Content-Length: 100\r\n", b"abc"), wait=HEAD_TIMEOUT_BOUND + 5)
        assert result.closed and result.elapsed <= HEAD_TIMEOUT_BOUND, (result.elapsed, result.data[:200])
        assert result.status in (None, 200, 400, 408, 413), result.data[:200]


def test_absurd_content_length_does_not_overflow(server):
    """A Content-Length beyond 64 bits is a number all the same: refused, or answered (the demo app does not
    read bodies) with the connection closed within the bound; never a 5xx or a crash."""
    with bystander(server):
        result = exchange(server.port, post(b"Content-Length: 99999999999999999999999999\r\n"),
                          wait=HEAD_TIMEOUT_BOUND + 5)
        assert result.closed and result.elapsed <= HEAD_TIMEOUT_BOUND, (result.elapsed, result.data[:200])
        assert result.status in (None, 200, 400, 413), result.data[:200]


def test_slow_but_complete_request_is_answered(server):
    """A client that sends its request a byte at a time (50 ms apart) is served like any other."""
    with bystander(server):
        result = exchange(server.port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", pace=0.05)
        assert result.status == 200 and b"path:/slow" in result.data, result.data[:300]


def trickle(port: int, seconds: float) -> Exchange:
    """Part of a request head, then one more byte a second (each byte cancels uvicorn's keep-alive timer)."""
    sock = socket.create_connection((HOST, port), timeout=5)
    started = time.monotonic()
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < seconds:
            sock.sendall(b"X")
            time.sleep(1)
            sock.setblocking(False)
            try:
                if sock.recv(4096) == b"":
                    return Exchange(b"", True, time.monotonic() - started)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        return Exchange(b"", False, time.monotonic() - started)
    except OSError as exc:
        return Exchange(b"", True, time.monotonic() - started, str(exc))
    finally:
        sock.close()


def test_a_request_head_that_never_ends_is_cut_in_bounded_time(server):
    """Slowloris: connections that never complete a request head must not be held forever (each holds an fd
    and memory; a few thousand take a server down). uvicorn's keep-alive timer only runs between requests.
    Three such clients at once: silent from the start, silent after part of a header, one byte a second."""
    wait = HEAD_TIMEOUT_BOUND + 5
    ways = {
        "silent from the start": lambda: exchange(server.port, b"", wait=wait),
        "silent after part of a header": lambda: exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Part",
                                                          wait=wait),
        "one byte a second": lambda: trickle(server.port, wait),
    }
    with bystander(server):
        results = dict(zip(ways, run_parallel(list(ways.values()))))
    late = {how: f"{r.elapsed:.1f}s" for how, r in results.items()
            if not (r.closed and r.elapsed <= HEAD_TIMEOUT_BOUND)}
    assert late == {}, f"still open after (bound {HEAD_TIMEOUT_BOUND:g}s): {late}"


def test_a_flood_of_bad_requests_leaves_the_service_serving(server):
    """500 malformed requests at once (16 at a time), with well-behaved clients alongside."""
    payloads = [*GARBAGE.values(), *(post(v) for v in INVALID_CONTENT_LENGTH.values())]
    with bystander(server):
        results = run_parallel([lambda p=payloads[i % len(payloads)]: exchange(server.port, p) for i in range(500)])
        for result in results:
            assert_refused_quickly(result, bound=10)
    assert server.popen.poll() is None


# ---- fuzzing ---------------------------------------------------------------------------------------

FUZZ_BATCH = 50
FUZZ_EXAMPLES = 200  # x 50 = 10,000 requests per engine

def mostly(valid: list[bytes], odd: list[bytes], wild: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a `valid` value (so requests get past the parser to the app), else an `odd` one or anything."""
    return st.integers(0, 7).flatmap(
        lambda n: st.sampled_from(valid) if n > 1 else st.sampled_from(odd) if n else wild)


METHODS = mostly([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"],
                 [b"CONNECT", b"TRACE", b"PRI", b"get", b"G ET", b"GET\x00"], st.binary(min_size=0, max_size=12))
TARGETS = mostly([b"/", b"/graceful", b"/healthz", b"/sleep?seconds=0", b"/sleep?seconds=-1", b"/sleep?seconds=nan",
                  b"/sleep?seconds=1e999", b"/%00", b"/%ff%fe", b"/../../etc/passwd", b"//graceful",
                  b"/graceful?x=1", b"/graceful/", b"/a?" + b"&" * 100, b"/metrics"],
                 [b"*", b"http://x/", b"", b"/\x7f", b"/\xff"],
                 st.binary(max_size=64) | st.text(max_size=40).map(lambda t: b"/" + t.encode("utf-8", "surrogatepass")))
VERSION = mostly([b"HTTP/1.1", b"HTTP/1.0"],
                 [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"HTTX/1.1", b"http/1.1", b"HTTP/1.1 x", b""],
                 st.binary(max_size=10))
HEADER_NAMES = mostly([b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Authorization",
                       b"Content-Type", b"Upgrade", b"X-Forwarded-For", b"Cookie", b"Range", b"Host"],
                      [b"", b"X Y", b"X:Y", b"\xff"], st.binary(min_size=0, max_size=20))
HEADER_VALUES = mostly([b"0", b"5", b"abc", b"chunked", b"close", b"keep-alive", b"100-continue",
                        b"Bearer " + TOKEN.encode(), b"Bearer wrong", b"websocket", b"h2c", b"bytes=0-1", b"x" * 300],
                       [b"-1", b"gzip, chunked", b"1, 2", b"\x00", b" "], st.binary(max_size=40))
NEWLINE = mostly([b"\r\n"], [b"\n", b"\r", b"\r\r\n", b"\n\r"], st.sampled_from([b"\r\n"]))


@st.composite
def raw_requests(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # sometimes: anything at all
        return draw(st.binary(max_size=300))
    newline = draw(NEWLINE)
    line = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSION)
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
    if draw(st.integers(0, 3)):
        headers.insert(0, (b"Host", b"x"))  # HTTP/1.1 requires it: usually give it, to get past the parser
    head = line + newline + b"".join(name + b": " + value + newline for name, value in headers) + newline
    return head + draw(st.binary(max_size=120))


def fuzz_one(port: int, payload: bytes) -> tuple[int | None, float, str]:
    """Send, close our side, read the answer: (first status or None, seconds, error)."""
    result = exchange(port, payload, wait=10, half_close=True)
    if not result.closed:
        return (result.status, result.elapsed, "still open")
    return (result.status, result.elapsed, "")


def test_fuzzed_requests_never_hurt_the_service(server):
    """10,000 generated requests (hypothesis), 16 connections at a time, a well-behaved client alongside."""
    seen: list[tuple[int | None, float, str]] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(raw_requests(), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
    def batch(payloads):
        results = run_parallel([lambda p=p: fuzz_one(server.port, p) for p in payloads])
        seen.extend(results)
        for (status, _elapsed, error), payload in zip(results, payloads):
            assert error == "", (error, payload[:200])
            assert status is None or status < 500 or status in (501, 505), (status, payload[:200])

    with bystander(server):
        batch()
    statuses = {}
    for status, _, _ in seen:
        statuses[status] = statuses.get(status, 0) + 1
    print(f"{len(seen)} fuzzed requests; answers by status: {statuses};"
          f" slowest {max(elapsed for _, elapsed, _ in seen):.2f}s")
    assert len(seen) >= 10_000
    # The fuzzer may send the right token, and a `POST /graceful` with it reloads: the first process then
    # hands over and exits 0, as it should. What must hold is that a main is alive and serving.
    main = server.main_pid()
    assert main is not None and alive(main), server.log_tail()
    assert request(server.port, "GET", "/")[0] == 200, server.log_tail()
    assert request(server.port, "GET", "/")[0] == 200
    assert unexpected_tracebacks(server.log()) == []


# ---- the control surface ------------------------------------------------------------------------------


def outside_address() -> str:
    """An address of this machine that is not loopback, to be a peer that is not 127.0.0.1."""
    candidates = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        candidates.append(probe.getsockname()[0])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=5).stdout
        candidates += re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    for address in candidates:
        if not address.startswith("127."):
            return address
    pytest.fail("this machine has no non-loopback IPv4 address to test --control-allow with")


def graceful(port: int, method: str = "POST", headers=None, host: str = HOST, source: str | None = None):
    return request(port, method, "/graceful", headers=headers, host=host, source=source)


def test_graceful_answers_only_post(engine, tmp_path):
    with running(ENGINES[engine], tmp_path) as server:
        for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"):
            status, body, headers = graceful(server.port, method)
            assert status == 405, (method, status, body)
            assert headers.get("allow") == "POST", (method, headers)
        assert server.main_pid() == server.pid  # none of those reloaded


def test_control_allow_decides_who_may_reload(engine, tmp_path):
    """No peer address may reload by default, loopback included; another address only when --control-allow
    names its network."""
    outside = outside_address()
    local_port, outside_port = free_port(), free_port(outside)
    common = ["--bind", f"{HOST}:{local_port}", "--bind", f"{outside}:{outside_port}"]

    with running(ENGINES[engine], tmp_path, *common, port=local_port, bind=False) as server:
        for port, host in ((outside_port, outside), (local_port, HOST)):
            status, body, _ = graceful(port, host=host, source=host)
            assert status == 403 and b"needs the control token (control_token_file) or --control-allow" in body, (
                status, body)
        assert server.main_pid() == server.pid
        server.wait_for_log(f"refused POST /graceful from {outside}")

    with running(ENGINES[engine], tmp_path, *common, "--control-allow", f"{outside}/32", port=local_port,
                 bind=False) as server:
        status, body, _ = graceful(local_port)
        assert status == 403 and b"reload not allowed from 127.0.0.1" in body, (status, body)
        status, body, _ = graceful(outside_port, host=outside, source=outside)
        assert status == 202, (status, body)
        server.wait_new_main(server.pid, timeout=30)

    with running(ENGINES[engine], tmp_path, *common, "--control-allow", "198.51.100.0/24",
                 port=local_port, bind=False) as server:
        status, body, _ = graceful(outside_port, host=outside, source=outside)
        assert status == 403, (status, body)
        assert server.main_pid() == server.pid


AUTHORIZATIONS_REFUSED = {
    "none": None,
    "a wrong token": f"Bearer {TOKEN[:-1]}x",
    "a prefix of the token": f"Bearer {TOKEN[:16]}",
    "the token plus more": f"Bearer {TOKEN}x",
    "another scheme": f"Basic {TOKEN}",
    "the scheme alone": "Bearer",
    "empty": "",
    "a huge value": "Bearer " + "x" * 60_000,
}


def test_control_token_is_required_when_configured(engine, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running(ENGINES[engine], tmp_path, "--control-token-file", str(token_file)) as server:
        port = server.port
        for name, value in AUTHORIZATIONS_REFUSED.items():
            status, body, _ = graceful(port, headers={"Authorization": value} if value is not None else None)
            assert status in (403, 400, 431), (name, status, body)
            if status == 403:
                assert b"control token" in body, (name, body)
        raw = exchange(port, b"POST /graceful HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x00\r\n"
                             b"Content-Length: 0\r\n\r\n")
        assert raw.status in (400, 403), raw.data[:200]
        assert server.main_pid() == server.pid  # nothing above reloaded
        status, body, _ = graceful(port, headers={"Authorization": f"bearer  {TOKEN}"})
        assert status == 202, (status, body)
        new = server.wait_new_main(server.pid, timeout=30)
        # The token file is read by every generation: the new one wants it too.
        status, body, _ = graceful(port)
        assert status == 403
        assert server.main_pid() == new


def test_a_short_token_file_is_refused_at_start(engine, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    result = serve_fails(engine, tmp_path, "--bind", f"{HOST}:{free_port()}", "--control-token-file", str(token_file))
    assert "too short" in result.stderr


# ---- POST /graceful through a real reverse proxy ----------------------------------------------------------

# As people set it up: upstream keep-alive, the client's address passed on, no retry on another upstream.
NGINX_HEADERS = ("proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
                 " proxy_next_upstream off;")


@pytest.fixture
def nginx_and_service(engine, tmp_path):
    """graceful-http as the shipped units start it (sockets "http" and "control" passed with LISTEN_FDS),
    behind a real nginx on loopback."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    upstream.bind((HOST, 0))
    upstream.listen(1024)
    control_path = str(tmp_path / "control.sock")
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(control_path)
    control.listen(64)
    upstream_port = upstream.getsockname()[1]
    service = ServeProcess(ENGINES[engine], tmp_path, port=upstream_port, bind=False, pid_file=True,
                           pass_fds=[upstream.fileno(), control.fileno()],
                           environ={"LISTEN_FDS": "2", "LISTEN_PID": "self", "LISTEN_FDNAMES": "http:control"})
    nginx_port = free_port()
    blocks = (proxies.nginx_upstream("graceful", f"{HOST}:{upstream_port}", keepalive=16),
              proxies.nginx_site(f"{HOST}:{nginx_port}", "http://graceful", NGINX_HEADERS))
    try:
        service.start().wait_serving(timeout=30)
        upstream.close()
        control.close()  # the service holds them now
        with proxies.nginx(tmp_path / "nginx", *blocks, wait_for=(HOST, nginx_port)):
            wait_until(lambda: _get_ok(nginx_port), 20, "nginx to proxy to graceful-http", service.log_tail)
            yield service, nginx_port, control_path
    finally:
        service.kill_all()


def unix_post(path: str, target: str = "/graceful") -> tuple[int, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    connection = http.client.HTTPConnection("localhost")
    connection.sock = sock
    try:
        connection.request("POST", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_graceful_relayed_by_nginx_is_refused_by_the_shipped_setup(nginx_and_service):
    """Behind a proxy every request comes from 127.0.0.1: with the admins' control socket present, the public
    listener refuses POST /graceful, proxied or not; the control socket takes it; nothing fails meanwhile."""
    service, nginx_port, control_path = nginx_and_service
    first = service.pid
    status, body, _ = request(nginx_port, "GET", "/")
    assert status == 200 and pid_of(body) == first, body

    for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"Authorization": "Bearer anything-at-all-here"}):
        status, body, _ = request(nginx_port, "POST", "/graceful", headers=headers)
        assert status == 403, (headers, status, body)
        assert b"control socket" in body, body
    status, body, _ = graceful(service.port)  # straight to the public listener, from loopback
    assert status == 403, (status, body)
    assert service.main_pid() == first

    # The admins' socket reloads, and clients going through nginx see nothing of it.
    with Load(HOST, nginx_port, clients=4, pause=0.005) as load:
        load.wait_for_requests(100)
        status, body = unix_post(control_path)
        assert status == 202, (status, body)
        new = service.wait_new_main(first, timeout=30)
        wait_until(lambda: load.result.pids[new] > 0, 20, f"nginx to relay answers from pid {new}")
        load.wait_for_requests(100)
    assert load.result.failures == [], load.result.summary()
    assert unix_post(control_path, "/")[0] == 404  # nothing but the control endpoints there


def test_graceful_relayed_by_nginx_with_the_token(engine, tmp_path):
    """With a control token configured, the public listener accepts POST /graceful carrying it, proxied too."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    nginx_port = free_port()
    blocks = (proxies.nginx_upstream("graceful", f"{HOST}:{port}", keepalive=16),
              proxies.nginx_site(f"{HOST}:{nginx_port}", "http://graceful", NGINX_HEADERS))
    with running(ENGINES[engine], tmp_path, "--control-token-file", str(token_file), port=port) as server, \
            proxies.nginx(tmp_path / "nginx", *blocks, wait_for=(HOST, nginx_port)):
        wait_until(lambda: _get_ok(nginx_port), 20, "nginx to proxy")
        assert request(nginx_port, "POST", "/graceful")[0] == 403
        status, body, _ = request(nginx_port, "POST", "/graceful", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 202, (status, body)
        server.wait_new_main(server.pid, timeout=30)


def _get_ok(port: int) -> bool:
    with contextlib.suppress(OSError):
        return request(port, "GET", "/")[0] == 200
    return False


# ---- bad command lines and environments -------------------------------------------------------------------


def serve_fails(engine: str, directory: Path, *args: str, fds: list[int] | None = None,
                environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`serve ARGS` must end at once with a non-zero status and exactly one line on stderr, no traceback."""
    result = run_cli(ENGINES[engine], "serve", *args, cwd=directory, timeout=20, fds=fds, environ=environ)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, (args, environ, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, (args, environ, result.stderr)
    assert result.stdout == "", result.stdout
    return result


BAD_COMMAND_LINES = {
    "an unknown flag": (["--bogus"], 2, "unrecognized arguments: --bogus"),
    "a flag without its value": (["--bind"], 2, "expected one argument"),
    "an unknown command": (None, 2, "invalid choice"),
    "a bind that is not an address": (["--bind", "nonsense"], 2, "invalid --bind 'nonsense'"),
    "a port out of range": (["--bind", "127.0.0.1:99999"], 2, "port must be a number from 1 to 65535"),
    "a bad IPv6 bind": (["--bind", "[::zz]:80"], 2, "is not an IPv6 address"),
    "an empty unix path": (["--bind", "unix:"], 2, "empty unix socket path"),
    "an address not on this machine": (["--bind", "203.0.113.7:8080"], 1, "cannot listen on 203.0.113.7:8080"),
    "an APP module that does not exist": (["no_such_module:app"], 1, "no module named 'no_such_module'"),
    "an APP attribute that does not exist": (["graceful_http.demo:nothing"], 1, "has no attribute 'nothing'"),
    "an APP that is not callable": (["graceful_http.demo:MAX_SLEEP"], 1, "not callable"),
    "an APP without an attribute": (["graceful_http.demo"], 1, "expected module:attribute"),
    "a negative graceful timeout": (["--graceful-timeout", "-1"], 2, "invalid --graceful-timeout"),
    "a graceful timeout that is not a number": (["--graceful-timeout", "soon"], 2, "invalid --graceful-timeout"),
    "a zero ready timeout": (["--ready-timeout", "0"], 2, "invalid --ready-timeout"),
    "an infinite ready timeout": (["--ready-timeout", "inf"], 2, "invalid --ready-timeout"),
    "zero workers": (["--workers", "0"], 2, "invalid --workers"),
    "a bad CIDR": (["--control-allow", "300.1.1.1/8"], 2, "invalid --control-allow"),
    "a missing token file": (["--control-token-file", "/nonexistent/token"], 1, "cannot read the control token"),
    "a missing config file": (["--config", "/nonexistent/config.toml"], 2, "cannot read config file"),
    "an unknown interface": (["--interface", "cgi"], 2, "invalid --interface"),
}


@pytest.mark.parametrize("name", list(BAD_COMMAND_LINES))
def test_bad_command_line_is_one_line_and_non_zero(engine, tmp_path, name):
    args, code, message = BAD_COMMAND_LINES[name]
    port_args = ["--bind", f"{HOST}:{free_port()}"] if args and "--bind" not in args else []
    if args is None:
        command = [ENGINES[engine], "-m", "graceful_http", "serve-forever"]
        result = subprocess.run(command, capture_output=True, text=True, env=clean_environ(), timeout=20)
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
        return
    result = serve_fails(engine, tmp_path, *port_args, *args)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr


def test_reload_without_a_service_is_one_line(engine, tmp_path):
    for args in (["reload"], ["reload", "--pid", "999999"], ["reload", "--pid-file", str(tmp_path / "none")],
                 ["reload", "--pid", "1", "--timeout", "x"]):
        result = subprocess.run([ENGINES[engine], "-m", "graceful_http", *args], capture_output=True, text=True,
                                env=clean_environ(), timeout=20)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


@pytest.fixture
def listening_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    sock.listen(8)
    yield sock
    sock.close()


def test_listen_fds_environment_errors_are_one_line(engine, tmp_path, listening_socket):
    """LISTEN_* that does not describe what was passed: a one-line error and a non-zero exit, never a traceback
    and never serving on something else."""
    read_end, write_end = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unlistened = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    regular = open(tmp_path / "file", "w")
    listener = listening_socket.fileno()
    cases = [
        # (what is passed at fd 3…, environment, what the error must say)
        ([read_end], {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "is not a socket"),
        ([regular.fileno()], {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "is not a socket"),
        ([udp.fileno()], {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "is not a stream socket"),
        ([unlistened.fileno()], {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "is not a listening socket"),
        ([listener], {"LISTEN_FDS": "2", "LISTEN_PID": "self"}, "fd 4"),
        ([], {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "fd 3"),
        ([listener], {"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "LISTEN_PID=1 is not this process"),
        ([listener], {"LISTEN_FDS": "1"}, "LISTEN_PID=''"),
        ([listener], {"LISTEN_FDS": "one", "LISTEN_PID": "self"}, "LISTEN_FDS='one' is not a number"),
        ([listener], {"LISTEN_FDS": "1", "LISTEN_PID": "self", "LISTEN_FDNAMES": "http:control"},
         "does not name 1 sockets"),
    ]
    try:
        for fds, environ, message in cases:
            result = serve_fails(engine, tmp_path, "--bind", f"{HOST}:{free_port()}", fds=fds, environ=environ)
            assert message in result.stderr, (fds, environ, result.stderr)
            assert result.returncode == 1, (environ, result.returncode)
    finally:
        for thing in (udp, unlistened, regular):
            thing.close()
        os.close(read_end)
        os.close(write_end)
