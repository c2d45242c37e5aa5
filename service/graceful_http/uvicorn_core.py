"""uvicorn's server without its command line.

`import uvicorn` runs the package's `__init__`, which imports `uvicorn.main`:
its click command line, its reloaders and, through them, watchfiles and
anyio (multiprocessing in older versions), about a fifth of what a new
generation spends on imports (callgrind: 613 M instructions for the
imports of a start, 119 M of them there), all of it while the old
generation serves on the same CPUs, for code an embedded server never runs.
`load()` makes the package's module without running its `__init__`, gives it
what graceful-http uses (`Config`, `Server`, `__version__`), and runs the
real `__init__` in it the first time anything else is asked of it (an app
that calls `uvicorn.run`), so an `import uvicorn` elsewhere still finds the
whole package.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types

_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def load() -> types.ModuleType:
    """The `uvicorn` module, with `Config`, `Server` and `__version__` (imported whole if it cannot be so)."""
    module = sys.modules.get("uvicorn")
    if module is not None:
        return module
    spec = importlib.util.find_spec("uvicorn")
    version = declared_version(spec.origin) if spec is not None and spec.origin else None
    if version is None or spec.submodule_search_locations is None:
        import uvicorn

        return uvicorn
    module = importlib.util.module_from_spec(spec)

    def complete(name: str):
        del module.__getattr__  # once: the package's own __init__ sets everything it exports
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = complete
    sys.modules["uvicorn"] = module
    try:
        from uvicorn.config import Config
        from uvicorn.server import Server
    except BaseException:
        del sys.modules["uvicorn"]
        raise
    module.Config, module.Server, module.__version__ = Config, Server, version
    return module


def declared_version(init_path: str) -> str | None:
    """The `__version__ = "…"` line of the package's `__init__.py`, or None."""
    try:
        with open(init_path, encoding="utf-8") as file:
            found = _VERSION.search(file.read())
    except (OSError, UnicodeDecodeError):
        return None
    return found.group(1) if found else None
