"""What every serving process does, a generation's main or a worker: build and start its HTTP engines, say
why it cannot start, and drain and shut down at the end."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING, Protocol

from graceful_http import logs
from graceful_http.apploader import AppLoadError, load_asgi3
from graceful_http.control import ControlLayer, ControlPolicy, ControlState, not_found
from graceful_http.handover import AdoptionPoint, Handover, connect_all
from graceful_http.listeners import CONTROL_SOCKET_NAME
from graceful_http.settings import ServeSettings

if TYPE_CHECKING:
    from graceful_http.metrics import Metrics

log = logging.getLogger("graceful_http")


class StartError(Exception):
    """This process cannot serve; the message is the one-line reason."""


class Server(Protocol):
    """What a main drives while serving and draining: an `engine.Engine`, or a `workers.WorkerPool`."""

    total_requests: int

    def describe(self) -> str: ...
    def in_flight(self) -> int: ...
    def stop_accepting(self, replaced: bool = False, moving_to: int | None = None) -> None: ...
    async def drain(self, deadline: float, websocket_code: int) -> tuple[int, int]: ...
    async def shutdown_app(self) -> None: ...


class Servers(list):
    """A process's servers (its engines, or its worker pool), counted together."""

    def in_flight(self) -> int:
        return sum(server.in_flight() for server in self)

    @property
    def total_requests(self) -> int:
        return sum(server.total_requests for server in self)

    @property
    def adopted(self) -> int:
        """Keep-alive connections taken over from the previous generation."""
        return sum(getattr(server, "adopted", 0) for server in self)


class FailureReport(Protocol):
    """The channel to whoever started this process, if anyone: a predecessor or a main."""

    def report_failed(self, reason: str) -> None: ...


def report_start_failure(reason: str, to: FailureReport | None, exit_code: int = 1) -> int:
    """Log why this process cannot start and tell the process that started it, if any."""
    log.error("cannot start: %s", reason)
    if to is not None:
        to.report_failed(reason)
    return exit_code


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


def build_engines(settings: ServeSettings, listeners, control: ControlState, metrics: Metrics | None = None):
    """The HTTP engines of one serving process: the app's (with the control layer) and the control socket's."""
    # uvicorn: not needed by a workers' main
    from graceful_http.engine import Engine, EngineSettingError, parser_refuses_double_framing

    try:
        token = read_token(settings.control_token_file)
        app, interface = load_asgi3(settings.app, settings.app_dir,
                                    factory=settings.factory, interface=settings.interface)
    except AppLoadError as exc:
        if exc.details:
            log.error("%s", exc.details.rstrip())
        raise StartError(str(exc)) from None
    log.info("loaded %s (%s)", settings.app, interface)
    public = [item for item in listeners if item.name != CONTROL_SOCKET_NAME]
    private = [item for item in listeners if item.name == CONTROL_SOCKET_NAME]
    access = logs.log_access if settings.access_log else None
    engines = []
    if public:
        policy = ControlPolicy(allow=settings.control_allow, token=token, control_socket_elsewhere=bool(private))
        stack = ControlLayer(app, control, policy, access, metrics, observe_all=settings.canary > 0,
                             check_framing=not parser_refuses_double_framing())
        websockets = {"ws": settings.ws, "ws_max_size": settings.ws_max_size,
                      "ws_ping_interval": settings.ws_ping_interval, "ws_ping_timeout": settings.ws_ping_timeout}
        try:
            engine = Engine(stack.entry(), [item.sock for item in public], idle_grace=settings.idle_grace,
                            websockets=websockets, websocket_close_spread=settings.websocket_close_spread,
                            settings=settings)
        except EngineSettingError as exc:  # this uvicorn cannot do a setting, or a certificate does not load
            raise StartError(str(exc)) from None
        engine.adopts_connections = True  # the app's: a new generation takes the old one's connections here
        engines.append(engine)
    if private:  # the admins' socket: control endpoints only, trusted by its file mode
        stack = ControlLayer(not_found, control, ControlPolicy(trusted=True), access, metrics)
        engines.append(Engine(stack.entry(), [item.sock for item in private], idle_grace=0.1, lifespan=False))
    return engines


async def start_engines(engines) -> None:
    from graceful_http.engine import StartupFailed

    try:
        for engine in engines:
            await engine.start()
    except StartupFailed as exc:
        raise StartError(str(exc)) from None


def open_adoption_point(servers, main_pid: int, index: int, metrics: Metrics | None = None,
                        spare: tuple[int, ...] = ()) -> AdoptionPoint | None:
    """Where this serving process takes the previous generation's connections (see `handover`); None if it
    can't (then the previous generation drains them itself). `spare`: indexes to take if `index`'s address is
    still held (by the worker this one replaces while it hands its connections over)."""
    engine = next((server for server in servers if getattr(server, "adopts_connections", False)), None)
    if engine is None:
        return None

    async def adopt(sock):
        await engine.adopt(sock)
        if metrics is not None:
            metrics.connections(adopted=1)

    def reported(handed_over: int, fell_back: int) -> None:
        if metrics is not None:
            metrics.connections(handed_over=handed_over, fell_back=fell_back)

    for slot in (index, *spare):
        point = AdoptionPoint(main_pid, slot, adopt, reported, serving=lambda: len(engine.connections))
        try:
            point.open()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and slot != (index, *spare)[-1]:
                continue
            log.warning("cannot take connections from a previous generation (%s); it will close them itself", exc)
            return None
        return point
    return None


def stop_accepting(servers, control: ControlState, replaced: bool, moving_to: int | None) -> None:
    """Stop accepting, now. `moving_to`: the new generation's main, which adopts our connections; nobody is
    told `Connection: close` then, unless `connect_successor` finds they can't move after all."""
    control.connections_move = moving_to is not None
    control.accepting = False
    for server in servers:
        server.stop_accepting(replaced=replaced, moving_to=moving_to)


async def connect_successor(servers, control: ControlState, moving_to: int | None) -> list[Handover]:
    """Channels to the adoption points of the generation whose main is `moving_to` (milliseconds); if there
    are none after all, every connection drains here, lame-duck style."""
    if moving_to is None or not any(getattr(server, "adopts_connections", False) for server in servers):
        return []  # nothing to move, or the workers move their own
    movers = await connect_all(moving_to)
    if not movers:
        log.warning("generation of pid %d has no adoption point: its connections drain here", moving_to)
        control.connections_move = False
        for server in servers:
            if getattr(server, "adopts_connections", False):
                server.fall_back_all("the new generation does not adopt connections")
    return movers


async def drain_and_shut_down(servers: list[Server], graceful_timeout: float, websocket_code: int,
                              metrics: Metrics | None = None, movers: list[Handover] = (),
                              adoption: AdoptionPoint | None = None,
                              moving: bool = False) -> tuple[int, int, int, int]:
    """Finish what clients started, up to the graceful timeout (WebSockets are closed with `websocket_code`;
    keep-alive connections go over `movers` as they become idle, and those our predecessor still hands
    us through `adoption` join them), then run the app's lifespan shutdown. Returns (requests answered
    while draining, requests cut, connections handed over, connections fallen back). An app whose
    shutdown raises is logged, never allowed to keep this process from reporting and exiting."""
    deadline = time.monotonic() + graceful_timeout
    arriving = adoption.receiving if adoption is not None else None
    results = await asyncio.gather(*(
        server.drain(deadline, websocket_code, movers=list(movers), arriving=arriving)
        if getattr(server, "adopts_connections", False) else server.drain(deadline, websocket_code)
        for server in servers))
    served, cut = sum(r[0] for r in results), sum(r[1] for r in results)
    handed_over = sum(getattr(server, "handed_over", 0) for server in servers)
    fell_back = sum(getattr(server, "fell_back", 0) for server in servers)
    for index, mover in enumerate(movers):  # the counts, once, for the new generation's metrics
        await mover.finish(*((handed_over, fell_back) if index == 0 else (0, 0)))
    if cut:
        log.warning("graceful timeout (%gs) reached: cut %d request(s) still in flight", graceful_timeout, cut)
        if metrics is not None:
            metrics.cut.inc(cut)
    summary = f"{served} request(s) answered while draining, {cut} cut"
    if moving:
        summary += f"; connections: {handed_over} handed over, {fell_back} fell back"
    log.info("drained: %s", summary)
    for server in servers:
        try:
            await server.shutdown_app()
        except Exception:  # the app's own shutdown failing must not keep us alive
            log.exception("the app's lifespan shutdown failed")
    return served, cut, handed_over, fell_back
