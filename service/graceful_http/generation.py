"""The handoff state machine of one generation: events in, actions out.

Pure: no I/O, no clock, no processes. The supervisor feeds it events (a
reload request, the new generation's readiness or failure, a timeout, a stop
signal) and carries out the actions it returns, in order. Keeping every
decision here makes the rules testable as a table:

* one reload at a time: a request during a reload is refused, never stacked;
* only the main generation talks to systemd, so a generation that has handed
  over (or is stopping) never emits a Notify;
* a new generation that fails or is late is killed and the old one carries on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from graceful_http.wire import Outcome  # what a reload requester is told


class Phase(enum.Enum):
    STARTING = "starting"  # accepting, but not (yet) the main process: must not talk to systemd
    SERVING = "serving"  # main, accepting, no reload under way
    RELOADING = "reloading"  # main, a new generation is starting
    HANDING_OVER = "handing over"  # the new generation is ready; systemd is being told
    DRAINING = "draining"  # handed over: finishing what clients started
    STOPPING = "stopping"  # asked to stop: finishing what clients started


# ---- events -----------------------------------------------------------------


@dataclass(frozen=True)
class ReloadRequested:
    source: str  # "SIGHUP", "POST /graceful from 127.0.0.1", "graceful-http reload"
    requester: object | None = None  # who wants the outcome (opaque to us)
    canary: float | None = None  # seconds, if the requester asked for a canary (else the service's setting)


@dataclass(frozen=True)
class ChildStarted:
    attempt: int
    pid: int


@dataclass(frozen=True)
class ChildReady:
    attempt: int
    pid: int


@dataclass(frozen=True)
class ChildFailed:
    attempt: int
    reason: str


@dataclass(frozen=True)
class ReadyTimedOut:
    attempt: int


@dataclass(frozen=True)
class StopRequested:
    source: str


@dataclass(frozen=True)
class HandedOver:
    """systemd has processed MAINPID=<successor>, and the successor has confirmed it serves as main."""

    attempt: int


@dataclass(frozen=True)
class HandOverFailed:
    attempt: int
    reason: str


@dataclass(frozen=True)
class RolloutStarted:
    """Our workers replace the previous generation's one by one (`rollout`, whose `progress()` the status
    shows): a reload asked for meanwhile waits until RolloutEnded."""

    rollout: object


@dataclass(frozen=True)
class RolloutEnded:
    """Every worker of this generation serves (or the rollout stopped): reloads may start again."""


@dataclass(frozen=True)
class BecameMain:
    """This generation accepts connections and is (now) the main process."""

    handed_over: bool  # True when a previous generation made us main; False for the first


Event = (BecameMain | HandedOver | HandOverFailed | ReloadRequested | ChildStarted | ChildReady | ChildFailed
         | ReadyTimedOut | StopRequested | RolloutStarted | RolloutEnded)


# ---- actions ----------------------------------------------------------------


@dataclass(frozen=True)
class Notify:
    fields: dict


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


@dataclass(frozen=True)
class SpawnSuccessor:
    attempt: int
    generation: int
    canary: float | None = None


@dataclass(frozen=True)
class ArmReadyTimer:
    attempt: int
    seconds: float


@dataclass(frozen=True)
class KillSuccessor:
    attempt: int
    pid: int | None


@dataclass(frozen=True)
class HandOver:
    """Make `pid` the main process (MAINPID+READY, barrier), then tell it so.

    The supervisor answers with HandedOver once the successor confirms it
    serves as main, or HandOverFailed if the successor died meanwhile.
    """

    attempt: int
    pid: int
    generation: int


@dataclass(frozen=True)
class Reply:
    requester: object
    outcome: "Outcome"


@dataclass(frozen=True)
class StartDraining:
    reason: str


Action = Notify | Log | SpawnSuccessor | ArmReadyTimer | KillSuccessor | HandOver | Reply | StartDraining


# ---- the machine --------------------------------------------------------------


@dataclass(frozen=True)
class State:
    phase: Phase
    generation: int
    attempt: int = 0
    successor_pid: int | None = None
    requesters: tuple = field(default_factory=tuple)
    last_failure: str | None = None  # shown in STATUS= until the next reload
    deferred: tuple = field(default_factory=tuple)  # reload requests waiting for our workers' rollout to end


class HandoffMachine:
    """One generation's handoff decisions. `handle(event)` returns the actions to carry out."""

    def __init__(self, generation: int, pid: int, ready_timeout: float):
        self.pid = pid
        self.ready_timeout = ready_timeout
        self.state = State(phase=Phase.STARTING, generation=generation)
        self.traffic = (0, 0, 0)  # (in flight, requests served, connections adopted), kept current for STATUS=
        self.rolling_out = None  # while our workers replace the previous generation's: the rollout (`progress()`)

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def is_main(self) -> bool:
        return self.state.phase in (Phase.SERVING, Phase.RELOADING, Phase.HANDING_OVER)

    def handle(self, event: Event) -> list[Action]:
        handler = getattr(self, "_on_" + type(event).__name__)
        return handler(event)

    def serving_status(self, in_flight: int | None = None, total: int | None = None, adopted: int | None = None) -> str:
        if in_flight is None:
            in_flight = self.traffic[0]
        if total is None:
            total = self.traffic[1]
        if adopted is None:
            adopted = self.traffic[2]
        status = f"gen {self.state.generation} · pid {self.pid} · serving · {in_flight} in flight · {total} requests"
        if adopted:  # keep-alive connections taken over from the previous generation
            status += f" · {adopted} connections adopted"
        if self.rolling_out is not None:
            status += f" · {self.rolling_out.progress()}"
        if self.state.last_failure:
            status = f"reload failed: {self.state.last_failure} · {status}"
        return status

    def _on_BecameMain(self, event: BecameMain) -> list[Action]:
        if self.state.phase is not Phase.STARTING:
            return []
        self.state = replace(self.state, phase=Phase.SERVING)
        fields: dict = {"STATUS": self.serving_status()}
        if not event.handed_over:
            fields["READY"] = 1  # a handover's READY=1 came with MAINPID= from the old main
        how = "took over as main" if event.handed_over else "ready"
        return [Log(f"{how}: generation {self.state.generation} (pid {self.pid}) serving"), Notify(fields)]

    # -- reload requests

    def _on_ReloadRequested(self, event: ReloadRequested) -> list[Action]:
        s = self.state
        if s.phase is Phase.STARTING:
            return self._refuse(event, f"this generation (pid {self.pid}) is still starting")
        if s.phase in (Phase.RELOADING, Phase.HANDING_OVER):
            return self._refuse(event, "reload already in progress", successor=s.successor_pid)
        if s.phase is Phase.DRAINING:
            return self._refuse(event, f"this generation (pid {self.pid}) has handed over and is draining")
        if s.phase is Phase.STOPPING:
            return self._refuse(event, "the service is stopping")
        if self.rolling_out is not None:  # systemd has heard the last reload is done: this one waits its turn
            self.state = replace(s, deferred=(*s.deferred, event))
            waiting = "waits until this generation's workers have replaced the previous one's"
            actions: list[Action] = [Log(f"reload requested by {event.source}: {waiting}")]
            if event.requester is not None:
                actions.append(Reply(event.requester, Outcome("started", f"the reload {waiting}")))
            return actions
        return self._start_reload(event.source, (event.requester,) if event.requester is not None else (),
                                  event.canary)

    def _start_reload(self, source: str, requesters: tuple, canary: float | None) -> list[Action]:
        s = self.state
        attempt = s.attempt + 1
        successor = s.generation + 1
        self.state = replace(s, phase=Phase.RELOADING, attempt=attempt, successor_pid=None, requesters=requesters,
                             last_failure=None)
        return [
            Log(f"reload requested by {source}: starting generation {successor}"),
            Notify({"RELOADING": 1, "STATUS": f"reloading: starting generation {successor}"}),
            SpawnSuccessor(attempt=attempt, generation=successor, canary=canary),
            ArmReadyTimer(attempt=attempt, seconds=self.ready_timeout),
        ]

    def _on_RolloutStarted(self, event: RolloutStarted) -> list[Action]:
        self.rolling_out = event.rollout
        return []

    def _on_RolloutEnded(self, event: RolloutEnded) -> list[Action]:
        self.rolling_out = None
        deferred, self.state = self.state.deferred, replace(self.state, deferred=())
        if not deferred or self.state.phase is not Phase.SERVING:
            return []
        sources = " and ".join(dict.fromkeys(request.source for request in deferred))  # one reload serves them all
        return self._start_reload(sources, tuple(r.requester for r in deferred if r.requester is not None),
                                  next((r.canary for r in deferred if r.canary is not None), None))

    def _refuse(self, event: ReloadRequested, reason: str, successor: int | None = None) -> list[Action]:
        actions: list[Action] = [Log(f"reload requested by {event.source} refused: {reason}", "warning")]
        if event.requester is not None:
            actions.append(Reply(event.requester, Outcome("refused", reason, successor)))
        return actions

    # -- the successor's progress

    def _already_handed(self, attempt: int) -> bool:
        """An event about the successor we are handing (or have handed) over to: never kill it."""
        return attempt == self.state.attempt and self.state.phase in (Phase.HANDING_OVER, Phase.DRAINING)

    def _current(self, attempt: int) -> bool:
        return self.state.phase is Phase.RELOADING and attempt == self.state.attempt

    def _on_ChildStarted(self, event: ChildStarted) -> list[Action]:
        if self._already_handed(event.attempt):
            return []
        if not self._current(event.attempt):
            return [KillSuccessor(event.attempt, event.pid)]
        s = self.state
        self.state = replace(s, successor_pid=event.pid)
        status = f"reloading: starting pid {event.pid}"
        return [
            Log(f"generation {s.generation + 1} started as pid {event.pid}"),
            Notify({"STATUS": status}),
            *[Reply(r, Outcome("started", status, event.pid)) for r in s.requesters],
        ]

    def _on_ChildReady(self, event: ChildReady) -> list[Action]:
        if self._already_handed(event.attempt):
            return []
        if not self._current(event.attempt):
            return [KillSuccessor(event.attempt, event.pid)]
        s = self.state
        self.state = replace(s, phase=Phase.HANDING_OVER, successor_pid=event.pid)
        return [HandOver(attempt=s.attempt, pid=event.pid, generation=s.generation + 1)]

    def _on_HandedOver(self, event: HandedOver) -> list[Action]:
        s = self.state
        if s.phase is not Phase.HANDING_OVER or event.attempt != s.attempt:
            return []
        successor = s.generation + 1
        self.state = replace(s, phase=Phase.DRAINING, requesters=())
        detail = f"generation {successor} (pid {s.successor_pid}) is serving"
        return [
            Log(f"handed over to pid {s.successor_pid} (generation {successor})"),
            *[Reply(r, Outcome("done", detail, s.successor_pid)) for r in s.requesters],
            StartDraining(f"handed over to pid {s.successor_pid}"),
        ]

    def _on_HandOverFailed(self, event: HandOverFailed) -> list[Action]:
        s = self.state
        if s.phase is not Phase.HANDING_OVER or event.attempt != s.attempt:
            return []
        # systemd may have switched MAINPID to the dead successor: claim it back.
        return self._fail(event.reason, reclaim=True)

    def _on_ChildFailed(self, event: ChildFailed) -> list[Action]:
        if not self._current(event.attempt):
            return []
        return self._fail(event.reason)

    def _on_ReadyTimedOut(self, event: ReadyTimedOut) -> list[Action]:
        if not self._current(event.attempt):
            return []
        return self._fail(f"new generation not ready within {self.ready_timeout:g}s (ready timeout)")

    def _fail(self, reason: str, reclaim: bool = False) -> list[Action]:
        s = self.state
        self.state = replace(s, phase=Phase.SERVING, successor_pid=None, requesters=(), last_failure=reason)
        fields: dict = {"READY": 1, "STATUS": self.serving_status()}
        if reclaim:
            fields["MAINPID"] = self.pid
        return [
            KillSuccessor(s.attempt, s.successor_pid),
            Log(f"reload failed: {reason}; generation {s.generation} (pid {self.pid}) keeps serving", "error"),
            Notify(fields),
            *[Reply(r, Outcome("failed", reason, self.pid)) for r in s.requesters],
        ]

    # -- stopping

    def _on_StopRequested(self, event: StopRequested) -> list[Action]:
        s = self.state
        if s.phase in (Phase.DRAINING, Phase.STOPPING):
            return [Log(f"{event.source} received while {s.phase.value}: already finishing in-flight requests")]
        if s.phase is Phase.STARTING:  # not main: systemd must not hear from us
            self.state = replace(s, phase=Phase.STOPPING)
            return [Log(f"{event.source} received while starting: stopping"), StartDraining(f"{event.source} received")]
        actions: list[Action] = []
        if s.phase in (Phase.RELOADING, Phase.HANDING_OVER):
            actions.append(KillSuccessor(s.attempt, s.successor_pid))
            actions += [Reply(r, Outcome("failed", "the service is stopping", self.pid)) for r in s.requesters]
        actions += [Reply(r.requester, Outcome("failed", "the service is stopping", self.pid)) for r in s.deferred
                    if r.requester is not None]
        self.state = replace(s, phase=Phase.STOPPING, successor_pid=None, requesters=(), deferred=())
        return actions + [
            Log(f"{event.source} received: stopping, finishing in-flight requests"),
            Notify({"STOPPING": 1, "STATUS": "stopping: finishing in-flight requests"}),
            StartDraining(f"{event.source} received"),
        ]
