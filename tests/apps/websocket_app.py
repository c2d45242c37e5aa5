"""An app with WebSockets and a Server-Sent-Events stream, as plain ASGI (no framework needed).

- `/ws`: accepts, then sends `pid:<pid> n:<count>` every 0.2 s until the client or the server closes;
  on `websocket.disconnect` it logs `app saw websocket.disconnect code=<code>` and finishes its handler.
- `/events`: a text/event-stream that sends an event every 0.2 s, forever.
- anything else: `pid:<pid>`.
"""

import asyncio
import os
import sys


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        return await websocket(scope, receive, send)
    if scope["path"] == "/events":
        return await events(send)
    body = f"pid:{os.getpid()}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def websocket(scope, receive, send):
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    incoming = asyncio.ensure_future(receive())
    count = 0
    while True:
        done, _ = await asyncio.wait({incoming}, timeout=0.2)
        if done:
            message = incoming.result()
            if message["type"] == "websocket.disconnect":
                print(f"app saw websocket.disconnect code={message.get('code')}", file=sys.stderr, flush=True)
                return
            incoming = asyncio.ensure_future(receive())
            continue
        count += 1
        try:
            await send({"type": "websocket.send", "text": f"pid:{os.getpid()} n:{count}"})
        except Exception as exc:  # sending after the close: the disconnect is on its way
            print(f"app send failed: {type(exc).__name__}", file=sys.stderr, flush=True)


async def events(send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    count = 0
    while True:
        count += 1
        await send({"type": "http.response.body", "body": f"data: {count}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.2)
