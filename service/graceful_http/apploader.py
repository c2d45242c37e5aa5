"""Import the ASGI application named `module:attribute`, with one-line errors.

uvicorn's own loader logs and calls sys.exit; a new generation must instead
report *why* it could not start to the generation that keeps serving.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback


class AppLoadError(Exception):
    """The app cannot be loaded; `str()` is a one-line reason, `details` the traceback if any."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def load_app(spec: str, app_dir: str = "."):
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppLoadError(f"invalid APP {spec!r}: expected module:attribute, e.g. myproject.asgi:application")
    if app_dir and app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppLoadError(f"cannot import {module_name!r}: no module named {exc.name!r}") from None
        raise _raised_while_importing(module_name, exc) from None
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _raised_while_importing(module_name, exc) from None
    app = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(app):
        raise AppLoadError(f"{spec!r} is a {type(app).__name__}, not an application (not callable)")
    return app


def load_asgi3(spec: str, app_dir: str = ".", *, factory: bool = False, interface: str = "auto"):
    """The app as an ASGI 3 callable, and the interface it was found to speak.

    WSGI apps (Flask, Django's WSGIHandler) run through a well-kept adapter:
    a2wsgi when installed, else uvicorn's own.
    """
    app = load_app(spec, app_dir)
    if factory:
        try:
            app = app()
        except Exception as exc:
            raise AppLoadError(f"calling the factory {spec!r} raised {type(exc).__name__}: {exc}",
                               "".join(traceback.format_exception(exc))) from None
        if not callable(app):
            raise AppLoadError(f"the factory {spec!r} returned a {type(app).__name__}, not an application")
    elif _takes_no_arguments(app):
        raise AppLoadError(f"{spec!r} takes no arguments, so it is no ASGI or WSGI app;"
                           " if it is an app factory, add --factory")
    if interface == "auto":
        interface = detect_interface(app)
    if interface == "wsgi":
        try:
            from a2wsgi import WSGIMiddleware
        except ImportError:
            from uvicorn.middleware.wsgi import WSGIMiddleware
        return WSGIMiddleware(app), interface
    if interface == "asgi2":
        from uvicorn.middleware.asgi2 import ASGI2Middleware

        return ASGI2Middleware(app), interface
    if interface == "asgi3" and not _is_coroutine_callable(app):
        raise AppLoadError(f"{spec!r} is not an ASGI 3 application (its call is not async);"
                           " a WSGI app needs --interface wsgi")
    return app, interface


def _call_target(app):
    return app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", app)  # noqa: B004 (the method itself, to inspect)


def _takes_no_arguments(app) -> bool:
    """True for a function (or callable object) that accepts no positional argument: a factory, usually."""
    if inspect.isclass(app):
        return False
    try:
        parameters = inspect.signature(_call_target(app)).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _is_coroutine_callable(app) -> bool:
    return inspect.iscoroutinefunction(_call_target(app))


def detect_interface(app) -> str:
    """asgi3 for `async (scope, receive, send)`, wsgi for `(environ, start_response)`, else asgi2."""
    if inspect.isclass(app):
        return "asgi3" if hasattr(app, "__await__") else "asgi2"
    if _is_coroutine_callable(app):
        return "asgi3"
    try:
        parameters = inspect.signature(_call_target(app)).parameters.values()
    except (TypeError, ValueError):
        return "asgi2"
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "wsgi" if len(positional) == 2 else "asgi2"


def _raised_while_importing(module_name: str, exc: BaseException) -> AppLoadError:
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    elif frames:
        last = frames[-1]
        where = f" ({last.filename}:{last.lineno})"
    details = "".join(traceback.format_exception(exc))
    return AppLoadError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}{where}", details)
