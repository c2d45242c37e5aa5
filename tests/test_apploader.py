"""Loading the app: every way it can fail gets a one-line reason (apploader)."""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from graceful_http.apploader import AppLoadError, load_app


@pytest.fixture
def app_module(tmp_path):
    """Write a module with a unique name into tmp_path; yields a writer returning its name."""
    written = []

    def write(source: str) -> str:
        name = f"gh_test_app_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_load_app_works(app_module, tmp_path):
    name = app_module("async def app(scope, receive, send):\n    pass\n\nclass ns:\n    app = app\n")
    assert callable(load_app(f"{name}:app", str(tmp_path)))
    assert load_app(f"{name}:ns.app", str(tmp_path)) is load_app(f"{name}:app", str(tmp_path))


@pytest.mark.parametrize("spec", ["nocolon", ":app", "module:", ""])
def test_load_app_invalid_spec(spec):
    with pytest.raises(AppLoadError) as caught:
        load_app(spec)
    assert str(caught.value) == f"invalid APP {spec!r}: expected module:attribute, e.g. myproject.asgi:application"


def test_load_app_missing_module(tmp_path):
    with pytest.raises(AppLoadError) as caught:
        load_app("gh_no_such_module_here:app", str(tmp_path))
    assert str(caught.value) == "cannot import 'gh_no_such_module_here': no module named 'gh_no_such_module_here'"
    assert caught.value.details == ""


def test_load_app_missing_package_of_a_dotted_module(tmp_path):
    with pytest.raises(AppLoadError) as caught:
        load_app("gh_no_such_pkg.asgi:app", str(tmp_path))
    assert str(caught.value) == "cannot import 'gh_no_such_pkg.asgi': no module named 'gh_no_such_pkg'"


def test_load_app_module_missing_a_dependency(app_module, tmp_path):
    name = app_module("x = 1\nimport gh_missing_dependency_xyz\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == (f"importing {name!r} raised ModuleNotFoundError: "
                                 f"No module named 'gh_missing_dependency_xyz' ({tmp_path / name}.py:2)")


def test_load_app_missing_attribute(app_module, tmp_path):
    name = app_module("application = None\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"module {name!r} has no attribute 'app'"


def test_load_app_not_callable(app_module, tmp_path):
    name = app_module("app = 42\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"'{name}:app' is a int, not an application (not callable)"


def test_load_app_module_raising_at_import(app_module, tmp_path):
    name = app_module('import os\n\nraise RuntimeError("deploy went wrong")\n')
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    message = str(caught.value)
    assert message == f"importing {name!r} raised RuntimeError: deploy went wrong ({tmp_path / name}.py:3)"
    assert "\n" not in message
    assert "Traceback (most recent call last)" in caught.value.details
    assert "deploy went wrong" in caught.value.details


def test_load_app_module_exiting_at_import(app_module, tmp_path):
    name = app_module("import sys\nsys.exit(3)\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"importing {name!r} raised SystemExit: 3 ({tmp_path / name}.py:2)"


def test_load_app_syntax_error_names_the_app_file():
    """KNOWN SERVICE BUG (fails): for a SyntaxError the last traceback frame is importlib's,
    so the message ends with '(<frozen importlib._bootstrap>:241)' instead of the app's file:line."""
    with tempfile.TemporaryDirectory() as directory:
        name = f"gh_test_app_{uuid.uuid4().hex[:12]}"
        path = Path(directory) / f"{name}.py"
        path.write_text("x = 1\ndef app(:\n")
        try:
            with pytest.raises(AppLoadError) as caught:
                load_app(f"{name}:app", directory)
        finally:
            sys.modules.pop(name, None)
            sys.path.remove(directory)
    message = str(caught.value)
    assert message.startswith(f"importing {name!r} raised SyntaxError: ")
    assert "\n" not in message
    assert "<frozen" not in message, message
    assert message.endswith(f"({path}:2)"), message
