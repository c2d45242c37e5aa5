"""The handoff state machine `graceful_http.generation.HandoffMachine`, as tables.

Each row: a starting phase (reached through real events), one event, the
phase after it and the actions it must return (log lines aside, which are
checked only where their wording is part of the contract). A hypothesis test
then throws arbitrary event sequences at it and checks the two rules the
whole design rests on: only the main generation talks to systemd, and at most
one new generation is ever being started.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graceful_http.generation import (
    ArmReadyTimer,
    BecameMain,
    ChildFailed,
    ChildReady,
    ChildStarted,
    HandedOver,
    HandoffMachine,
    HandOver,
    HandOverFailed,
    KillSuccessor,
    Log,
    Notify,
    Outcome,
    Phase,
    ReadyTimedOut,
    ReloadRequested,
    Reply,
    SpawnSuccessor,
    StartDraining,
    StopRequested,
)

PID = 100  # this generation
CHILD = 201  # the successor of attempt 1
TIMEOUT = 5.0
REQUESTER = "requester-A"  # opaque to the machine; a string compares nicely
OTHER = "requester-B"

STATUS = "gen 1 · pid 100 · serving · 0 in flight · 0 requests"
TIMEOUT_REASON = "new generation not ready within 5s (ready timeout)"


def failed_status(reason: str) -> str:
    """STATUS= after a failed reload: the reason first, then the serving status (kept until the next reload)."""
    return f"reload failed: {reason} · {STATUS}"


def machine_in(phase: str) -> HandoffMachine:
    """A generation (gen 1, pid 100) brought to `phase` through real events.

    RELOADING means: reload requested by REQUESTER, attempt 1, child CHILD started.
    RELOADING_UNSTARTED: reload requested, the child's pid not known yet.
    SERVING_AFTER_FAILURE: attempt 1 failed (ready timeout), serving again.
    RELOADING_2: as RELOADING, but for attempt 2 (attempt 1 failed), child 202.
    HANDING_OVER: as RELOADING, and the child reported ready (the supervisor is telling systemd).
    DRAINING: handed over to CHILD.
    """
    m = HandoffMachine(generation=1, pid=PID, ready_timeout=TIMEOUT)
    steps = {
        "STARTING": [],
        "SERVING": [BecameMain(handed_over=False)],
        "RELOADING_UNSTARTED": [BecameMain(False), ReloadRequested("SIGHUP", REQUESTER)],
        "RELOADING": [BecameMain(False), ReloadRequested("SIGHUP", REQUESTER), ChildStarted(1, CHILD)],
        "SERVING_AFTER_FAILURE": [BecameMain(False), ReloadRequested("SIGHUP"), ChildStarted(1, CHILD),
                                  ReadyTimedOut(1)],
        "RELOADING_2": [BecameMain(False), ReloadRequested("SIGHUP"), ChildStarted(1, CHILD), ReadyTimedOut(1),
                        ReloadRequested("SIGHUP", REQUESTER), ChildStarted(2, 202)],
        "HANDING_OVER": [BecameMain(False), ReloadRequested("SIGHUP", REQUESTER), ChildStarted(1, CHILD),
                         ChildReady(1, CHILD)],
        "DRAINING": [BecameMain(False), ReloadRequested("SIGHUP"), ChildStarted(1, CHILD), ChildReady(1, CHILD),
                     HandedOver(1)],
        "STOPPING": [BecameMain(False), StopRequested("SIGTERM")],
        "STOPPING_FROM_STARTING": [StopRequested("SIGTERM")],
    }[phase]
    for event in steps:
        m.handle(event)
    return m


def without_logs(actions):
    return [a for a in actions if not isinstance(a, Log)]


def refused(reason: str, successor: int | None = None) -> list:
    return [Reply(REQUESTER, Outcome("refused", reason, successor))]


# (id, start, event, phase after, actions after removing Log)
TABLE = [
    # -- becoming main
    ("first generation becomes main: READY=1",
     "STARTING", BecameMain(handed_over=False), Phase.SERVING,
     [Notify({"STATUS": STATUS, "READY": 1})]),
    ("successor becomes main: no READY (the old main sent MAINPID+READY)",
     "STARTING", BecameMain(handed_over=True), Phase.SERVING,
     [Notify({"STATUS": STATUS})]),
    ("BecameMain again while serving: ignored",
     "SERVING", BecameMain(handed_over=False), Phase.SERVING, []),
    ("BecameMain while draining: ignored",
     "DRAINING", BecameMain(handed_over=True), Phase.DRAINING, []),
    ("BecameMain after a stop while starting: ignored, stays silent",
     "STOPPING_FROM_STARTING", BecameMain(handed_over=False), Phase.STOPPING, []),

    # -- reload requests
    ("reload while serving: RELOADING=1, spawn, arm the ready timer",
     "SERVING", ReloadRequested("SIGHUP", REQUESTER), Phase.RELOADING,
     [Notify({"RELOADING": 1, "STATUS": "reloading: starting generation 2"}),
      SpawnSuccessor(attempt=1, generation=2),
      ArmReadyTimer(attempt=1, seconds=TIMEOUT)]),
    ("reload after a failed one: attempt 2, same generation number",
     "SERVING_AFTER_FAILURE", ReloadRequested("POST /graceful from 127.0.0.1", REQUESTER), Phase.RELOADING,
     [Notify({"RELOADING": 1, "STATUS": "reloading: starting generation 2"}),
      SpawnSuccessor(attempt=2, generation=2),
      ArmReadyTimer(attempt=2, seconds=TIMEOUT)]),
    ("reload during a reload: refused, names the successor",
     "RELOADING", ReloadRequested("SIGHUP", REQUESTER), Phase.RELOADING,
     refused("reload already in progress", CHILD)),
    ("reload during a reload whose child has no pid yet: refused",
     "RELOADING_UNSTARTED", ReloadRequested("SIGHUP", REQUESTER), Phase.RELOADING,
     refused("reload already in progress", None)),
    ("reload during a reload, no requester (SIGHUP): refused silently",
     "RELOADING", ReloadRequested("SIGHUP"), Phase.RELOADING, []),
    ("reload during a handover: refused",
     "HANDING_OVER", ReloadRequested("SIGHUP", REQUESTER), Phase.HANDING_OVER,
     refused("reload already in progress", CHILD)),
    ("reload while starting: refused",
     "STARTING", ReloadRequested("SIGHUP", REQUESTER), Phase.STARTING,
     refused(f"this generation (pid {PID}) is still starting")),
    ("reload while draining: refused",
     "DRAINING", ReloadRequested("SIGHUP", REQUESTER), Phase.DRAINING,
     refused(f"this generation (pid {PID}) has handed over and is draining")),
    ("reload while stopping: refused",
     "STOPPING", ReloadRequested("SIGHUP", REQUESTER), Phase.STOPPING,
     refused("the service is stopping")),

    # -- the successor's progress, current attempt
    ("child started: STATUS, requester told 'started'",
     "RELOADING_UNSTARTED", ChildStarted(1, CHILD), Phase.RELOADING,
     [Notify({"STATUS": f"reloading: starting pid {CHILD}"}),
      Reply(REQUESTER, Outcome("started", f"reloading: starting pid {CHILD}", CHILD))]),
    ("child ready: hand over (and nothing else until systemd confirmed)",
     "RELOADING", ChildReady(1, CHILD), Phase.HANDING_OVER,
     [HandOver(attempt=1, pid=CHILD, generation=2)]),
    ("child ready before its pid was reported: hand over to the pid it reports",
     "RELOADING_UNSTARTED", ChildReady(1, CHILD), Phase.HANDING_OVER,
     [HandOver(attempt=1, pid=CHILD, generation=2)]),
    ("handed over: reply done, then drain",
     "HANDING_OVER", HandedOver(1), Phase.DRAINING,
     [Reply(REQUESTER, Outcome("done", f"generation 2 (pid {CHILD}) is serving", CHILD)),
      StartDraining(f"handed over to pid {CHILD}")]),
    ("handover failed (the child died meanwhile): kill, reclaim MAINPID, READY=1, reply failed",
     "HANDING_OVER", HandOverFailed(1, "new generation (pid 201) exited during the handover"), Phase.SERVING,
     [KillSuccessor(1, CHILD),
      Notify({"READY": 1, "STATUS": failed_status("new generation (pid 201) exited during the handover"),
              "MAINPID": PID}),
      Reply(REQUESTER, Outcome("failed", "new generation (pid 201) exited during the handover", PID))]),
    ("child failure reported during the handover: ignored (the handover decides)",
     "HANDING_OVER", ChildFailed(1, "x"), Phase.HANDING_OVER, []),
    ("ready timeout during the handover: ignored",
     "HANDING_OVER", ReadyTimedOut(1), Phase.HANDING_OVER, []),
    ("child failed: kill it, READY=1 + STATUS, reply failed, serve on",
     "RELOADING", ChildFailed(1, "importing 'app' raised RuntimeError: boom"), Phase.SERVING,
     [KillSuccessor(1, CHILD),
      Notify({"READY": 1, "STATUS": failed_status("importing 'app' raised RuntimeError: boom")}),
      Reply(REQUESTER, Outcome("failed", "importing 'app' raised RuntimeError: boom", PID))]),
    ("ready timeout: kill it, READY=1 + STATUS, reply failed, serve on",
     "RELOADING", ReadyTimedOut(1), Phase.SERVING,
     [KillSuccessor(1, CHILD),
      Notify({"READY": 1, "STATUS": failed_status(TIMEOUT_REASON)}),
      Reply(REQUESTER, Outcome("failed", TIMEOUT_REASON, PID))]),
    ("ready timeout before the child's pid is known: kill by attempt",
     "RELOADING_UNSTARTED", ReadyTimedOut(1), Phase.SERVING,
     [KillSuccessor(1, None),
      Notify({"READY": 1, "STATUS": failed_status(TIMEOUT_REASON)}),
      Reply(REQUESTER, Outcome("failed", TIMEOUT_REASON, PID))]),
    ("attempt 2 fails: kills attempt 2's child",
     "RELOADING_2", ChildFailed(2, "exited"), Phase.SERVING,
     [KillSuccessor(2, 202), Notify({"READY": 1, "STATUS": failed_status("exited")}),
      Reply(REQUESTER, Outcome("failed", "exited", PID))]),

    # -- the successor's progress, stale attempts
    ("stale ChildStarted during attempt 2: kill that child only",
     "RELOADING_2", ChildStarted(1, 301), Phase.RELOADING, [KillSuccessor(1, 301)]),
    ("stale ChildReady during attempt 2: kill it, no handover",
     "RELOADING_2", ChildReady(1, CHILD), Phase.RELOADING, [KillSuccessor(1, CHILD)]),
    ("stale ChildFailed during attempt 2: ignored",
     "RELOADING_2", ChildFailed(1, "late news"), Phase.RELOADING, []),
    ("stale ReadyTimedOut during attempt 2: ignored",
     "RELOADING_2", ReadyTimedOut(1), Phase.RELOADING, []),
    ("ChildStarted after the attempt failed: kill it",
     "SERVING_AFTER_FAILURE", ChildStarted(1, CHILD), Phase.SERVING, [KillSuccessor(1, CHILD)]),
    ("ChildReady after the attempt failed (too late): kill it, no handover",
     "SERVING_AFTER_FAILURE", ChildReady(1, CHILD), Phase.SERVING, [KillSuccessor(1, CHILD)]),
    ("ChildFailed after the attempt failed: ignored",
     "SERVING_AFTER_FAILURE", ChildFailed(1, "x"), Phase.SERVING, []),
    ("ReadyTimedOut after handover (the timer is never cancelled): ignored",
     "DRAINING", ReadyTimedOut(1), Phase.DRAINING, []),
    ("HandedOver for another attempt: ignored",
     "HANDING_OVER", HandedOver(2), Phase.HANDING_OVER, []),
    ("HandedOver while not handing over: ignored",
     "RELOADING", HandedOver(1), Phase.RELOADING, []),
    ("HandedOver again after the handover: ignored",
     "DRAINING", HandedOver(1), Phase.DRAINING, []),
    ("HandOverFailed for another attempt: ignored",
     "HANDING_OVER", HandOverFailed(2, "x"), Phase.HANDING_OVER, []),
    ("HandOverFailed while serving: ignored",
     "SERVING_AFTER_FAILURE", HandOverFailed(1, "x"), Phase.SERVING, []),
    ("ChildReady for a future attempt: kill it",
     "RELOADING", ChildReady(7, 777), Phase.RELOADING, [KillSuccessor(7, 777)]),

    # -- stopping
    ("stop while serving: STOPPING=1, drain",
     "SERVING", StopRequested("SIGTERM"), Phase.STOPPING,
     [Notify({"STOPPING": 1, "STATUS": "stopping: finishing in-flight requests"}),
      StartDraining("SIGTERM received")]),
    ("stop while reloading: kill the child, fail the requester, STOPPING=1, drain",
     "RELOADING", StopRequested("SIGTERM"), Phase.STOPPING,
     [KillSuccessor(1, CHILD),
      Reply(REQUESTER, Outcome("failed", "the service is stopping", PID)),
      Notify({"STOPPING": 1, "STATUS": "stopping: finishing in-flight requests"}),
      StartDraining("SIGTERM received")]),
    ("stop during a handover: kill the child, fail the requester, STOPPING=1, drain",
     "HANDING_OVER", StopRequested("SIGTERM"), Phase.STOPPING,
     [KillSuccessor(1, CHILD),
      Reply(REQUESTER, Outcome("failed", "the service is stopping", PID)),
      Notify({"STOPPING": 1, "STATUS": "stopping: finishing in-flight requests"}),
      StartDraining("SIGTERM received")]),
    ("stop while starting: drain without a word to systemd",
     "STARTING", StopRequested("SIGINT"), Phase.STOPPING, [StartDraining("SIGINT received")]),
    ("stop while draining: nothing more to do",
     "DRAINING", StopRequested("SIGTERM"), Phase.DRAINING, []),
    ("stop while stopping: nothing more to do",
     "STOPPING", StopRequested("SIGINT"), Phase.STOPPING, []),
]


@pytest.mark.parametrize("start, event, phase, expected", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_transition(start, event, phase, expected):
    m = machine_in(start)
    actions = m.handle(event)
    assert without_logs(actions) == expected
    assert m.phase is phase
    assert all(isinstance(a, Log) for a in actions if a not in expected), actions


def test_every_reload_request_is_logged_with_its_source():
    m = machine_in("SERVING")
    logs = [a for a in m.handle(ReloadRequested("POST /graceful from 127.0.0.1")) if isinstance(a, Log)]
    assert [log.message for log in logs] == ["reload requested by POST /graceful from 127.0.0.1: starting generation 2"]


def test_refusal_during_reload_is_a_logged_warning_and_never_a_second_spawn():
    m = machine_in("RELOADING")
    for source in ("SIGHUP", "POST /graceful from 127.0.0.1", "graceful-http reload"):
        actions = m.handle(ReloadRequested(source, OTHER))
        assert not any(isinstance(a, (SpawnSuccessor, ArmReadyTimer, Notify, KillSuccessor)) for a in actions)
        assert Log(f"reload requested by {source} refused: reload already in progress", "warning") in actions
        assert Reply(OTHER, Outcome("refused", "reload already in progress", CHILD)) in actions
    # the reload under way is untouched: its requester still hears "done"
    assert without_logs(m.handle(ChildReady(1, CHILD))) == [HandOver(attempt=1, pid=CHILD, generation=2)]
    actions = m.handle(ReloadRequested("SIGHUP", OTHER))  # still refused while systemd is being told
    assert Reply(OTHER, Outcome("refused", "reload already in progress", CHILD)) in actions
    actions = m.handle(HandedOver(1))
    assert [a.requester for a in actions if isinstance(a, Reply)] == [REQUESTER]


def test_handover_then_confirmation_then_draining_last():
    m = machine_in("RELOADING")
    assert m.handle(ChildReady(1, CHILD)) == [HandOver(attempt=1, pid=CHILD, generation=2)]
    assert m.is_main  # until systemd has processed MAINPID=
    actions = m.handle(HandedOver(1))
    assert isinstance(actions[-1], StartDraining)
    assert Log(f"handed over to pid {CHILD} (generation 2)") in actions
    assert not any(isinstance(a, Notify) for a in actions)  # the HandOver carried MAINPID+READY
    assert not m.is_main


def test_reload_failure_is_logged_as_an_error_naming_the_reason():
    actions = machine_in("RELOADING").handle(ChildFailed(1, "boom"))
    errors = [a for a in actions if isinstance(a, Log) and a.level == "error"]
    assert errors == [Log(f"reload failed: boom; generation 1 (pid {PID}) keeps serving", "error")]
    assert actions[0] == KillSuccessor(1, CHILD)  # the bad child goes before anything is announced


ALL_EVENTS = [
    BecameMain(False), BecameMain(True),
    ReloadRequested("SIGHUP"), ReloadRequested("SIGHUP", OTHER),
    ChildStarted(1, CHILD), ChildStarted(2, 202), ChildReady(1, CHILD), ChildReady(2, 202),
    ChildFailed(1, "x"), ChildFailed(2, "x"), ReadyTimedOut(1), ReadyTimedOut(2),
    HandedOver(1), HandedOver(2), HandOverFailed(1, "x"), HandOverFailed(2, "x"),
    StopRequested("SIGTERM"), StopRequested("SIGINT"),
]


@pytest.mark.parametrize("start", ["DRAINING", "STOPPING", "STOPPING_FROM_STARTING"])
def test_after_handover_or_stop_never_a_notify_nor_a_spawn(start):
    m = machine_in(start)
    phase = m.phase
    for event in ALL_EVENTS * 2:
        actions = m.handle(event)
        assert not any(isinstance(a, (Notify, SpawnSuccessor, HandOver, StartDraining)) for a in actions), (event, actions)
        assert m.phase is phase  # terminal


def test_a_reload_after_a_failed_one_works_end_to_end():
    m = machine_in("SERVING")
    m.handle(ReloadRequested("SIGHUP"))
    m.handle(ChildStarted(1, CHILD))
    failed = m.handle(ChildFailed(1, "boom"))
    assert Notify({"READY": 1, "STATUS": failed_status("boom")}) in failed
    assert m.phase is Phase.SERVING and m.is_main
    assert m.serving_status(2, 10).startswith("reload failed: boom · gen 1 · pid 100 · serving · 2 in flight")

    again = m.handle(ReloadRequested("graceful-http reload", REQUESTER))
    assert not m.serving_status().startswith("reload failed")  # a new reload clears the old failure
    assert SpawnSuccessor(attempt=2, generation=2) in again
    assert ArmReadyTimer(attempt=2, seconds=TIMEOUT) in again
    m.handle(ChildStarted(2, 202))
    assert m.handle(ReadyTimedOut(1)) == []  # attempt 1's timer fires late: ignored
    assert m.handle(ChildReady(2, 202)) == [HandOver(attempt=2, pid=202, generation=2)]
    assert m.handle(HandedOver(1)) == []  # not this attempt's handover
    done = m.handle(HandedOver(2))
    assert Reply(REQUESTER, Outcome("done", "generation 2 (pid 202) is serving", 202)) in done
    assert m.phase is Phase.DRAINING and not m.is_main


def test_is_main_only_while_serving_or_reloading():
    assert not machine_in("STARTING").is_main
    assert machine_in("SERVING").is_main
    assert machine_in("RELOADING").is_main
    assert machine_in("HANDING_OVER").is_main
    assert not machine_in("DRAINING").is_main
    assert not machine_in("STOPPING").is_main


# ---- properties over arbitrary event sequences ------------------------------

attempts = st.integers(min_value=0, max_value=4)
pids = st.integers(min_value=2, max_value=9)
events = st.one_of(
    st.builds(BecameMain, handed_over=st.booleans()),
    st.builds(ReloadRequested, source=st.sampled_from(["SIGHUP", "POST /graceful", "cli"]),
              requester=st.one_of(st.none(), st.just("fresh"))),
    st.builds(ChildStarted, attempt=attempts, pid=pids),
    st.builds(ChildReady, attempt=attempts, pid=pids),
    st.builds(ChildFailed, attempt=attempts, reason=st.just("boom")),
    st.builds(ReadyTimedOut, attempt=attempts),
    st.builds(HandedOver, attempt=attempts),
    st.builds(HandOverFailed, attempt=attempts, reason=st.just("gone")),
    st.builds(StopRequested, source=st.sampled_from(["SIGTERM", "SIGINT"])),
)
MAIN_PHASES = (Phase.SERVING, Phase.RELOADING, Phase.HANDING_OVER)
RELOAD_PHASES = (Phase.RELOADING, Phase.HANDING_OVER)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, max_size=40))
def test_only_the_main_generation_notifies_and_one_spawn_at_a_time(sequence):
    m = HandoffMachine(generation=3, pid=PID, ready_timeout=TIMEOUT)
    outstanding: int | None = None  # the attempt spawned and not yet killed nor confirmed as the new main
    spawned: list[int] = []
    finals: dict[object, int] = {}  # requester -> final replies (done/failed/refused)
    current_requester = None
    for index, event in enumerate(sequence):
        if isinstance(event, ReloadRequested) and event.requester is not None:
            event = ReloadRequested(event.source, f"req-{index}")  # every requester distinct
        before = m.phase
        actions = m.handle(event)
        after = m.phase

        notifies = [a for a in actions if isinstance(a, Notify)]
        if before not in MAIN_PHASES:
            # the only Notify a non-main generation may send is the one that makes it main
            assert not notifies or (isinstance(event, BecameMain) and before is Phase.STARTING
                                    and after is Phase.SERVING), (before, event, actions)
        if before in (Phase.DRAINING, Phase.STOPPING):
            assert after is before and not notifies
        if isinstance(event, BecameMain) and event.handed_over:
            assert all("READY" not in n.fields for n in notifies)
        for n in notifies:  # a generation only ever names itself as the main pid
            assert n.fields.get("MAINPID", PID) == PID, (event, actions)

        for action in actions:
            if isinstance(action, SpawnSuccessor):
                assert outstanding is None, f"second SpawnSuccessor while attempt {outstanding} is outstanding"
                assert before not in RELOAD_PHASES
                assert action.attempt not in spawned and all(action.attempt > a for a in spawned)
                outstanding = action.attempt
                spawned.append(action.attempt)
            elif isinstance(action, HandOver):
                assert before is Phase.RELOADING and action.attempt == outstanding
            elif isinstance(action, Reply) and action.outcome.code in ("done", "failed", "refused"):
                finals[action.requester] = finals.get(action.requester, 0) + 1
        if before in RELOAD_PHASES and after not in RELOAD_PHASES:
            if after is Phase.DRAINING:  # confirmed as the new main: not ours to kill any more
                assert isinstance(event, HandedOver) and event.attempt == outstanding
            else:  # a reload that ends any other way takes its child with it
                assert any(isinstance(a, KillSuccessor) and a.attempt == outstanding for a in actions), actions
            outstanding = None
        assert (m.phase in RELOAD_PHASES) == (outstanding is not None), (before, event, actions, outstanding)
        if isinstance(event, ReloadRequested) and event.requester is not None and m.phase is Phase.RELOADING \
                and before is not Phase.RELOADING:
            current_requester = event.requester

    assert all(count == 1 for count in finals.values()), finals  # nobody is answered twice
    for index, event in enumerate(sequence):  # everybody who asked got an answer, unless still waiting
        requester = f"req-{index}"
        if isinstance(event, ReloadRequested) and event.requester is not None:
            if not (m.phase in RELOAD_PHASES and requester == current_requester):
                assert finals.get(requester) == 1, (requester, finals)


def test_serving_status_counts_adopted_connections_only_when_there_are_some():
    m = machine_in("SERVING")
    assert m.serving_status(0, 7, 0) == "gen 1 · pid 100 · serving · 0 in flight · 7 requests"
    assert m.serving_status(1, 7, 12) == "gen 1 · pid 100 · serving · 1 in flight · 7 requests · 12 connections adopted"
    m.traffic = (0, 3, 5)
    assert m.serving_status().endswith("· 3 requests · 5 connections adopted")
