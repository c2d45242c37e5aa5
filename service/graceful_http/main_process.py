"""A generation's main process, top to bottom: take the sockets, fork the workers, serve (or have the
workers serve), become main, then run the supervisor until handed over or stopped."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time

from graceful_http import __version__, logs, zygote
from graceful_http import generation as g
from graceful_http.controlsocket import ControlServer
from graceful_http.fdlimit import describe_limit, raise_soft_limit
from graceful_http.fdstore_systemd import discard_restored, open_connection_store
from graceful_http.handoff import PredecessorLink
from graceful_http.holder import report_main
from graceful_http.inherited import Inherited
from graceful_http.listeners import ListenerError, acquire
from graceful_http.listenfds import ListenFdsError
from graceful_http.metrics import Metrics
from graceful_http.pidfile import PidFile
from graceful_http.sdnotify import Notifier, watchdog_interval
from graceful_http.serving import (
    Servers,
    StartError,
    build_engines,
    open_adoption_point,
    report_start_failure,
    start_engines,
)
from graceful_http.settings import ServeSettings
from graceful_http.standby import Standby
from graceful_http.standby import wanted as standby_wanted
from graceful_http.startpriority import idle_start_allowed
from graceful_http.successor import Successor, wait_until_reaped
from graceful_http.supervisor import Ports, Supervisor
from graceful_http.worker_upkeep import start_worker_upkeep, warn_about_single_process_recycling

log = logging.getLogger("graceful_http")


def run_main(settings: ServeSettings, inherited: Inherited) -> int:
    """Returns the process exit code."""
    predecessor = PredecessorLink.from_inherited(inherited)
    generation = inherited.generation
    logs.setup(generation, settings.log_level)
    raise_soft_limit()
    idle_start_allowed()  # asked here, before anything is forked: what we fork inherits the answer
    try:
        listeners = acquire(settings.binds, backlog=settings.backlog)
    except (ListenerError, ListenFdsError) as exc:
        return report_start_failure(str(exc), predecessor)
    metrics = None
    if settings.metrics:
        try:
            metrics = (Metrics.for_main_of_workers(generation, inherited.carried_metrics) if settings.workers > 1
                       else Metrics(generation, carried=inherited.carried_metrics))
        except OSError as exc:
            return report_start_failure(f"cannot make the directory the workers share metrics in: {exc}",
                                        predecessor)
    if settings.preload and settings.workers > 1:
        try:
            preload_app(settings)
        except StartError as exc:
            return report_start_failure(str(exc), predecessor)
    rolling = settings.workers > 1 and settings.rollout == "worker" and predecessor is not None
    try:
        forked = []
        if settings.workers > 1:
            from graceful_http.balanced_accept import create_table

            create_table()  # its descriptor stays open for as long as this main lives: its workers share it
            discard_restored(listeners.restored)  # the workers would hold them open: only a serving main stores
            try:  # a rollout starts with one worker, and the rest one by one (see `rollout`)
                forked = fork_workers(settings, listeners, inherited, predecessor, metrics, 1 if rolling else None)
            except OSError as exc:
                return report_start_failure(f"cannot fork a worker: {exc.strerror or exc}", predecessor)
        standby = None
        if standby_wanted(settings.workers, metrics is not None):  # before the app is imported (in `_serve`)
            import_ahead(settings)  # what serving imports besides the app: then the next generation has it too
            standby = Standby.fork([item.sock.fileno() for item in listeners]
                                   + [sock.fileno() for _, sock in listeners.restored if sock is not None]
                                   + ([predecessor.sock.fileno()] if predecessor is not None else []))
        try:
            return asyncio.run(_serve(settings, inherited, listeners, predecessor, metrics, forked, rolling, standby))
        finally:
            if standby is not None:
                standby.close()
    finally:
        if metrics is not None:
            metrics.remove_shared_dir()


def fork_workers(settings: ServeSettings, listeners, inherited: Inherited, predecessor: PredecessorLink | None,
                 metrics: Metrics | None, count: int | None = None) -> list[tuple[int, socket.socket]]:
    """Fork the generation's workers (the first `count` of them) before the main's event loop starts; return
    (pid, channel) of each.

    What the workers (and later reloads) would import is imported once, here (`import_ahead`), so a worker
    starts by loading the app instead of by starting an interpreter.
    """
    from graceful_http.latefork import fork_running

    import_ahead(settings)
    forked: list[tuple[int, socket.socket]] = []
    for index in range(1, (count or settings.workers) + 1):
        # Not for the child: its siblings' channels, and the channel to the previous generation (the main's).
        dropped = [channel for _, channel in forked] + ([predecessor.sock] if predecessor is not None else [])
        forked.append(fork_running(settings, listeners, inherited, index,
                                   metrics.shared_dir if metrics is not None else None, dropped))
    return forked


def import_ahead(settings: ServeSettings) -> None:
    """Import now, before a main forks its workers or its standby, what its reloads would otherwise import
    while the old generation serves: the engine (then a worker starts by loading the app, not by importing
    uvicorn), systemd-python's `daemon` (a new generation takes its sockets through it: `listeners.inherited`)
    and, with workers, what a forked worker calls first (`spawn.libc_prctl`) and with a worker-by-worker
    rollout its two machines (`rolling`), which both mains of a reload need (their 18 dataclasses: 8–13 ms of
    CPU each, measured with -X importtime). The next generation is a fork of this main or of its standby (see
    `zygote`, `standby`): imported once, in the first generation, they are there for every later one."""
    try:
        from systemd import daemon  # noqa: F401
    except ImportError:
        pass  # a dependency, but what starts without it starts as before: the reload says what is missing

    from graceful_http.engine import preload

    preload()
    if settings.workers > 1:
        from graceful_http.spawn import libc_prctl

        libc_prctl()
        if settings.rollout == "worker":
            import graceful_http.rolling  # noqa: F401


async def _serve(settings: ServeSettings, inherited: Inherited, listeners, predecessor: PredecessorLink | None,
                 metrics: Metrics | None, forked: list[tuple[int, socket.socket]], rolling: bool = False,
                 standby: Standby | None = None) -> int:
    pid = os.getpid()
    loop = asyncio.get_running_loop()
    warn_about_single_process_recycling(settings)
    ports = Ports(
        start_successor=functools.partial(_start_successor, listeners, inherited, metrics,
                                          zygote.eligible(settings.workers, settings.preload, metrics is not None),
                                          nice=settings.start_nice, standby=standby),
        notifier=Notifier(),
        control_server=ControlServer,
        wait_until_reaped=wait_until_reaped,
        call_later=loop.call_later,
        pid_file=PidFile(settings.pid_file) if settings.pid_file else None,
        watchdog=watchdog_interval(os.environ, pid),
    )
    supervisor = Supervisor(g.HandoffMachine(inherited.generation, pid, settings.ready_timeout), ports,
                            settings.graceful_timeout, metrics)
    supervisor.canary = settings.canary
    loop.add_signal_handler(signal.SIGHUP, supervisor.dispatch, g.ReloadRequested("SIGHUP"))
    loop.add_signal_handler(signal.SIGTERM, supervisor.dispatch, g.StopRequested("SIGTERM"))
    loop.add_signal_handler(signal.SIGINT, supervisor.dispatch, g.StopRequested("SIGINT"))
    try:
        if settings.workers > 1:
            from graceful_http.workers import WorkerPool, WorkerStartFailed

            pool = WorkerPool(settings.workers, listeners, inherited.generation, supervisor.request_reload_now,
                              metrics=metrics)
            supervisor.servers = Servers([pool])
            if settings.preload:  # replacements too are forked from us, with our copy of the app
                pool.fork_now = functools.partial(fork_later_worker, settings, listeners, inherited, metrics,
                                                  supervisor, predecessor)
            try:
                await (pool.start_first(forked) if rolling else pool.start(forked))
            except WorkerStartFailed as exc:
                raise StartError(str(exc)) from None
            start_worker_upkeep(pool, settings, metrics)
        else:
            supervisor.servers = Servers(build_engines(settings, listeners, supervisor.control, metrics))
            await start_engines(supervisor.servers)
            supervisor.adoption = open_adoption_point(supervisor.servers, pid, 1, metrics)
            supervisor.fd_store = open_connection_store(supervisor.servers, listeners.restored, pid)
            if supervisor.fd_store is not None:
                await supervisor.fd_store.adopt_restored(listeners.restored)
    except StartError as exc:
        return report_start_failure(str(exc), predecessor)
    log.info("graceful-http %s serving %s on %s", __version__, settings.app, supervisor.servers[0].describe())
    if zygote.was_forked():
        log.info("forked from the previous main, not exec'd: the code on disk is the code it had loaded")
    for listener in listeners:
        log.info("listening on %s", listener.describe())
    log.info("%s", describe_limit())

    handed_over = False
    if predecessor is not None:
        adopts = supervisor.adoption is not None or settings.workers > 1  # workers each open their own
        handed_over = await predecessor.report_ready_and_wait_until_main(adopts, rolling, supervisor.counts)
        if predecessor.rejected:
            log.error("the previous generation keeps serving: %s; stopping", predecessor.rejected)
            supervisor.dispatch(g.StopRequested("rejected by the canary"))
            await supervisor.finished.wait()
            return 1
        if not handed_over:
            log.warning("the previous generation went away before handing over; serving as main")
    agreed = handed_over and predecessor.rollout_agreed  # the old main retires its workers one by one
    if not await supervisor.become_main(handed_over):
        if predecessor is not None:
            predecessor.close()  # stopped while waiting
        await supervisor.finished.wait()
        return 0
    report_main(inherited.generation)  # to the stable-pid holder, if any: signals come here now
    if supervisor.fd_store is not None:
        supervisor.fd_store.start()
    if handed_over:
        predecessor.confirm_serving(keep_open=agreed)  # now the old main may report the reload done
    rolling_out = None
    if rolling:  # beside the supervisor: a stop ends the generation whatever the rollout is waiting for
        rolling_out = asyncio.ensure_future(rollout(supervisor, predecessor if agreed else None, settings, listeners,
                                                    inherited, metrics))
    await supervisor.finished.wait()
    if rolling_out is not None:
        rolling_out.cancel()
    return 0


async def rollout(supervisor: Supervisor, predecessor: PredecessorLink | None, settings: ServeSettings, listeners,
                  inherited: Inherited, metrics: Metrics | None) -> None:
    """Our first worker serves: start the others one by one as the old main retires its own (`predecessor`,
    whose channel stays open for it), or one after the other if it does not take part (an older version, or
    gone: None). Runs until every worker serves."""
    from graceful_http.rolling import LineChannel, RolloutDriver
    from graceful_http.workers import RestartBackoff

    pool = supervisor.servers[0]
    pool.fork_now = functools.partial(fork_later_worker, settings, listeners, inherited, metrics, supervisor,
                                      predecessor)
    driver = RolloutDriver(supervisor.servers[0], LineChannel(predecessor.sock) if predecessor else None,
                           RestartBackoff())
    supervisor.dispatch(g.RolloutStarted(driver.machine))  # a reload asked for meanwhile waits for its end
    try:
        await driver.run()
    finally:
        supervisor.dispatch(g.RolloutEnded())  # a reload asked for meanwhile starts now
        if not settings.preload:
            pool.fork_now = None  # a worker replaced later is exec'd, as in any generation


def preload_app(settings: ServeSettings) -> None:
    """--preload: import the app here, before the workers are forked; StartError if it cannot be."""
    from graceful_http.apploader import AppLoadError, load_asgi3

    try:
        load_asgi3(settings.app, settings.app_dir, factory=settings.factory, interface=settings.interface)
    except AppLoadError as exc:
        if exc.details:
            log.error("%s", exc.details.rstrip())
        raise StartError(str(exc)) from None
    log.info("preloaded %s in the main", settings.app)


def fork_later_worker(settings: ServeSettings, listeners, inherited: Inherited, metrics: Metrics | None,
                      supervisor: Supervisor, predecessor: PredecessorLink | None, number: int):
    """Fork worker `number` now, from the running main (see `latefork`)."""
    from graceful_http.latefork import fork_running

    private = [*supervisor.servers[0].channels(), *supervisor.control_server.sockets()]
    if predecessor is not None:
        private.append(predecessor.sock)
    return fork_running(settings, listeners, inherited, number, metrics.shared_dir if metrics is not None else None,
                        private)


async def _start_successor(listeners, inherited: Inherited, metrics: Metrics | None, fork_only: bool, attempt: int,
                           generation: int, nice: int, standby: Standby | None = None) -> Successor:
    environ = dict(os.environ)
    carried = None
    if metrics is not None:
        carried = metrics.carried_on(reload_started=time.monotonic())
        metrics.successor_environ(environ)
    return await Successor.start(attempt, generation, listeners, inherited.for_new_generation(generation, carried),
                                 environ, fork_only, nice, standby)
