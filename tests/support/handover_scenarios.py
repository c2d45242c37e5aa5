"""Connection handover between two engines in one process, with real sockets and a real client.

Run as `python handover_scenarios.py <scenario> <http> <loop>` by any interpreter
(Debian's python3 with uvicorn 0.17.6 has no pytest): it prints one JSON
object with what it observed, and the tests assert on it. `http` is h11 or
httptools, `loop` asyncio or uvloop.

- `journey`: engine A answers a request on a keep-alive connection; the
  connection is detached from one engine and adopted by the other three times,
  each time with the client's next request sent while the connection is in
  flight between them (a GET, a POST with a body, two pipelined GETs).
- `channel`: the same through the descriptor channel (`handover`): a
  connection sent and adopted; a receiver that dies before acknowledging (the
  sender serves the connection itself); a peer without the feature.
- `drain`: engine A drains into two adopting engines (as a new generation's
  two workers, the first already serving two connections) through their
  adoption points, the emptier first: idle clients move at once, a
  busy one after its response (without `Connection: close`), a half-sent one
  once complete; one that asked for `Connection: close` stays and is counted
  as fallen back. A drains in no time once nothing is left.
- `first_batch`: idle connections move as the drain begins; the listeners' close and the drain's end wait
  for the tick.
- `during_batch`: a connection whose response completes while a batch is in flight moves with the next
  batch at once, not at the tick.
- `states`: the handover verdict of connections in every state that matters
  (idle, a partial head, pipelined, a response under way, an unread body,
  Connection: close, HTTP/1.0, upgraded to WebSocket).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))

from graceful_http.engine import Engine  # noqa: E402
from graceful_http.handover import Adoption, AdoptionPoint, Handover, connect_all  # noqa: E402
from graceful_http.movable import Verdict  # noqa: E402

HOST = "127.0.0.1"
DEADLINE = 10.0


def named_app(name: str):
    """Answers `<name>:<path>:<bytes of body>`; /slow waits until released; /stream sends half, then waits;
    /early answers without reading the body; a WebSocket is accepted, then closed."""
    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        path = scope["path"]
        body = b""
        if path != "/early":
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        if path == "/slow":
            await release.wait()
        answer = f"{name}:{path}:{len(body)}".encode()
        headers = [(b"content-type", b"text/plain")]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            await release.wait()
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(len(answer)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    app.release = release
    return app


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(16)
    return sock


class CountingConnection(http.client.HTTPConnection):
    """http.client as a naive client uses it; counts the TCP connections it opens."""

    connects = 0

    def connect(self):
        type(self).connects += 1
        super().connect()


def read_responses(sock: socket.socket, count: int) -> list[str]:
    """Read `count` responses with Content-Length off a raw socket (for pipelined requests)."""
    data = b""
    bodies = []
    sock.settimeout(DEADLINE)
    while len(bodies) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1").lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(data) >= head_end + 4 + length:
                bodies.append(data[head_end + 4:head_end + 4 + length].decode())
                data = data[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed while reading pipelined responses")
        data += chunk
    return bodies


async def wait_for(predicate, what: str):
    """Poll a condition of the engines' state (changed by the loop's own callbacks) until it holds."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.001)


def count_batches(movers: list[Handover], before_send=None) -> list[int]:
    """Note the size of every batch the movers send (the list returned), awaiting `before_send(n)` before the
    n-th goes, if given."""
    sent: list[int] = []
    for mover in movers:
        send = mover.send

        async def counted(fds, send=send):
            sent.append(len(fds))
            if before_send is not None:
                await before_send(len(sent))
            return await send(fds)

        mover.send = counted
    return sent


def only_connection(engine: Engine):
    return next(iter(engine.connections))


async def start_engine(name: str, http: str) -> tuple[Engine, object, socket.socket]:
    app = named_app(name)
    sock = listener()
    engine = Engine(app, [sock], lifespan=False, protocol=http)
    await engine.start()
    return engine, app, sock


async def draining_into_an_adopter(http: str):
    """Engine A (to drain), engine B adopting through its point as the new generation's only process:
    (a, a's app, a's listener, b, b's adoption point)."""
    a, a_app, a_sock = await start_engine("A", http)
    b, _, _ = await start_engine("B", http)
    point = AdoptionPoint(os.getpid(), 1, b.adopt)
    point.open()
    return a, a_app, a_sock, b, point


async def end_handover(movers: list[Handover], points: list[AdoptionPoint]) -> None:
    """The senders say they are done, and the adoption points close."""
    for mover in movers:
        await mover.finish()
    for point in points:
        point.close()


async def move(source: Engine, target: Engine, while_in_flight) -> None:
    """Detach the (only) connection from `source`, let the client send meanwhile, adopt it in `target`."""
    await wait_for(lambda: len(source.connections) == 1 and source.movable(only_connection(source))[0] is Verdict.MOVE,
                   "the connection to become idle")
    fd = source.detach(only_connection(source))
    assert fd is not None
    await asyncio.get_running_loop().run_in_executor(None, while_in_flight)
    await asyncio.sleep(0)
    assert not source.connections, "the source still counts the connection"
    await target.adopt(socket.socket(fileno=fd))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def journey(http: str) -> dict:
    loop = asyncio.get_running_loop()
    a, _, a_sock = await start_engine("A", http)
    b, _, b_sock = await start_engine("B", http)
    fds_before = open_fds()
    port = a_sock.getsockname()[1]
    client = CountingConnection(HOST, port, timeout=DEADLINE)
    answers = []

    def get(path):
        client.request("GET", path)
        answers.append(client.getresponse().read().decode())

    await loop.run_in_executor(None, get, "/one")
    local = client.sock.getsockname()

    await move(a, b, lambda: client.request("GET", "/two"))
    await loop.run_in_executor(None, lambda: answers.append(client.getresponse().read().decode()))
    await loop.run_in_executor(None, get, "/three")

    body = b"x" * 100_000
    await move(b, a, lambda: client.request("POST", "/four", body=body,
                                            headers={"Content-Type": "application/octet-stream"}))
    await loop.run_in_executor(None, lambda: answers.append(client.getresponse().read().decode()))

    pipelined = b"GET /five HTTP/1.1\r\nHost: x\r\n\r\nGET /six HTTP/1.1\r\nHost: x\r\n\r\n"
    await move(a, b, lambda: client.sock.sendall(pipelined))
    answers += await loop.run_in_executor(None, read_responses, client.sock, 2)
    await loop.run_in_executor(None, get, "/seven")
    same_connection = client.sock.getsockname() == local
    served = {"A": a.total_requests, "B": b.total_requests}
    client.close()
    await wait_for(lambda: not a.connections and not b.connections, "the connection to close")
    for engine, _sock in ((a, a_sock), (b, b_sock)):
        engine.stop_accepting()
        await engine.drain(time.monotonic() + 5)
    return {"answers": answers, "connects": CountingConnection.connects, "same_connection": same_connection,
            "served": served, "fds_before": fds_before, "fds_after": open_fds() + 2}  # +2: the closed listeners


async def states(http: str) -> dict:
    loop = asyncio.get_running_loop()
    engine, app, sock = await start_engine("A", http)
    port = sock.getsockname()[1]
    verdicts = {}

    async def verdict_of(name, send, wait=lambda c: True):
        client = socket.create_connection((HOST, port))
        client.settimeout(DEADLINE)
        await wait_for(lambda: len(engine.connections) == 1, "the connection to be accepted")
        connection = only_connection(engine)
        await loop.run_in_executor(None, send, client)
        await wait_for(lambda: wait(connection), f"{name}: the server to see the bytes")
        verdict = engine.movable(connection)[0].value
        fd = engine.detach(connection)  # detaches only what may move
        if fd is not None:
            os.close(fd)
        verdicts[name] = [verdict, "detached" if fd is not None else "kept"]
        return client, connection

    def settled(connection):  # the server has read some of what was sent: a request head, or part of one
        return connection.cycle is not None or connection.handover_state().request_pending

    def answered(client, count=1):
        return read_responses(client, count)

    async def close(client):
        client.close()
        await wait_for(lambda: not engine.connections, "the server to see the client close")

    # Idle after one answered request.
    client, _ = await verdict_of("idle", lambda c: (c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), answered(c)))
    await close(client)

    client, _ = await verdict_of("fresh", lambda c: None)  # accepted, nothing sent yet
    await close(client)

    client, connection = await verdict_of("partial head", lambda c: c.sendall(b"GET / HTTP/1.1\r\nHo"), settled)
    client.sendall(b"st: x\r\n\r\n")
    await loop.run_in_executor(None, answered, client)
    verdicts["partial head, then complete"] = [engine.movable(connection)[0].value]
    await close(client)

    client, connection = await verdict_of(
        "pipelined behind a slow request",
        lambda c: c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"), settled)
    app.release.set()
    await loop.run_in_executor(None, answered, client, 2)
    verdicts["pipelined, both answered"] = [engine.movable(connection)[0].value]
    app.release.clear()
    await close(client)

    client, connection = await verdict_of(
        "response under way", lambda c: c.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"),
        lambda c: c.cycle is not None and c.cycle.response_started)
    app.release.set()
    await close(client)
    app.release.clear()

    client, connection = await verdict_of(
        "answered before its body was read",
        lambda c: (c.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345"), answered(c)))
    client.sendall(b"67890")
    await wait_for(lambda: engine.movable(connection)[0] is Verdict.MOVE or engine.movable(connection)[0]
                   is Verdict.NEVER, "the rest of the body")
    verdicts["answered, then its body read"] = [engine.movable(connection)[0].value]
    await close(client)

    client, _ = await verdict_of(
        "Connection: close asked",
        lambda c: c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), settled)
    app.release.set()
    await close(client)
    app.release.clear()

    client, _ = await verdict_of("HTTP/1.0, answered", lambda c: (c.sendall(b"GET / HTTP/1.0\r\n\r\n"), c.recv(4096)))
    await close(client)

    key = base64.b64encode(os.urandom(16))
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    client, _ = await verdict_of("WebSocket", lambda c: (c.sendall(upgrade), c.recv(4096)))
    await close(client)

    engine.stop_accepting()
    await engine.drain(time.monotonic() + 5)
    return verdicts


async def channel(http: str) -> dict:
    loop = asyncio.get_running_loop()
    a, _, a_sock = await start_engine("A", http)
    b, _, b_sock = await start_engine("B", http)
    fds_before = open_fds()
    client = CountingConnection(HOST, a_sock.getsockname()[1], timeout=DEADLINE)
    answers = []

    def get(path):
        client.request("GET", path)
        answers.append(client.getresponse().read().decode())

    async def detach_idle(engine):
        await wait_for(lambda: len(engine.connections) == 1
                       and engine.movable(only_connection(engine))[0] is Verdict.MOVE, "an idle connection")
        return engine.detach(only_connection(engine))

    result = {}
    await loop.run_in_executor(None, get, "/one")

    # Handed over and adopted.
    ours, theirs = socket.socketpair()
    adoption = Adoption(theirs, b.adopt)
    adopting = asyncio.ensure_future(adoption.run())
    handover = Handover(ours)
    result["negotiated"] = await handover.negotiate()
    fd = await detach_idle(a)
    result["taken"] = await handover.send([fd])
    await loop.run_in_executor(None, get, "/two")
    await handover.finish()
    result["adopted"] = await adopting

    # The receiver dies between receiving and acknowledging: the sender keeps the connection and serves it.
    ours, theirs = socket.socketpair()
    handover = Handover(ours)

    async def dying_receiver():
        adoption = Adoption(theirs, None)
        await adoption._lines.send(b"adopting 1\n")  # as the real one answers the offer
        await adoption._lines.receive()  # the hello
        line, fds = await adoption._lines.receive()  # the batch: received, then it "crashes"
        adoption._close_all(fds)
        theirs.close()

    dying = asyncio.ensure_future(dying_receiver())
    result["negotiated with the dying receiver"] = await handover.negotiate()
    fd = await detach_idle(b)
    taken = await handover.send([fd])
    await dying
    result["taken by the dying receiver"] = taken
    if not taken:
        await b.adopt(socket.socket(fileno=fd))  # the fallback: serve it ourselves
    await loop.run_in_executor(None, get, "/three")
    await handover.finish()

    # A peer that does not know the feature: it closes at once, or says nothing.
    ours, theirs = socket.socketpair()
    theirs.close()
    result["negotiated with a closed peer"] = await Handover(ours).negotiate(timeout=5)
    ours.close()
    ours, theirs = socket.socketpair()
    result["negotiated with a silent peer"] = await Handover(ours).negotiate(timeout=0.2)
    ours.close()
    theirs.close()

    result.update(answers=answers, connects=CountingConnection.connects)
    client.close()
    await wait_for(lambda: not a.connections and not b.connections, "the connection to close")
    result.update(fds_before=fds_before, fds_after=open_fds())
    for engine in (a, b):
        engine.stop_accepting()
        await engine.drain(time.monotonic() + 5)
    return result


async def drain(http: str) -> dict:
    loop = asyncio.get_running_loop()
    a, a_app, a_sock = await start_engine("A", http)
    b1, _, b1_sock = await start_engine("B1", http)
    b2, _, _ = await start_engine("B2", http)
    points = [AdoptionPoint(os.getpid(), index, engine.adopt, serving=lambda engine=engine: len(engine.connections))
              for index, engine in ((1, b1), (2, b2))]
    for point in points:
        point.open()
    b1_own = [socket.create_connection((HOST, b1_sock.getsockname()[1])) for _ in range(2)]  # B1 serves two already
    await wait_for(lambda: len(b1.connections) == 2, "B1's own two connections")
    port = a_sock.getsockname()[1]
    naive = [CountingConnection(HOST, port, timeout=DEADLINE) for _ in range(6)]
    answers: dict[str, list[str]] = {}

    def get(name, client, path):
        client.request("GET", path)
        response = client.getresponse()
        answers.setdefault(name, []).append(f"{response.read().decode()} {response.getheader('connection')}")

    for index, client in enumerate(naive):
        await loop.run_in_executor(None, get, f"naive{index}", client, "/one")
    busy = CountingConnection(HOST, port, timeout=DEADLINE)
    busy_answer = loop.run_in_executor(None, get, "busy", busy, "/slow")
    partial = socket.create_connection((HOST, port))
    partial.sendall(b"GET /partial HTTP/1.1\r\nHo")
    closing = socket.create_connection((HOST, port))
    closing.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await wait_for(lambda: len(a.connections) == 9 and a.in_flight() == 2
                   and all(c.handover_state().request_pending for c in a.connections if c.cycle is None),
                   "9 connections, 2 busy, the partial head read")

    hung_up = socket.create_connection((HOST, port))  # a client that goes away as the drain begins
    hung_up.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    await loop.run_in_executor(None, read_responses, hung_up, 1)
    await wait_for(lambda: len(a.connections) == 10, "the one that will hang up")
    gone = next(c for c in a.connections if c.client[1] == hung_up.getsockname()[1])
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())
    deadline = time.monotonic() + DEADLINE
    draining = asyncio.ensure_future(a.drain(deadline, movers=movers))
    # Its transport closes before the drain's first look, its connection_lost only after it (the loop's order
    # of callbacks): the drain sees it closing. It is gone, not fallen back.
    gone.transport.close()
    await wait_for(lambda: a.handed_over == 6 and a.fell_back == 1, "the idle ones to move")
    hung_up.close()
    counts = {"moved at once": a.handed_over, "fell back at once": a.fell_back}
    a_app.release.set()  # the busy ones answer
    await busy_answer
    closing_answer = await loop.run_in_executor(None, read_responses, closing, 1)
    partial.sendall(b"st: x\r\n\r\n")
    answers["partial"] = await loop.run_in_executor(None, read_responses, partial, 1)
    await wait_for(lambda: a.handed_over == 8, "the busy and the partial one to move once idle")
    served, cut = await draining
    returned_before_deadline = time.monotonic() < deadline  # it ended because nothing was left
    for index, client in enumerate(naive):
        await loop.run_in_executor(None, get, f"naive{index}", client, "/two")
    await loop.run_in_executor(None, get, "busy", busy, "/two")
    partial.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    answers["partial"] += await loop.run_in_executor(None, read_responses, partial, 1)
    await end_handover(movers, points)
    closing.close()
    partial.close()
    for client in [*naive, busy, *b1_own]:
        client.close()
    return {"answers": answers, "closing": closing_answer, "connects": CountingConnection.connects,
            "counts": counts, "handed_over": a.handed_over, "fell_back": a.fell_back,
            "adopted": [b1.adopted, b2.adopted], "served_while_draining": served, "cut": cut,
            "returned_before_deadline": returned_before_deadline}



async def batches(http: str) -> dict:
    """More idle keep-alive connections than two batches, all idle at the drain's first turn: they move in
    batches."""
    from graceful_http.engine import HANDOVER_BATCH

    count = 2 * HANDOVER_BATCH + 5
    loop = asyncio.get_running_loop()
    a, _, a_sock, b, point = await draining_into_an_adopter(http)
    port = a_sock.getsockname()[1]
    clients = [socket.create_connection((HOST, port)) for _ in range(count)]
    for client in clients:
        client.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    first = [await loop.run_in_executor(None, read_responses, client, 1) for client in clients]
    await wait_for(lambda: len(a.connections) == count and a.in_flight() == 0, f"{count} idle connections")
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())
    sent = count_batches(movers)
    served, cut = await a.drain(time.monotonic() + DEADLINE, movers=movers)
    for client in clients:
        client.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    second = [await loop.run_in_executor(None, read_responses, client, 1) for client in clients]
    await end_handover(movers, [point])
    for client in clients:
        client.close()
    return {"batch": HANDOVER_BATCH, "count": count, "sent": sent, "first": first, "second": second,
            "handed_over": a.handed_over, "fell_back": a.fell_back, "adopted": b.adopted, "cut": cut}


async def first_batch(http: str) -> dict:
    """Idle connections leave as the drain begins, not a tick later: only the listeners' close (and the drain's
    end) waits for the tick, made long here (2 s) so that the order cannot come from timing."""
    import graceful_http.engine

    tick = graceful_http.engine.DRAIN_TICK = 2.0
    loop = asyncio.get_running_loop()
    a, _, a_sock, b, point = await draining_into_an_adopter(http)
    clients = [socket.create_connection((HOST, a_sock.getsockname()[1])) for _ in range(3)]
    for client in clients:
        client.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        await loop.run_in_executor(None, read_responses, client, 1)
    await wait_for(lambda: len(a.connections) == 3 and a.in_flight() == 0, "3 idle connections")
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())
    began = time.monotonic()
    draining = asyncio.ensure_future(a.drain(began + DEADLINE, movers=movers))
    await wait_for(lambda: a.handed_over == 3, "the idle connections to move")
    moved_after = time.monotonic() - began
    await draining
    drained_after = time.monotonic() - began
    second = []
    for client in clients:
        client.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        second += await loop.run_in_executor(None, read_responses, client, 1)
    await end_handover(movers, [point])
    for client in clients:
        client.close()
    return {"moved_before_the_tick": moved_after < tick, "drain_ended_after_the_tick": drained_after >= tick,
            "second": second}


async def held(http: str) -> dict:
    """A connection whose response completes while the drain runs is held at that moment (not read from again)
    and moves: the request its client sends at once is the new generation's, even though the drain looks
    again only at its tick (its wake-ups are turned off here, and the tick made 1 s)."""
    import graceful_http.engine

    graceful_http.engine.DRAIN_TICK = 1.0
    loop = asyncio.get_running_loop()
    a, a_app, a_sock, b, point = await draining_into_an_adopter(http)
    client = socket.create_connection((HOST, a_sock.getsockname()[1]))
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: a.in_flight() == 1, "the slow request under way")
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())
    draining = asyncio.ensure_future(a.drain(time.monotonic() + DEADLINE, movers=movers))
    state = a.server.server_state
    await wait_for(lambda: getattr(state, "wake_drain", None) is not None, "the drain to begin")
    state.wake_drain = lambda: None  # the drain looks again only at its tick
    a_app.release.set()
    first = await loop.run_in_executor(None, read_responses, client, 1)
    client.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    second = await loop.run_in_executor(None, read_responses, client, 1)
    await draining
    await end_handover(movers, [point])
    client.close()
    return {"first": first, "second": second, "served_by_a": a.total_requests, "handed_over": a.handed_over,
            "fell_back": a.fell_back}


async def during_batch(http: str) -> dict:
    """A response that completes while a batch is on its way to the new generation (the round trip through
    both loops) holds its connection and wakes the drain, which sends it with the next batch at once, not at
    its tick (made 2 s here, so that the order cannot come from timing)."""
    import graceful_http.engine

    tick = graceful_http.engine.DRAIN_TICK = 2.0
    loop = asyncio.get_running_loop()
    a, a_app, a_sock, b, point = await draining_into_an_adopter(http)
    port = a_sock.getsockname()[1]
    idle, busy = socket.create_connection((HOST, port)), socket.create_connection((HOST, port))
    idle.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    await loop.run_in_executor(None, read_responses, idle, 1)
    busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: len(a.connections) == 2 and a.in_flight() == 1, "one idle connection, one busy")
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())

    async def answer(batch: int) -> None:
        if batch == 1:  # the slow response completes while the first batch is under way
            a_app.release.set()
            await wait_for(lambda: a.in_flight() == 0, "the slow response to complete")

    sent = count_batches(movers, before_send=answer)
    began = time.monotonic()
    draining = asyncio.ensure_future(a.drain(began + DEADLINE, movers=movers))
    first = await loop.run_in_executor(None, read_responses, busy, 1)
    await wait_for(lambda: a.handed_over == 2 or time.monotonic() - began > tick, "both connections to move")
    moved_after = time.monotonic() - began
    busy.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    second = await loop.run_in_executor(None, read_responses, busy, 1)
    await draining
    await end_handover(movers, [point])
    for client in (idle, busy):
        client.close()
    return {"sent": sent, "moved_before_the_tick": moved_after < tick, "first": first, "second": second,
            "handed_over": a.handed_over, "fell_back": a.fell_back}


async def worker_settle(http: str) -> dict:
    """A worker's engine, accepting through its own loop (balanced_accept): its drain ends as soon as nothing is
    left, not a tick later (the tick made 30 s here, beyond the drain's deadline), and a connection accepted but
    still being set up as the drain begins is waited for, then moves."""
    import graceful_http.engine
    from graceful_http import balanced_accept

    graceful_http.engine.DRAIN_TICK = 30.0
    loop = asyncio.get_running_loop()
    table = balanced_accept.create_table()
    a_sock = listener()
    a = Engine(named_app("A"), [a_sock], lifespan=False, protocol=http)
    acceptor = balanced_accept.for_worker(a, os.getpid(), workers=2, index=1)
    set_up = asyncio.Event()
    held_back = []
    serve = a.serve_accepted

    def serving(sock, created):  # once held_back is set, a connection's set-up waits for set_up
        if not held_back:
            return serve(sock, created)

        async def later():
            await set_up.wait()
            return await serve(sock, created)
        return asyncio.ensure_future(later())

    a.serve_accepted = serving
    await a.start()
    b, _, _ = await start_engine("B", http)
    point = AdoptionPoint(os.getpid(), 1, b.adopt)
    point.open()
    port = a_sock.getsockname()[1]
    served = socket.create_connection((HOST, port))
    served.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await loop.run_in_executor(None, read_responses, served, 1)
    await wait_for(lambda: len(a.connections) == 1 and a.in_flight() == 0, "one idle connection")
    held_back.append(True)
    pending = socket.create_connection((HOST, port))
    await wait_for(lambda: acceptor.pending == 1, "a connection accepted, its set-up held back")
    a.stop_accepting(moving_to=os.getpid())
    movers = await connect_all(os.getpid())
    deadline = time.monotonic() + DEADLINE
    draining = asyncio.ensure_future(a.drain(deadline, movers=movers))
    await wait_for(lambda: a.handed_over == 1, "the idle connection to move")
    for _ in range(20):  # loop turns in which the drain could end
        await asyncio.sleep(0)
    waited_for_pending = not draining.done()
    set_up.set()
    await draining
    ended_before_deadline = time.monotonic() < deadline
    second = []
    for client in (served, pending):
        client.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        second += await loop.run_in_executor(None, read_responses, client, 1)
    await end_handover(movers, [point])
    for client in (served, pending):
        client.close()
    acceptor.counts.close()
    os.close(table)
    return {"first": first, "second": second, "waited_for_pending": waited_for_pending,
            "ended_before_deadline": ended_before_deadline, "handed_over": a.handed_over, "fell_back": a.fell_back}


def main() -> None:
    scenario, http, loop = sys.argv[1:4]
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    scenarios = {"journey": journey, "channel": channel, "drain": drain, "states": states, "batches": batches,
                 "first_batch": first_batch, "held": held, "during_batch": during_batch,
                 "worker_settle": worker_settle}
    result = asyncio.run(asyncio.wait_for(scenarios[scenario](http), 60))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
