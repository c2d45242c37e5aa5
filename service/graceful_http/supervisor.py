"""One generation's main: carry out the handoff state machine's actions, one event at a time.

The state machine (`generation.HandoffMachine`) decides; the supervisor turns every input into an event and
every action into a call on its ports (start a successor, sd_notify, a timer, the pid file, the control
socket), which are injected, so that whole reloads are tested in-process with fakes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from graceful_http import generation as g
from graceful_http.control import ControlState
from graceful_http.pidfd import inode_id
from graceful_http.serving import Servers, connect_successor, drain_and_shut_down, stop_accepting
from graceful_http.spawn import kill_group
from graceful_http.status import StatusReporter
from graceful_http.successor import Successor
from graceful_http.websocket_drain import GOING_AWAY, SERVICE_RESTART

log = logging.getLogger("graceful_http")

FRESH_COUNTS_TIMEOUT = 1.0  # s: a canary's workers report every 0.25 s; one that does not is not waited for


@dataclass
class Ports:
    """What the supervisor does to the world besides serving."""

    start_successor: Callable[[int, int], Awaitable[Successor]]  # (attempt, generation) -> started; raises OSError
    notifier: Any  # sdnotify.Notifier: send(**fields), barrier(), enabled
    control_server: Callable[[Callable], Any]  # (start_reload) -> controlsocket.ControlServer
    wait_until_reaped: Callable[[int], bool]  # blocks until systemd (PID 1) has reaped an exited pid
    call_later: Callable[..., Any]  # (seconds, callback, *args): the event loop's
    pid_file: Any = None  # pidfile.PidFile, or None
    watchdog: float | None = None  # seconds between WATCHDOG=1, if systemd wants them


class Supervisor:
    def __init__(self, machine: g.HandoffMachine, ports: Ports, graceful_timeout: float, metrics=None):
        self.machine = machine
        self.ports = ports
        self.graceful_timeout = graceful_timeout
        self.metrics = metrics  # counts reloads here; with workers, they serve the scrapes
        self.control = ControlState(request_reload=self.request_reload_now)
        self.control_server = ports.control_server(self.start_reload)
        self.servers = Servers()
        self.successor: Successor | None = None
        self.status = StatusReporter(ports.notifier, self._serving_status, ports.watchdog)
        self.finished = asyncio.Event()
        self._events: collections.deque = collections.deque()
        self._dispatching = False
        self._tasks: dict[str, asyncio.Task] = {}  # kept: the loop holds tasks only weakly
        self.adoption = None  # handover.AdoptionPoint: where we take the previous generation's connections
        self._moving_to: int | None = None  # the successor our connections move to, once handed over
        self.fd_store = None  # fdstore_systemd.ConnectionStore: idle connections kept in systemd's fd store
        self.canary = 0.0  # seconds of canary before a handoff (see `canary`), unless a reload request asks
        self._canary_now = 0.0  # this reload's, until judged

    async def become_main(self, handed_over: bool) -> bool:
        """Serving, and main now (made main by a predecessor, or the first): False if stopped meanwhile."""
        if self.machine.phase is not g.Phase.STARTING:
            return False
        if self.ports.pid_file and not handed_over:  # after a handover, the old main writes it
            self.ports.pid_file.write(self.machine.pid)
        try:
            await self.control_server.start(self.machine.pid)
        except OSError as exc:
            log.warning("no control socket for `graceful-http reload` (%s); SIGHUP still reloads", exc)
        self.dispatch(g.BecameMain(handed_over=handed_over))
        self.status.start()
        return True

    def dispatch(self, event: g.Event) -> None:
        """Handle `event` and everything it causes, one event at a time."""
        self._events.append(event)
        if self._dispatching:
            return
        self.machine.traffic = (self.servers.in_flight(), self.servers.total_requests,  # for a STATUS= this event
                                self.servers.adopted)  # may send
        self._dispatching = True
        try:
            while self._events:
                event = self._events.popleft()
                before = self.machine.phase
                for action in self.machine.handle(event):
                    getattr(self, "_do_" + type(action).__name__)(action)
                if self.metrics is not None:
                    self.metrics.count_reloads(event, before, self.machine.phase)
        finally:
            self._dispatching = False

    def request_reload_now(self, source: str) -> g.Outcome:
        """For `POST /graceful`: start a reload and say at once whether it started."""
        replies: list[g.Outcome] = []
        self.dispatch(g.ReloadRequested(source, requester=replies.append))
        if replies:
            return replies[0]
        return g.Outcome("started", f"reload started: generation {self.machine.state.generation + 1}")

    def start_reload(self, source: str, on_outcome, canary: float | None = None) -> None:
        """For `graceful-http reload`: start a reload (with a canary of `canary` seconds, if given);
        `on_outcome` hears progress and the end."""
        self.dispatch(g.ReloadRequested(source, requester=on_outcome, canary=canary))

    def counts(self) -> tuple[int, int]:
        """(requests answered, of which failed: 5xx or the app raised), for a canary."""
        server = self.servers[0] if self.servers else None
        failed = server.failed if hasattr(server, "failed") else self.control.failed
        return self.servers.total_requests, failed

    async def _fresh_counts(self) -> None:
        """Our workers' counts arrive every stats interval: wait for the next ones (an engine's are its own)."""
        server = self.servers[0] if self.servers else None
        if hasattr(server, "next_reports"):
            await server.next_reports(FRESH_COUNTS_TIMEOUT)

    def _do_Log(self, action: g.Log) -> None:
        log.log(logging.getLevelName(action.level.upper()), "%s", action.message)

    def _do_Notify(self, action: g.Notify) -> None:
        self.status.send(**action.fields)

    def _do_Reply(self, action: g.Reply) -> None:
        action.requester(action.outcome)

    def _do_SpawnSuccessor(self, action: g.SpawnSuccessor) -> None:
        self._canary_now = self.canary if action.canary is None else action.canary
        self._run("spawn", self._spawn(action))

    async def _spawn(self, action: g.SpawnSuccessor) -> None:
        """Start it without holding up the event loop; a stop meanwhile kills it as soon as its pid is known."""
        try:
            successor = await self.ports.start_successor(action.attempt, action.generation)
        except OSError as exc:
            self.dispatch(g.ChildFailed(action.attempt, f"cannot start the new generation: {exc}"))
            return
        self.successor = successor
        self._run("successor", self._until_ready(successor))
        self.dispatch(g.ChildStarted(action.attempt, successor.pid))  # no longer wanted: the machine kills it

    def _do_ArmReadyTimer(self, action: g.ArmReadyTimer) -> None:
        self.ports.call_later(action.seconds, self.dispatch, g.ReadyTimedOut(action.attempt))

    def _do_KillSuccessor(self, action: g.KillSuccessor) -> None:
        successor = self.successor
        if successor is not None and successor.attempt == action.attempt:
            successor.kill()
            self._forget_successor()
        elif action.pid:
            kill_group(action.pid)

    def _do_HandOver(self, action: g.HandOver) -> None:
        if self._canary_now > 0 and self.successor is not None:
            self._run("successor", self._canary_then_hand_over(self.successor, action, self._canary_now))
            return
        notifier = self.ports.notifier
        self.status.stop()  # no WATCHDOG=1/STATUS= from us once systemd may take the successor as main
        if self.fd_store is not None:  # the successor stores our connections under its names once it has them
            self.fd_store.withdraw()
        identity = {"MAINPIDFDID": pidfd_id} if (pidfd_id := inode_id(action.pid)) is not None else {}
        notifier.send(MAINPID=action.pid, **identity, READY=1,  # with an id, PID reuse cannot mislead systemd
                      STATUS=f"gen {action.generation} · pid {action.pid} · serving")
        self._run("successor", self._tell_main_once_systemd_knows(action))

    async def _tell_main_once_systemd_knows(self, action: g.HandOver) -> None:
        """The successor may speak to systemd (NotifyAccess=main) once systemd has taken MAINPID=<it>: we await
        the barrier (serving meanwhile), then tell it it is main."""
        notifier = self.ports.notifier
        if notifier.enabled and not await notifier.barrier():
            log.warning("systemd did not confirm the handover within 5s")
        if self.machine.phase is not g.Phase.HANDING_OVER:  # stopped meanwhile: the machine killed it
            return
        if self.successor is None or not self.successor.alive():
            self._hand_over_failed(action)
            return
        successor = self.successor
        successor.tell_main(rollout=self._rolls(successor))
        await self._until_serving(successor, action)

    def _do_StartDraining(self, action: g.StartDraining) -> None:
        self.control_server.close()
        self.status.stop()
        if self.adoption is not None:
            self.adoption.close()
        replaced = self.machine.phase is not g.Phase.STOPPING
        if not replaced:
            self._moving_to = None
        if self.fd_store is not None and not replaced:  # idle connections go into systemd's fd store, not closed
            self.fd_store.stopping()
        stop_accepting(self.servers, self.control, replaced, self._moving_to)
        self._run("drain", self._drain_and_finish())

    async def _until_ready(self, successor: Successor) -> None:
        self.dispatch(await successor.until_ready())

    async def _until_serving(self, successor: Successor, action: g.HandOver) -> None:
        """The handover ends when the successor confirms it serves as main (it accepts reloads). Only then
        do we name it in the pid file and, in the same step, stop accepting: whoever sees the pid file
        change or hears "done" may reload again at once, and reaches the new main. Until then PIDFile=
        still names us, which is what systemd must find if the successor dies now."""
        if not await successor.until_serving():
            self._hand_over_failed(action)
            return
        if self._rolls(successor) and not await self._retire_workers(successor, action):
            return
        if self.ports.pid_file:
            self.ports.pid_file.write(action.pid)  # systemd re-reads it when ExecReload exits
        if successor.adopts:  # it takes our keep-alive connections over as they become idle
            self._moving_to = action.pid
        else:
            log.info("generation %d (pid %d) does not take connections over (an older version):"
                     " they drain here", action.generation, action.pid)
        self._forget_successor()
        self.dispatch(g.HandedOver(action.attempt))

    async def _canary_then_hand_over(self, successor: Successor, action: g.HandOver, seconds: float) -> None:
        """Let its first worker serve beside ours for `seconds`, compare the failure rates (see `canary`), and
        hand over, or stop it and fail the reload with the figures."""
        from graceful_http.canary import judge
        from graceful_http.spawn import wait_exit

        log.info("canary: generation %d (pid %d) serves beside us for %gs", action.generation, action.pid, seconds)
        self.status.send(STATUS=f"reloading: canary, generation {action.generation} serves beside us for {seconds:g}s")
        successor.link.start_canary()
        await self._fresh_counts()
        before = self.counts()
        theirs = await successor.link.counts_during(seconds)
        await self._fresh_counts()
        after = self.counts()
        if self.machine.phase is not g.Phase.HANDING_OVER:  # stopped meanwhile
            return
        if theirs is None:
            self.dispatch(g.HandOverFailed(action.attempt, f"new generation (pid {action.pid}) exited during the"
                                                           " canary"))
            return
        verdict = judge(theirs[1], theirs[0], after[1] - before[1], after[0] - before[0], seconds)
        self._canary_now = 0.0
        if verdict.promote:
            log.info("%s: promoting generation %d", verdict.text, action.generation)
            self._do_HandOver(action)
            return
        # Stopped, not killed: it finishes what its worker is answering, then exits.
        successor.link.reject(verdict.text)
        await wait_exit(successor.pidfd, self.graceful_timeout + 5)
        self.dispatch(g.HandOverFailed(action.attempt, verdict.text))

    def _rolls(self, successor: Successor) -> bool:
        """A worker-by-worker rollout: the successor asked for one, and we have workers to retire."""
        return successor.rolls and bool(self.servers) and hasattr(self.servers[0], "retire")

    async def _retire_workers(self, successor: Successor, action: g.HandOver) -> bool:
        """Retire our workers one by one as the successor's become ready (see `rollout`). True once it has
        them all; False if it died first: then we are main again, with all our workers back."""
        from graceful_http import rollout as r  # here: a main without workers never needs it (12 ms of a start)
        from graceful_http.rolling import LineChannel, RetirementDriver

        pool = self.servers[0]
        channel = LineChannel(successor.link.mine, successor.link.buffered())
        outcome = await RetirementDriver(pool, channel, action.pid).run()
        if not isinstance(outcome, r.Restore):
            return True
        if self.machine.phase is not g.Phase.HANDING_OVER:  # stopping meanwhile
            return False
        if self.ports.notifier.enabled:
            self.ports.wait_until_reaped(action.pid)  # then systemd has read PIDFile= (us) again
        self.dispatch(g.HandOverFailed(action.attempt, outcome.reason))
        self.status.start()
        await pool.restore()
        return False

    def _hand_over_failed(self, action: g.HandOver) -> None:
        if self.ports.notifier.enabled:
            # systemd may have made it the main process already. Once it has reaped it, it has also read
            # PIDFile= (still naming us) and taken us back as main; only then will it hear us.
            self.ports.wait_until_reaped(action.pid)
        self.dispatch(g.HandOverFailed(action.attempt, f"new generation (pid {action.pid}) exited during the"
                                                       " handover"))
        self.status.start()  # main again
        if self.fd_store is not None:
            self.fd_store.resume()

    def _forget_successor(self) -> None:
        task = self._tasks.pop("successor", None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if self.successor is not None:
            self.successor.close()
            self.successor = None

    async def _drain_and_finish(self) -> None:
        log.info("no longer accepting; finishing %d in-flight request(s), up to %gs", self.servers.in_flight(),
                 self.graceful_timeout)
        code = GOING_AWAY if self.machine.phase is g.Phase.STOPPING else SERVICE_RESTART
        movers = await connect_successor(self.servers, self.control, self._moving_to)
        await drain_and_shut_down(self.servers, self.graceful_timeout, code, self.metrics, movers, self.adoption,
                                  moving=self._moving_to is not None)
        if self.ports.pid_file and self.machine.phase is g.Phase.STOPPING:
            self.ports.pid_file.remove(self.machine.pid)
        log.info("exited: generation %d (pid %d), %d request(s) served in all",
                 self.machine.state.generation, self.machine.pid, self.servers.total_requests)
        self.finished.set()

    def _run(self, name: str, coroutine) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(coroutine)

    def _serving_status(self) -> str | None:
        if self.machine.phase is not g.Phase.SERVING:
            return None
        status = self.machine.serving_status(self.servers.in_flight(), self.servers.total_requests,
                                             self.servers.adopted)
        notes = [note for server in self.servers if (upkeep := getattr(server, "upkeep", None))
                 and (note := upkeep.status_note())]  # worker recycling
        return " · ".join([status, *notes])
