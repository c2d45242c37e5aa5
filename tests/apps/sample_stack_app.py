"""An ASGI app that answers with the modules on its call stack.

For a test that no middleware is wrapped around a user's app that the user
did not ask for (e.g. uvicorn 0.17.6's per-message trace logger).
"""

import inspect


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    frames = "\n".join(f"{frame.filename}:{frame.function}" for frame in inspect.stack(context=0))
    body = frames.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
