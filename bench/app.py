"""The benchmark's app: the same hello-world ASGI app for every server.

The body names the pid that served it, so the load tool can tell
generations and workers apart; a WebSocket gets that pid every 0.2 s. It speaks the lifespan protocol so that no
server logs "lifespan unsupported" or takes a different start-up path.
"""

import asyncio
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
    elif scope["type"] == "websocket":  # a ticker: its pid every 0.2 s, until either side closes
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        incoming = asyncio.ensure_future(receive())
        while True:
            done, _ = await asyncio.wait({incoming}, timeout=0.2)
            if done:
                if incoming.result()["type"] == "websocket.disconnect":
                    return
                incoming = asyncio.ensure_future(receive())
                continue
            try:
                await send({"type": "websocket.send", "text": "pid:%d" % os.getpid()})
            except Exception:  # closing: the disconnect is on its way
                pass
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
