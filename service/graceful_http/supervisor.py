"""One generation's life: start serving, become main, hand over or stop, drain, exit.

The supervisor owns the state machine (`generation.Generation`) and is the
only place its actions touch the OS: signals, the successor process, the
readiness channel, sd_notify, the pid file and the HTTP engines. Every input
(a signal, a control request, the successor's messages, a timer) becomes an
event, and events are handled one at a time, in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import signal
import socket
import time
from typing import TYPE_CHECKING

from graceful_http import __version__
from graceful_http import generation as g
from graceful_http import logs
from graceful_http.apploader import AppLoadError, load_asgi3
from graceful_http.control import ControlLayer, ControlPolicy, ControlState, not_found
from graceful_http.controlsocket import ControlServer
from graceful_http.fdlimit import describe_limit, raise_soft_limit
from graceful_http.handoff import CONFIRM_TIMEOUT, GENERATION_VARIABLE, PredecessorEnd, SuccessorEnd
from graceful_http.holder import report_main
from graceful_http.listenfds import ListenFdsError
from graceful_http.metrics import SHARED_DIR_VARIABLE, Metrics
from graceful_http.listeners import CONTROL_SOCKET_NAME, ListenerError, acquire
from graceful_http.pidfile import remove_pid_file, write_pid_file
from graceful_http.sdnotify import Notifier, watchdog_interval
from graceful_http.settings import ServeSettings
from graceful_http.spawn import fork_worker, spawn_successor
from graceful_http.websocket_drain import GOING_AWAY, SERVICE_RESTART
from graceful_http.workers import WorkerLink, WorkerPool, WorkerStartFailed, worker_environ

if TYPE_CHECKING:
    from graceful_http.engine import Engine

log = logging.getLogger("graceful_http")

STATUS_INTERVAL = 1.0


class StartError(Exception):
    """This generation cannot serve; the message is the one-line reason."""


class Successor:
    """The new generation being started: its pid, channel and exit notification."""

    def __init__(self, attempt: int, pid: int, channel: PredecessorEnd):
        self.attempt = attempt
        self.pid = pid
        self.channel = channel
        self.pidfd = os.pidfd_open(pid)
        self.watcher: asyncio.Task | None = None

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    async def exited_within(self, timeout: float) -> bool:
        """Wait until it exits (its closed channel may precede its exit by a moment), up to `timeout`."""
        exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.pidfd, exited.set)
        try:
            await asyncio.wait_for(exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # it leads its own session: this takes what it started too
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.channel.close()
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartError(f"cannot read the control token file {path}: {getattr(exc, 'strerror', exc)}") from None
    if len(token) < 16:
        raise StartError(f"the control token in {path} is too short (at least 16 characters)")
    return token


def build_engines(settings: ServeSettings, listeners, control: ControlState, metrics=None) -> list[Engine]:
    from graceful_http.engine import Engine, EngineSettingError  # uvicorn: not needed by a workers' main

    """The HTTP engines of one serving process: the app's (with the control layer) and the control socket's."""
    try:
        token = read_token(settings.control_token_file)
        app, interface = load_asgi3(settings.app, settings.app_dir,
                                    factory=settings.factory, interface=settings.interface)
    except AppLoadError as exc:
        if exc.details:
            log.error("%s", exc.details.rstrip())
        raise StartError(str(exc)) from None
    log.info("loaded %s (%s)", settings.app, interface)
    public = [l for l in listeners if l.name != CONTROL_SOCKET_NAME]
    private = [l for l in listeners if l.name == CONTROL_SOCKET_NAME]
    access = logs.log_access if settings.access_log else None
    engines = []
    if public:
        policy = ControlPolicy(allow=settings.control_allow, token=token, control_socket_elsewhere=bool(private))
        stack = ControlLayer(app, control, policy, access, metrics)
        websockets = {"ws": settings.ws, "ws_max_size": settings.ws_max_size,
                      "ws_ping_interval": settings.ws_ping_interval, "ws_ping_timeout": settings.ws_ping_timeout}
        try:
            engines.append(Engine(stack, [l.sock for l in public], idle_grace=settings.idle_grace,
                                  websockets=websockets, websocket_close_spread=settings.websocket_close_spread))
        except EngineSettingError as exc:
            raise StartError(str(exc)) from None
    if private:  # the admins' socket: control endpoints only, trusted by its file mode
        stack = ControlLayer(not_found, control, ControlPolicy(trusted=True), access, metrics)
        engines.append(Engine(stack, [l.sock for l in private], idle_grace=0.1, lifespan=False))
    return engines


async def start_engines(engines: list[Engine]) -> None:
    from graceful_http.engine import StartupFailed

    try:
        for engine in engines:
            await engine.start()
    except StartupFailed as exc:
        raise StartError(str(exc)) from None


class Supervisor:
    def __init__(self, settings: ServeSettings, generation: int, successor_end: SuccessorEnd | None,
                 listeners=(), metrics: Metrics | None = None):
        self.settings = settings
        self.pid = os.getpid()
        self.machine = g.Generation(generation, self.pid, settings.ready_timeout)
        self.successor_end = successor_end
        self.notifier = Notifier()
        self.watchdog = watchdog_interval(os.environ, self.pid)
        self.control = ControlState(request_reload=self.request_reload_now)
        self.control_server = ControlServer(self.start_reload)
        self.listeners = list(listeners)
        self.engines: list[Engine] = []
        self.successor: Successor | None = None
        self.finished = asyncio.Event()
        self._events: collections.deque = collections.deque()
        self._dispatching = False
        self._main_tasks: list[asyncio.Task] = []
        self._draining: asyncio.Task | None = None
        self._last_status = ""
        self.metrics = metrics  # counts reloads here; with workers, they serve the scrapes

    # ---- start -----------------------------------------------------------

    async def start(self, forked: list[tuple[int, socket.socket]] = ()) -> None:
        """Start serving (here, or in worker processes, some `forked` already). Raises StartError with a
        one-line reason."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.dispatch, g.ReloadRequested("SIGHUP"))
        loop.add_signal_handler(signal.SIGTERM, self.dispatch, g.StopRequested("SIGTERM"))
        loop.add_signal_handler(signal.SIGINT, self.dispatch, g.StopRequested("SIGINT"))
        if settings.workers > 1:
            pool = WorkerPool(settings.workers, self.listeners, self.machine.state.generation,
                              self.request_reload_now, metrics=self.metrics)
            self.engines = [pool]
            try:
                await pool.start(forked)
            except WorkerStartFailed as exc:
                raise StartError(str(exc)) from None
            log.info("graceful-http %s serving %s on %s", __version__, settings.app, pool.describe())
        else:
            self.engines = build_engines(settings, self.listeners, self.control, self.metrics)
            await start_engines(self.engines)
            log.info("graceful-http %s serving %s on %s", __version__, settings.app, self.engines[0].describe())
        for listener in self.listeners:
            log.info("listening on %s", listener.describe())
        log.info("%s", describe_limit())

    async def become_main(self) -> None:
        handed_over = False
        if self.successor_end is not None:
            handed_over = await self.successor_end.report_ready_and_wait_until_main()
            if not handed_over:
                log.warning("the previous generation went away before handing over; serving as main")
        if self.machine.phase is not g.Phase.STARTING:
            if self.successor_end is not None:
                self.successor_end.close()
            return  # stopped while waiting
        if self.settings.pid_file and not handed_over:  # after a handover, the old main writes it
            write_pid_file(self.settings.pid_file, self.pid)
        try:
            await self.control_server.start(self.pid)
        except OSError as exc:
            log.warning("no control socket for `graceful-http reload` (%s); SIGHUP still reloads", exc)
        self.dispatch(g.BecameMain(handed_over=handed_over))
        report_main(self.machine.state.generation)  # to the stable-pid holder, if any: signals come here now
        if handed_over:
            self.successor_end.confirm_serving()  # now the old main may report the reload done
        self._main_tasks.append(asyncio.create_task(self._update_status()))
        if self.watchdog:
            self._main_tasks.append(asyncio.create_task(self._ping_watchdog(self.watchdog)))

    # ---- events ----------------------------------------------------------

    def dispatch(self, event: g.Event) -> None:
        """Handle `event` and everything it causes, one event at a time."""
        self._events.append(event)
        if self._dispatching:
            return
        self.machine.traffic = (self.in_flight(), self.total_requests())  # for a STATUS= this event may send
        self._dispatching = True
        try:
            while self._events:
                event = self._events.popleft()
                before = self.machine.phase
                for action in self.machine.handle(event):
                    self._carry_out(action)
                self._count(event, before)
        finally:
            self._dispatching = False

    def _count(self, event: g.Event, before: g.Phase) -> None:
        if self.metrics is None:
            return
        if before in (g.Phase.RELOADING, g.Phase.HANDING_OVER) and self.machine.phase is g.Phase.SERVING:
            self.metrics.reload_failed()
        elif isinstance(event, g.BecameMain) and event.handed_over:
            self.metrics.became_main_after_handoff()

    def request_reload_now(self, source: str) -> g.Outcome:
        """For `POST /graceful`: start a reload and say at once whether it started."""
        replies: list[g.Outcome] = []
        self.dispatch(g.ReloadRequested(source, requester=replies.append))
        if replies:
            return replies[0]
        return g.Outcome("started", f"reload started: generation {self.machine.state.generation + 1}")

    def start_reload(self, source: str, on_outcome) -> None:
        """For `graceful-http reload`: start a reload; `on_outcome` hears progress and the end."""
        self.dispatch(g.ReloadRequested(source, requester=on_outcome))

    # ---- actions ---------------------------------------------------------

    def _carry_out(self, action: g.Action) -> None:
        getattr(self, "_do_" + type(action).__name__)(action)

    def _do_Log(self, action: g.Log) -> None:
        log.log(logging.getLevelName(action.level.upper()), "%s", action.message)

    def _do_Notify(self, action: g.Notify) -> None:
        if "STATUS" in action.fields:
            self._last_status = str(action.fields["STATUS"])
        self.notifier.send(**action.fields)

    def _do_Reply(self, action: g.Reply) -> None:
        action.requester(action.outcome)

    def _do_SpawnSuccessor(self, action: g.SpawnSuccessor) -> None:
        channel = PredecessorEnd()
        environ = dict(os.environ)
        environ[GENERATION_VARIABLE] = str(action.generation)
        if self.metrics is not None:
            self.metrics.successor_environ(environ, reload_started=time.monotonic())
        try:
            pid = spawn_successor(
                [listener.sock.fileno() for listener in self.listeners],
                [listener.name for listener in self.listeners],
                channel.theirs.fileno(),
                environ,
            )
            channel.close_theirs()
            self.successor = Successor(action.attempt, pid, channel)
        except OSError as exc:
            channel.close()
            self.dispatch(g.ChildFailed(action.attempt, f"cannot start the new generation: {exc}"))
            return
        self.successor.watcher = asyncio.create_task(self._watch(self.successor))
        self.dispatch(g.ChildStarted(action.attempt, pid))

    def _do_ArmReadyTimer(self, action: g.ArmReadyTimer) -> None:
        asyncio.get_running_loop().call_later(action.seconds, self.dispatch, g.ReadyTimedOut(action.attempt))

    def _do_KillSuccessor(self, action: g.KillSuccessor) -> None:
        successor = self.successor
        if successor is not None and successor.attempt == action.attempt:
            successor.kill()
            successor.close()
            self.successor = None
        elif action.pid:
            try:
                os.killpg(action.pid, signal.SIGKILL)
            except OSError:
                pass

    def _do_HandOver(self, action: g.HandOver) -> None:
        successor = self.successor
        self.notifier.send(MAINPID=action.pid, READY=1, STATUS=f"gen {action.generation} · pid {action.pid} · serving")
        if self.notifier.enabled and not self.notifier.barrier():
            log.warning("systemd did not confirm the handover within 5s")
        if successor is None or not successor.alive():
            if self.notifier.enabled:
                # systemd may have made it the main process already. Once it has reaped it, it has also
                # read PIDFile= (still naming us) and taken us back as main; only then will it hear us.
                wait_until_reaped(action.pid)
            self.dispatch(g.HandOverFailed(action.attempt, f"new generation (pid {action.pid}) exited during the"
                                                           " handover"))
            return
        successor.channel.tell_main()
        successor.watcher = asyncio.get_running_loop().create_task(self._await_serving(successor, action))

    async def _await_serving(self, successor: Successor, action: g.HandOver) -> None:
        """The handover ends when the successor confirms it serves as main (it accepts reloads). Only then
        do we name it in the pid file and, in the same step, stop accepting: whoever sees the pid file
        change or hears "done" may reload again at once, and reaches the new main. Until then PIDFile=
        still names us, which is what systemd must find if the successor dies now."""
        confirmed = await successor.channel.serving_confirmed()
        if self.successor is not successor:
            return  # stopped meanwhile: it was killed
        if not confirmed and await successor.exited_within(1.0):
            if self.notifier.enabled:
                wait_until_reaped(action.pid)  # as above: then systemd has taken us back as main
            self.dispatch(g.HandOverFailed(action.attempt, f"new generation (pid {action.pid}) exited during the"
                                                           " handover"))
            return
        if not confirmed:
            log.warning("the new generation (pid %d) did not confirm it serves as main within %gs;"
                        " considering it main", action.pid, CONFIRM_TIMEOUT)
        if self.settings.pid_file:
            write_pid_file(self.settings.pid_file, action.pid)  # systemd re-reads it when ExecReload exits
        successor.close()
        self.successor = None
        self.dispatch(g.HandedOver(action.attempt))

    def _do_StartDraining(self, action: g.StartDraining) -> None:
        self.control.accepting = False
        self.control_server.close()
        for task in self._main_tasks:
            task.cancel()
        replaced = self.machine.phase is not g.Phase.STOPPING
        for engine in self.engines:
            engine.stop_accepting(replaced=replaced)
        self._draining = asyncio.get_running_loop().create_task(self._drain_and_finish())  # kept: tasks are weak

    # ---- tasks -----------------------------------------------------------

    async def _watch(self, successor: Successor) -> None:
        """Turn the successor's messages and exit into events."""
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(successor.pidfd, exited.set)
        message = asyncio.create_task(successor.channel.next_message())
        exit_wait = asyncio.create_task(exited.wait())
        try:
            done, _ = await asyncio.wait({message, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            gone = f"new generation (pid {successor.pid}) exited before it was ready"
            if message in done:
                word, detail = message.result()
                if word == "ready":
                    self.dispatch(g.ChildReady(successor.attempt, successor.pid))
                    return
                if word == "failed":
                    self.dispatch(g.ChildFailed(successor.attempt, detail or gone))
                    return
                await exit_wait  # the channel closed: it is exiting
            self.dispatch(g.ChildFailed(successor.attempt, successor.channel.pending_failure() or gone))
        finally:
            message.cancel()
            exit_wait.cancel()

    def in_flight(self) -> int:
        return sum(engine.in_flight() for engine in self.engines)

    def total_requests(self) -> int:
        return sum(engine.total_requests for engine in self.engines)

    async def _update_status(self) -> None:
        """Keep `systemctl status` informative: at most one STATUS= a second, only on change."""
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if self.machine.phase is g.Phase.SERVING:
                status = self.machine.serving_status(self.in_flight(), self.total_requests())
                if status != self._last_status:
                    self._do_Notify(g.Notify({"STATUS": status}))

    async def _ping_watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop: a stuck loop stops the pings and systemd restarts us."""
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def _drain_and_finish(self) -> None:
        timeout = self.settings.graceful_timeout
        deadline = time.monotonic() + timeout
        log.info("no longer accepting; finishing %d in-flight request(s), up to %gs", self.in_flight(), timeout)
        code = GOING_AWAY if self.machine.phase is g.Phase.STOPPING else SERVICE_RESTART
        results = await asyncio.gather(*(engine.drain(deadline, code) for engine in self.engines))
        served = sum(r[0] for r in results)
        cut = sum(r[1] for r in results)
        if cut:
            log.warning("graceful timeout (%gs) reached: cut %d request(s) still in flight", timeout, cut)
            if self.metrics is not None:
                self.metrics.cut.inc(cut)
        log.info("drained: %d request(s) answered while draining, %d cut", served, cut)
        for engine in self.engines:
            try:
                await engine.shutdown_app()
            except Exception:  # the app's own shutdown failing must not keep us alive
                log.exception("the app's lifespan shutdown failed")
        if self.settings.pid_file and self.machine.phase is g.Phase.STOPPING:
            remove_pid_file(self.settings.pid_file, self.pid)
        log.info("exited: generation %d (pid %d), %d request(s) served in all",
                 self.machine.state.generation, self.pid, self.total_requests())
        self.finished.set()


def fork_workers(settings: ServeSettings, listeners, generation: int,
                 successor_end: SuccessorEnd | None) -> list[tuple[int, socket.socket]]:
    """Fork the generation's workers before the main's event loop starts; return (pid, channel) of each.

    The engine (uvicorn, uvloop, httptools) is imported once, here, so a worker
    starts by loading the app instead of by starting an interpreter.
    """
    from graceful_http.engine import preload

    preload()
    environ = worker_environ(os.environ)
    forked: list[tuple[int, socket.socket]] = []
    for index in range(1, settings.workers + 1):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def worker(index=index, theirs=theirs, mine=mine) -> int:  # pragma: no cover - in the forked child
            for channel in [mine, *(other for _, other in forked)]:
                channel.close()
            if successor_end is not None:
                successor_end.sock.close()  # the channel to the previous generation is the main's
            os.environ.clear()
            os.environ.update(environ)
            return asyncio.run(run_worker(settings, WorkerLink(theirs, index), listeners, generation))

        try:
            pid = fork_worker(worker)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        forked.append((pid, mine))
    return forked


async def run_worker(settings: ServeSettings, link: WorkerLink, listeners=None, generation: int | None = None) -> int:
    """A worker of a multi-worker generation: serve until SIGTERM, then drain and exit.

    A forked worker gets its main's `listeners`; an exec'd one finds them at fd 3….
    """
    if generation is None:
        generation = int(os.environ.pop(GENERATION_VARIABLE, "1") or 1)
    logs.setup(generation, settings.log_level, worker=link.index)
    stopping = asyncio.Event()
    websocket_code = GOING_AWAY  # the service stops (SIGTERM, SIGINT)...
    loop = asyncio.get_running_loop()

    def replaced() -> None:  # ...or a new generation took over (SIGUSR2 from our main)
        nonlocal websocket_code
        websocket_code = SERVICE_RESTART
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGUSR2, replaced)
    control = ControlState(request_reload=link.request_reload)
    try:
        if link.main_version != __version__:
            raise StartError(f"graceful-http {__version__} is installed but this generation runs {link.main_version}:"
                             " a replacement worker would run other code; reload to start the new version")
        if listeners is None:
            listeners = acquire(settings.binds)
        metrics = None
        if settings.metrics:
            metrics = Metrics(generation, worker=link.index, shared_dir=os.environ.get(SHARED_DIR_VARIABLE))
        engines = build_engines(settings, listeners, control, metrics)
        await start_engines(engines)
    except (ListenerError, ListenFdsError, StartError) as exc:
        log.error("cannot start: %s", exc)
        link.report_failed_sync(str(exc))
        return 1
    await link.connect()
    link.send("ready")
    stats = asyncio.create_task(link.report_stats(engines[0]))
    await stopping.wait()
    control.accepting = False
    for engine in engines:
        engine.stop_accepting()
    deadline = time.monotonic() + settings.graceful_timeout
    results = await asyncio.gather(*(engine.drain(deadline, websocket_code) for engine in engines))
    served, cut = sum(r[0] for r in results), sum(r[1] for r in results)
    if cut:
        log.warning("graceful timeout (%gs) reached: cut %d request(s) still in flight", settings.graceful_timeout, cut)
    log.info("drained: %d request(s) answered while draining, %d cut", served, cut)
    for engine in engines:
        await engine.shutdown_app()
    stats.cancel()
    link.send("stats", f"0 {sum(e.total_requests for e in engines)}")
    link.send("drained", f"{served} {cut}")
    await link.writer.drain()
    return 0


def wait_until_reaped(pid: int, timeout: float = 2.0) -> bool:
    """Wait (a few ms, typically) until the exited process `pid` is reaped by its parent (PID 1 here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # a zombie still counts
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.001)
    return False


def report_start_failure(reason: str, exit_code: int = 1) -> int:
    """Log why this generation cannot start and tell the old generation, if there is one."""
    successor_end = SuccessorEnd.from_environ(os.environ)
    logs.setup(successor_end.generation if successor_end else 1)
    log.error("cannot start: %s", reason)
    if successor_end is not None:
        successor_end.report_failed(reason)
    return exit_code


def serve(settings: ServeSettings) -> int:
    """A generation's main process: take the sockets, fork the workers, then run until handed over or
    stopped. Returns the process exit code."""
    successor_end = SuccessorEnd.from_environ(os.environ)
    generation = successor_end.generation if successor_end else 1
    logs.setup(generation, settings.log_level)
    raise_soft_limit()
    try:
        listeners = acquire(settings.binds)
    except (ListenerError, ListenFdsError) as exc:
        return _cannot_start(str(exc), successor_end)
    metrics = None
    if settings.metrics:
        try:
            metrics = Metrics.for_main_of_workers(generation) if settings.workers > 1 else Metrics(generation)
        except OSError as exc:
            return _cannot_start(f"cannot make the directory the workers share metrics in: {exc}", successor_end)
    try:
        forked = []
        if settings.workers > 1:
            try:
                forked = fork_workers(settings, listeners, generation, successor_end)
            except OSError as exc:
                return _cannot_start(f"cannot fork a worker: {exc.strerror or exc}", successor_end)
        return asyncio.run(run(Supervisor(settings, generation, successor_end, listeners, metrics), forked))
    finally:
        if metrics is not None:
            metrics.remove_shared_dir()


async def run(supervisor: Supervisor, forked: list[tuple[int, socket.socket]]) -> int:
    try:
        await supervisor.start(forked)
    except StartError as exc:
        return _cannot_start(str(exc), supervisor.successor_end)
    await supervisor.become_main()
    await supervisor.finished.wait()
    return 0


def _cannot_start(reason: str, successor_end: SuccessorEnd | None) -> int:
    log.error("cannot start: %s", reason)
    if successor_end is not None:
        successor_end.report_failed(reason)
    return 1
