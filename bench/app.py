"""The benchmark's app: the same hello-world ASGI app for every server.

The body names the pid that served it, so the load tool can tell
generations and workers apart. It speaks the lifespan protocol so that no
server logs "lifespan unsupported" or takes a different start-up path.
"""

import os

HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def app(scope, receive, send):
    if scope["type"] == "http":
        body = b"Hello, world! pid:%d\n" % os.getpid()
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [*HEADERS, (b"content-length", b"%d" % len(body))],
        })
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
