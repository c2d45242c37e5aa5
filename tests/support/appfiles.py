"""The test apps of tests/apps as source text, with module constants rewritten.

A test deploys "new code" by writing an app file with another value for one
of its constants (GREETING, STARTUP_SECONDS, ...) and reloading.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

APPS = Path(__file__).resolve().parents[1] / "apps"

# What the test apps need besides graceful-http's own dependencies, by engine (see support.serve_process):
# the venv's packages from PyPI, and Debian 12's packages for /usr/bin/python3 (Debian has no a2wsgi:
# WSGI apps then run through uvicorn's own adapter).
NEEDED = {
    "pypi": {"starlette": "pip install starlette", "flask": "pip install flask", "a2wsgi": "pip install a2wsgi",
             "prometheus_client": "pip install prometheus_client"},
    "debian": {"starlette": "apt-get install python3-starlette", "flask": "apt-get install python3-flask",
               "prometheus_client": "apt-get install python3-prometheus-client"},
}


def require_packages(engine: str) -> None:
    """Fail (never skip) when the engine's interpreter lacks a package the test apps need, naming it."""
    import pytest

    from support.serve_process import ENGINES, clean_environ

    missing = []
    for module, how in NEEDED[engine].items():
        result = subprocess.run([ENGINES[engine], "-c", f"import {module}"], capture_output=True,
                                env=clean_environ())
        if result.returncode != 0:
            missing.append(f"{module} ({how})")
    if missing:
        pytest.fail(f"engine {engine} ({ENGINES[engine]}) lacks: {', '.join(missing)}")


def app_source(name: str, **constants: object) -> str:
    """tests/apps/NAME.py with each `CONSTANT = ...` line replaced by `CONSTANT = repr(value)`."""
    text = (APPS / f"{name}.py").read_text()
    for constant, value in constants.items():
        pattern = re.compile(rf"^{re.escape(constant)} = .*$", re.MULTILINE)
        text, replaced = pattern.subn(f"{constant} = {value!r}", text, count=1)
        if not replaced:
            raise KeyError(f"tests/apps/{name}.py has no module constant {constant}")
    return text
