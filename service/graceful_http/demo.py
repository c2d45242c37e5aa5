"""The built-in demo app: the original Go demo's endpoints, as an ASGI app.

`GET /` says which process answered; `GET /sleep?seconds=N` holds a request
open so a reload can be watched finishing it.
"""

from __future__ import annotations

import asyncio
import datetime
import html
import os
from urllib.parse import parse_qs

MAX_SLEEP = 3600.0
DEFAULT_SLEEP = 50.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def parse_sleep_seconds(query_string: str) -> float:
    """The `seconds` parameter of /sleep; ValueError with the message for a 400."""
    values = parse_qs(query_string, keep_blank_values=True).get("seconds")
    if not values:
        return DEFAULT_SLEEP
    text = values[-1]
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"seconds must be a number, got {text!r}") from None
    if not 0 <= seconds <= MAX_SLEEP:  # also refuses nan
        raise ValueError(f"seconds must be between 0 and {MAX_SLEEP:g}, got {text!r}")
    return seconds


async def _respond(send, status: int, text: str) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/sleep":
        try:
            seconds = parse_sleep_seconds(scope.get("query_string", b"").decode("latin-1"))
        except ValueError as exc:
            await _respond(send, 400, f"Bad request: {exc}\n")
            return
        await asyncio.sleep(seconds)
        await _respond(send, 200, f"Hello, graceful pid:{os.getpid()}, time:{_now()}\n")
        return
    await _respond(send, 200, f"Hello, pid:{os.getpid()}, path:{html.escape(path)}, time:{_now()}\n")
