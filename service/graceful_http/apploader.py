"""Import the ASGI application named `module:attribute`, with one-line errors.

uvicorn's own loader logs and calls sys.exit; a new generation must instead
report *why* it could not start to the generation that keeps serving.
"""

from __future__ import annotations

import importlib
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
        raise AppLoadError(f"{spec!r} is a {type(app).__name__}, not an ASGI application (not callable)")
    return app


def _raised_while_importing(module_name: str, exc: BaseException) -> AppLoadError:
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" ({last.filename}:{last.lineno})"
    details = "".join(traceback.format_exception(exc))
    return AppLoadError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}{where}", details)
