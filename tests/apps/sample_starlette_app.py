"""A real Starlette app with a lifespan, for tests of ASGI apps across reloads.

Works with Debian 12's python3-starlette (0.26) and the newest Starlette.
Tests rewrite the two constants below before a reload (GREETING: what `/`
answers, to see the new code serve; STARTUP_SECONDS: how long lifespan
startup takes, to watch a slow reload). Lifespan startup and shutdown log a
line each (through `logging`, so under systemd they are journal entries with
this generation's GENERATION= field).
"""

import asyncio
import contextlib
import logging
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

GREETING = "starlette says hello"
STARTUP_SECONDS = 0

log = logging.getLogger("sample_app")


@contextlib.asynccontextmanager
async def lifespan(app):
    if STARTUP_SECONDS:
        await asyncio.sleep(STARTUP_SECONDS)
    app.state.started_in = os.getpid()
    log.warning("app lifespan startup: %s (pid %d)", GREETING, os.getpid())
    yield
    log.warning("app lifespan shutdown: %s (pid %d)", GREETING, os.getpid())


async def home(request):
    return PlainTextResponse(f"{GREETING} pid:{os.getpid()}\n")


async def sleep(request):
    seconds = float(request.query_params.get("seconds", "1"))
    await asyncio.sleep(seconds)
    return PlainTextResponse(f"{GREETING} slept {seconds:g}s pid:{os.getpid()}\n")


async def lifespan_state(request):
    started_in = getattr(request.app.state, "started_in", None)
    return PlainTextResponse(f"lifespan started in {started_in}, serving from {os.getpid()}\n")


app = Starlette(routes=[Route("/", home), Route("/sleep", sleep), Route("/lifespan", lifespan_state)], lifespan=lifespan)
