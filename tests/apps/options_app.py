"""An ASGI app that shows what the server options change: the scope it got, its environment, its lifespan.

GET any path: JSON of client, scheme, root_path, path, pid, the variable named by ?env=NAME, and whether
the lifespan startup ran. GET /hold?name=N: writes HOLD_DIR/N.held, answers once HOLD_DIR/release exists
(so a test knows a request is in flight, and decides when it ends). `no_lifespan` rejects the lifespan scope.
"""

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import parse_qs

LIFESPAN_STARTED = False


async def app(scope, receive, send):
    global LIFESPAN_STARTED
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                LIFESPAN_STARTED = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"].endswith("/hold"):
        hold = Path(os.environ["HOLD_DIR"])
        (hold / f"{query['name']}.held").touch()
        while not (hold / "release").exists():
            await asyncio.sleep(0.01)
    body = json.dumps({
        "client": list(scope["client"]) if scope.get("client") else None,
        "scheme": scope["scheme"],
        "root_path": scope.get("root_path", ""),
        "path": scope["path"],
        "pid": os.getpid(),
        "env": os.environ.get(query["env"]) if "env" in query else None,
        "lifespan": LIFESPAN_STARTED,
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def no_lifespan(scope, receive, send):
    if scope["type"] == "lifespan":
        raise RuntimeError("this app does not do lifespan")
    await app(scope, receive, send)
