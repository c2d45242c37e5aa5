"""echo_app, plus two ways for a worker to go wrong: GET /block?seconds=S blocks the event loop in
`time.sleep` (the synchronous call in a coroutine that --worker-timeout exists for), and GET /grow?mib=N
keeps N MiB more allocated (for --max-worker-memory)."""

import os
import time
from urllib.parse import parse_qs

from echo_app import app as echo

HELD = []


def block_the_event_loop(seconds: float) -> None:
    time.sleep(seconds)  # the blocking call the stack dump must show


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] in ("/block", "/grow"):
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        if scope["path"] == "/block":
            block_the_event_loop(float(query["seconds"]))
        else:
            HELD.append(b"\x01" * (int(query["mib"]) * 1024 * 1024))  # written, so resident
        answer = f"pid:{os.getpid()}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})
        return
    await echo(scope, receive, send)
