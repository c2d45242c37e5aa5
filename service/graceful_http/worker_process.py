"""A worker of a multi-worker generation, top to bottom: serve on the generation's sockets until SIGTERM,
then drain, report to the main and exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from graceful_http import __version__, balanced_accept, logs
from graceful_http.control import ControlState
from graceful_http.heartbeat import enable_stack_dumps
from graceful_http.inherited import Inherited
from graceful_http.listeners import ListenerError, acquire
from graceful_http.listenfds import ListenFdsError
from graceful_http.metrics import Metrics
from graceful_http.serving import (
    Servers,
    StartError,
    build_engines,
    connect_successor,
    drain_and_shut_down,
    open_adoption_point,
    report_start_failure,
    start_engines,
    stop_accepting,
)
from graceful_http.settings import ServeSettings
from graceful_http.startpriority import leave_idle_start
from graceful_http.websocket_drain import GOING_AWAY, SERVICE_RESTART
from graceful_http.wire import DRAINED, READY, STATS
from graceful_http.worker_upkeep import spare_adoption_indexes
from graceful_http.workers import MainLink

log = logging.getLogger("graceful_http")


async def run_worker(settings: ServeSettings, link: MainLink, inherited: Inherited, listeners=None) -> int:
    """A forked worker gets its main's `listeners`; an exec'd one finds them at fd 3…. Returns the exit code."""
    logs.setup(inherited.generation, settings.log_level, worker=link.index)
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
    link.failures = lambda: control.failed
    if settings.canary > 0:
        link.stats_interval = 0.25  # a canary of a few seconds compares these counts
    try:
        if link.main_version != __version__:
            raise StartError(f"graceful-http {__version__} is installed but this generation runs {link.main_version}:"
                             " a replacement worker would run other code; reload to start the new version")
        if listeners is None:
            listeners = acquire(settings.binds, backlog=settings.backlog)
        metrics = None
        if settings.metrics:
            metrics = Metrics(inherited.generation, worker=link.index, shared_dir=inherited.metrics_shared_dir)
        engines = Servers(build_engines(settings, listeners, control, metrics))
        if settings.workers > 1 and getattr(engines[0], "adopts_connections", False):  # the app's engine
            balanced_accept.for_worker(engines[0], os.getppid(), settings.workers, link.index)
        await start_engines(engines)
    except (ListenerError, ListenFdsError, StartError) as exc:
        return report_start_failure(str(exc), link)
    adoption = open_adoption_point(engines, os.getppid(), link.index, metrics,  # our main is our parent
                                   spare=spare_adoption_indexes(settings.workers))
    if settings.worker_timeout:
        enable_stack_dumps()

    def handing_over() -> None:  # ...or a new generation took over that adopts our connections (`drain <pid>`)
        nonlocal websocket_code
        websocket_code = SERVICE_RESTART
        stopping.set()

    link.on_drain = handing_over
    await link.connect()
    leave_idle_start()  # a new generation's worker serves from now on (see `startpriority`)
    link.send(READY)
    stats = asyncio.create_task(link.report_stats(engines[0]))
    await stopping.wait()
    if adoption is not None:
        adoption.close()
    moving_to = link.moving_to
    stop_accepting(engines, control, websocket_code == SERVICE_RESTART, moving_to)
    movers = await connect_successor(engines, control, moving_to)
    # The main counts what was cut.
    served, cut, handed_over, fell_back = await drain_and_shut_down(
        engines, settings.graceful_timeout, websocket_code, movers=movers, adoption=adoption,
        moving=moving_to is not None)
    stats.cancel()
    link.send(STATS, f"0 {engines.total_requests} {engines.adopted} {control.failed}")
    link.send(DRAINED, f"{served} {cut} {handed_over} {fell_back}")
    await link.writer.drain()
    return 0
