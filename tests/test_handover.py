"""Connection handover, in one process: the "may this connection move" decision (pure, then read from
each engine's real protocol objects), the descriptor channel, and connections moving between two engines
with a real client on real sockets.

Engines: Debian 12's uvicorn 0.17.6 (h11, asyncio) through /usr/bin/python3, and the newest uvicorn from
PyPI in the venv with each protocol (httptools, h11) on each loop (uvloop, asyncio). The scenarios run in
`support/handover_scenarios.py` under the engine's interpreter and report what they saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
if str(SERVICE) not in sys.path:
    sys.path.insert(0, str(SERVICE))

from graceful_http.handover import decode, encode, fill_emptiest  # noqa: E402
from graceful_http.movable import ConnectionState, Verdict, judge  # noqa: E402

SCENARIOS = Path(__file__).resolve().parent / "support" / "handover_scenarios.py"
ENGINES = {
    "debian-h11-asyncio": ("/usr/bin/python3", "h11", "asyncio"),
    "pypi-httptools-uvloop": (sys.executable, "httptools", "uvloop"),
    "pypi-httptools-asyncio": (sys.executable, "httptools", "asyncio"),
    "pypi-h11-uvloop": (sys.executable, "h11", "uvloop"),
    "pypi-h11-asyncio": (sys.executable, "h11", "asyncio"),
}


def run_scenario(name: str, engine: str) -> dict:
    python, http, loop = ENGINES[engine]
    result = subprocess.run([python, str(SCENARIOS), name, http, loop], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"{name} on {engine} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout)


# ---- the decision, pure --------------------------------------------------------------------------

IDLE = ConnectionState()


@pytest.mark.parametrize("state, verdict", [
    (IDLE, Verdict.MOVE),
    (ConnectionState(response_complete=False), Verdict.WAIT),
    (ConnectionState(request_pending=True), Verdict.WAIT),
    (ConnectionState(unsent_bytes=1), Verdict.WAIT),
    (ConnectionState(upgraded=True), Verdict.NEVER),
    (ConnectionState(encrypted=True), Verdict.NEVER),
    (ConnectionState(closing=True), Verdict.NEVER),
    (ConnectionState(keep_alive=False), Verdict.NEVER),
    (ConnectionState(body_unread=True), Verdict.NEVER),
    # What can never move is not waited for, whatever else is going on.
    (ConnectionState(keep_alive=False, response_complete=False, request_pending=True), Verdict.NEVER),
    (ConnectionState(upgraded=True, response_complete=False), Verdict.NEVER),
    (ConnectionState(closing=True, unsent_bytes=10), Verdict.NEVER),
])
def test_judge(state, verdict):
    assert judge(state)[0] is verdict


def test_every_reason_is_said():
    reasons = {judge(ConnectionState(**{field: value}))[1] for field, value in [
        ("upgraded", True), ("encrypted", True), ("closing", True), ("keep_alive", False),
        ("response_complete", False), ("request_pending", True), ("unsent_bytes", 5), ("body_unread", True)]}
    assert len(reasons) == 8 and all(reasons)


# ---- the channel's lines, pure -------------------------------------------------------------------


@pytest.mark.parametrize("count, serving, shares", [
    (25, [25, 0], [0, 25]),  # a rollout's last old worker: all to the new worker that has none yet
    (25, [0], [25]),
    (10, [3, 0], [4, 6]),
    (6, [0, 0, 0], [2, 2, 2]),
    (1, [2, 2], [1, 0]),  # a tie: the first
    (3, [], []),  # nobody to send to
])
def test_connections_go_to_the_emptiest_receiver(count, serving, shares):
    assert fill_emptiest(count, serving) == shares


def test_lines_round_trip():
    assert encode("conns", 3) == b"conns 3\n"
    assert decode(b"conns 3") == ("conns", [3])
    assert decode(b"done") == ("done", [])
    assert decode(b"") == ("", [])
    assert decode(b"took three") == ("", [])  # not a number: meaningless, never a count
    assert decode(b"\xff\xfe 1") == ("\ufffd\ufffd", [1])


# ---- each engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", list(ENGINES))
def test_decision_read_from_each_engine(engine):
    """Real connections in each state, judged from the engine's own protocol objects; only the idle
    ones are detached."""
    verdicts = run_scenario("states", engine)
    # Answered before the request body ended: h11 keeps parsing the body, so the connection waits for it,
    # then moves. With httptools uvicorn stops following the body once the response is complete, so
    # nothing tells where the next request begins: the connection never moves (it drains where it is).
    early = {"before": ["never", "kept"], "after": ["never"]} if "httptools" in engine else \
        {"before": ["wait", "kept"], "after": ["move"]}
    assert verdicts == {
        "idle": ["move", "detached"],
        "fresh": ["move", "detached"],
        "partial head": ["wait", "kept"],
        "partial head, then complete": ["move"],
        "pipelined behind a slow request": ["wait", "kept"],
        "pipelined, both answered": ["move"],
        "response under way": ["wait", "kept"],
        "answered before its body was read": early["before"],
        "answered, then its body read": early["after"],
        "Connection: close asked": ["never", "kept"],
        "HTTP/1.0, answered": ["never", "kept"],
        "WebSocket": ["never", "kept"],
    }


@pytest.mark.parametrize("engine", list(ENGINES))
def test_connection_moves_between_engines_with_requests_in_flight(engine):
    """Detach → adopt three times; each time the client's next request (a GET, a POST with a 100 kB body,
    two pipelined GETs) is sent while the connection belongs to neither engine. One TCP connection
    throughout, every request answered by the engine holding it, no descriptor left behind."""
    seen = run_scenario("journey", engine)
    assert seen["answers"] == ["A:/one:0", "B:/two:0", "B:/three:0", "A:/four:100000", "B:/five:0", "B:/six:0",
                               "B:/seven:0"]
    assert seen["connects"] == 1 and seen["same_connection"]
    assert seen["served"] == {"A": 2, "B": 5}  # adopted connections count in the adopter's stats
    assert seen["fds_after"] == seen["fds_before"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_connections_through_the_channel(engine):
    """Over a real socketpair with SCM_RIGHTS: taken and served by the receiver; a receiver that dies
    before acknowledging leaves the connection with the sender, which serves it; a peer without the
    feature (closed, or silent) is detected."""
    seen = run_scenario("channel", engine)
    assert seen["negotiated"] and seen["taken"] == 1 and seen["adopted"] == 1
    assert seen["negotiated with the dying receiver"] and seen["taken by the dying receiver"] == 0
    assert seen["answers"] == ["A:/one:0", "B:/two:0", "B:/three:0"]
    assert seen["connects"] == 1
    assert not seen["negotiated with a closed peer"] and not seen["negotiated with a silent peer"]
    assert seen["fds_after"] == seen["fds_before"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_drain_hands_every_connection_over(engine):
    """A draining engine with two adoption points (a new generation's two workers, the first serving two
    connections already): six idle keep-alive clients move at once, the emptier worker filled first; a busy
    one finishes its request without `Connection: close` and moves; a half-sent request is answered, then
    its connection moves; one that asked for `Connection: close` stays and counts as fallen back; one whose
    client hung up as the drain began is gone, and counts as neither (it failed a recycle test). Every
    client's next request is answered by the new engines on the same connection, and the drain ends as soon
    as nothing is left."""
    seen = run_scenario("drain", engine)
    answers = seen["answers"]
    for index in range(6):
        first, second = answers[f"naive{index}"]
        assert first == "A:/one:0 None" and second.startswith("B") and second.endswith(":/two:0 None")
    assert answers["busy"][0] == "A:/slow:0 None"  # no Connection: close on the handover path
    assert answers["busy"][1].startswith("B")
    assert answers["partial"][0] == "A:/partial:0" and answers["partial"][1].startswith("B")
    assert seen["closing"] == ["A:/slow:0"]
    assert seen["connects"] == 7  # one per http.client client: nobody reconnected
    assert seen["counts"] == {"moved at once": 6, "fell back at once": 1}
    assert (seen["handed_over"], seen["fell_back"]) == (8, 1)
    assert seen["adopted"] == [3, 5]  # each ends serving five
    assert seen["cut"] == 0 and seen["returned_before_deadline"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_idle_connections_move_a_batch_at_a_time(engine):
    """More connections idle at once (as under load, at every loop turn) than two batches are not all detached
    at once: each batch is at most the engine's batch size, and every connection moves, its next request
    answered by the new engine on the same connection."""
    seen = run_scenario("batches", engine)
    count = seen["count"]
    assert seen["first"] == [["A:/one:0"]] * count and seen["second"] == [["B:/two:0"]] * count
    assert sum(seen["sent"]) == count and max(seen["sent"]) <= seen["batch"] < count and len(seen["sent"]) >= 3
    assert (seen["handed_over"], seen["fell_back"], seen["adopted"], seen["cut"]) == (count, 0, count, 0)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_connection_is_held_for_the_new_generation_as_its_response_completes(engine):
    """Under load a connection's next request arrives before the drain's next turn, so a connection read from
    until then stayed for one more request, again and again; held as its response completes, it moves, and
    the next request is the new generation's whenever the drain gets to it."""
    seen = run_scenario("held", engine)
    assert seen["first"] == ["A:/slow:0"] and seen["second"] == ["B:/two:0"], seen
    assert (seen["served_by_a"], seen["handed_over"], seen["fell_back"]) == (1, 1, 0), seen


@pytest.mark.parametrize("engine", list(ENGINES))
def test_idle_connections_move_as_the_drain_begins(engine):
    """The drain's first batch leaves at once; only the old generation's copies of the listeners wait for the
    tick (a connection accepted in the loop's last turn is still being set up), and the drain ends after it."""
    seen = run_scenario("first_batch", engine)
    assert seen["moved_before_the_tick"] and seen["drain_ended_after_the_tick"]
    assert seen["second"] == ["B:/two:0"] * 3


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_connection_held_while_a_batch_is_in_flight_moves_at_once(engine):
    """Under load most connections complete a response while a batch makes its round trip to the new
    generation: each is held then, and the drain sends it right after that batch. (It used to wait for the
    drain's tick: 50 ms in which most of the load's connections waited, at most reloads.)"""
    seen = run_scenario("during_batch", engine)
    assert seen["first"] == ["A:/slow:0"] and seen["second"] == ["B:/two:0"], seen
    assert seen["sent"] == [1, 1] and seen["moved_before_the_tick"], seen
    assert (seen["handed_over"], seen["fell_back"]) == (2, 0), seen


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_worker_drain_ends_once_nothing_is_left_and_waits_for_what_it_accepted(engine):
    """A worker accepts through its own loop, which counts what it accepted and has not set up yet: its drain
    ends as soon as nothing is left, not a tick later (an old worker of a rollout idled 50 ms there, twice per
    reload with two workers, before the next new worker could start), and a connection still being set up as
    the drain begins is waited for and moves too. The tick is made 30 s, beyond the drain's deadline: on the
    code before, the drain ended only at its deadline and the late connection never moved."""
    seen = run_scenario("worker_settle", engine)
    assert seen["first"] == ["A:/one:0"]
    assert seen["second"][0].startswith("B:/two") and seen["second"][1].startswith("B:/two"), seen["second"]
    assert seen["waited_for_pending"]
    assert seen["ended_before_deadline"]
    assert (seen["handed_over"], seen["fell_back"]) == (2, 0)
