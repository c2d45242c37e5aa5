"""uvicorn_core: the engine's uvicorn is the package without its command line, and an `import uvicorn` after it
still gets the whole package. Each engine's interpreter runs in a fresh process (its modules are the point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
PROBE = """
import json, sys
from graceful_http import engine
seen = {"version": engine.uvicorn.__version__, "config": engine.uvicorn.Config.__module__,
        "server": engine.uvicorn.Server.__module__, "cli_loaded": "uvicorn.main" in sys.modules}
import uvicorn
from uvicorn import run
seen.update(same_module=uvicorn is engine.uvicorn, run=run.__module__, cli_loaded_after="uvicorn.main" in sys.modules)
import importlib.metadata
seen["installed"] = importlib.metadata.version("uvicorn")
print(json.dumps(seen))
"""


@pytest.mark.parametrize("python", ["/usr/bin/python3", sys.executable], ids=["debian", "pypi"])
def test_the_engine_imports_uvicorn_without_its_command_line(python):
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(SERVICE), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["version"] == seen["installed"]
    assert (seen["config"], seen["server"]) == ("uvicorn.config", "uvicorn.server")
    assert not seen["cli_loaded"]
    assert seen["same_module"] and seen["run"] == "uvicorn.main" and seen["cli_loaded_after"]
