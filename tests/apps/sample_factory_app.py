"""App factories (`--factory`), as uvicorn has them.

`create_app` builds a Starlette app, `create_flask` a Flask (WSGI) app, and
`broken_factory` raises: the error must name the factory.
"""

import os

CALLS = []


def create_app():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    CALLS.append("create_app")

    async def home(request):
        return PlainTextResponse(f"made by create_app (called {len(CALLS)} time) pid:{os.getpid()}\n")

    return Starlette(routes=[Route("/", home)])


def create_flask():
    from flask import Flask

    app = Flask(__name__)

    @app.route("/")
    def home():
        return f"made by create_flask pid:{os.getpid()}\n"

    return app


def broken_factory():
    raise RuntimeError("no database configured")


def returns_nothing():
    return None
