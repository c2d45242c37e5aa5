"""Real ASGI and WSGI apps: Starlette with a lifespan, Flask, app factories, and bad apps.

The systemd tests run the shipped units in a container (see
test_systemd_service.py) with a test app in /srv/app, under a load that never
retries, across reloads that deploy changed code. The standalone tests run
`python -m graceful_http serve|check` as plain processes.

Engines: "pypi" is the venv (newest uvicorn, Starlette, Flask, a2wsgi from
PyPI); "debian" is /usr/bin/python3 with Debian 12's python3-uvicorn 0.17.6,
python3-starlette 0.26 and python3-flask 2.2 (no a2wsgi in Debian: uvicorn's
own WSGI adapter). A missing package fails the test, naming it.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from harness.container import wait_until
from harness.processes import alive, free_port
from harness.systemd_service import SERVICE, InstalledService
from support.appfiles import APPS, app_source, require_packages
from support.load import Load, get, pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, run_cli


def container_name(test: str) -> str:
    return f"gh-apps-{test}-{os.getpid()}"[:60]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{text}"
    return lines[0]


# ---- bad apps, at start (standalone) -------------------------------------------------------

# Issue 6's bad input (and two more of the same kind): one line on stderr, nothing else.
BAD_APPS = {
    "missing module": (["sample_no_such_module:app"],
                       "cannot import 'sample_no_such_module': no module named 'sample_no_such_module'"),
    "missing attribute": (["sample_flask_app:application"], "module 'sample_flask_app' has no attribute 'application'"),
    "not an app": (["sample_not_an_app:app"], "'sample_not_an_app:app' is a dict, not an application"),
    "WSGI app as ASGI": (["sample_flask_app:app", "--interface", "asgi3"],
                         "'sample_flask_app:app' is not an ASGI 3 application"),
    "not module:attribute": (["sample_flask_app"], "invalid APP 'sample_flask_app': expected module:attribute"),
    "factory returns no app": (["sample_factory_app:returns_nothing", "--factory"],
                               "the factory 'sample_factory_app:returns_nothing' returned a NoneType, not an application"),
}
# The app's own code raised: its traceback may come first (it is the app author's bug), then the one-line reason.
APP_CODE_RAISED = {
    "missing dependency": (["sample_missing_dependency:app"],
                           "importing 'sample_missing_dependency' raised ModuleNotFoundError:"
                           " No module named 'sample_no_such_dependency'"),
    "broken factory": (["sample_factory_app:broken_factory", "--factory"],
                       "calling the factory 'sample_factory_app:broken_factory' raised RuntimeError:"
                       " no database configured"),
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", [*BAD_APPS, *APP_CODE_RAISED])
def test_bad_app_fails_to_start_with_one_line(case, engine, tmp_path):
    require_packages(engine)
    args, message = BAD_APPS.get(case) or APP_CODE_RAISED[case]
    last_line = one_line if case in BAD_APPS else (lambda text: text.strip().splitlines()[-1])
    result = run_cli(ENGINES[engine], "serve", *args, "--app-dir", str(APPS), "--bind", f"{HOST}:{free_port()}",
                     cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "cannot start: " + message in last_line(result.stderr), result.stderr
    # `check` says the same, as `graceful-http: <reason>`.
    result = run_cli(ENGINES[engine], "check", *args, "--app-dir", str(APPS), cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert last_line(result.stderr).startswith("graceful-http: " + message), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_factory_without_factory_flag_is_not_served_as_a_broken_app(engine, tmp_path):
    """`create_app` (no arguments) given without --factory can be no ASGI or WSGI app.

    uvicorn detects it and calls it (with a warning); refusing it with a hint at
    --factory would do too. Starting, saying `check: ok`, and answering every
    request with 500 is what must not happen.
    """
    require_packages(engine)
    python = ENGINES[engine]
    check = run_cli(python, "check", "sample_factory_app:create_app", "--app-dir", str(APPS), cwd=tmp_path)
    if check.returncode != 0:
        assert check.returncode == 1
        assert "--factory" in one_line(check.stderr), check.stderr
        return
    with ServeProcess(python, tmp_path, "sample_factory_app:create_app", "--app-dir", str(APPS)) as server:
        def answered():
            if server.popen.poll() is not None:
                return ("exited", server.popen.returncode)
            try:
                return get(HOST, server.port, "/", timeout=5)
            except OSError:
                return None
        outcome = wait_until(answered, 20, what="the factory app to answer or the server to exit")
        assert outcome[0] == 200, (f"`check` said ok, yet the factory given without --factory answers"
                                   f" {outcome[0]}: {outcome[1]!r}\n{server.log()[-1500:]}")
        assert b"made by create_app" in outcome[1]


# ---- factories and WSGI detection (standalone) ---------------------------------------------

FACTORIES = {
    "starlette factory": (["sample_factory_app:create_app", "--factory"], b"made by create_app (called 1 time)",
                          "(asgi3)"),
    "flask factory": (["sample_factory_app:create_flask", "--factory"], b"made by create_flask", "(wsgi)"),
    "flask factory, --interface wsgi": (["sample_factory_app:create_flask", "--factory", "--interface", "wsgi"],
                                        b"made by create_flask", "(wsgi)"),
    "flask, detected": (["sample_flask_app:app"], b"flask says hello", "(wsgi)"),
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", list(FACTORIES))
def test_factories_and_wsgi_apps_serve(case, engine, tmp_path):
    require_packages(engine)
    args, expected, interface = FACTORIES[case]
    with ServeProcess(ENGINES[engine], tmp_path, *args, "--app-dir", str(APPS)) as server:
        status, body, headers = server.wait_serving()
        assert expected in body
        assert pid_of(body) == server.pid
        assert f"loaded {args[0]} {interface}" in server.log()
        check = run_cli(ENGINES[engine], "check", *args, "--app-dir", str(APPS), cwd=tmp_path)
        assert (check.returncode, check.stdout) == (0, "ok\n"), check.stderr
        assert server.stop() == 0


@pytest.mark.parametrize("engine", list(ENGINES))
def test_flask_app_gets_the_request_body(engine, tmp_path):
    require_packages(engine)
    import http.client

    with ServeProcess(ENGINES[engine], tmp_path, "sample_flask_app:app", "--app-dir", str(APPS)) as server:
        server.wait_serving()
        payload = os.urandom(200_000)
        connection = http.client.HTTPConnection(HOST, server.port, timeout=20)
        try:
            connection.request("POST", "/echo", body=payload)
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, payload)
        finally:
            connection.close()


# ---- under systemd, across reloads -----------------------------------------------------------


def lifespan_entries(service: InstalledService, what: str) -> list[dict]:
    return [e for e in service.container.journal_json(SERVICE) if f"app lifespan {what}:" in e.get("MESSAGE", "")]


def wait_for_answer(service: InstalledService, text: bytes, path: str = "/") -> bytes:
    """A fresh connection gets `text` (right after a reload, the old generation may still take one)."""
    def answered():
        status, body, _ = get("127.0.0.1", service.port, path)
        return body if status == 200 and text in body else None
    return wait_until(answered, timeout=10, what=f"{text!r} from GET {path}")


@pytest.mark.systemd
@pytest.mark.parametrize("engine,workers", [("pypi", 1), ("debian", 1), ("pypi", 2)])
def test_starlette_app_with_lifespan_across_reloads_under_load(engine, workers):
    require_packages(engine)
    with InstalledService(container_name(f"star-{engine}{workers}"), engine,
                          serve_args=f"sample_starlette_app:app --workers {workers}") as service:
        service.write_app("sample_starlette_app", app_source("sample_starlette_app", GREETING="version one"))
        service.container.systemctl("start", SERVICE)
        mains = [service.main_pid()]
        serving = {}  # main pid -> the pids that serve HTTP in its generation

        def check_generation(main: int, version: str) -> None:
            serving[main] = {main} if workers == 1 else set(service.children(main))
            assert len(serving[main]) == workers
            body = wait_for_answer(service, version.encode())
            assert pid_of(body) in serving[main]
            # The process that answers ran its own lifespan startup before it served.
            for _ in range(4):
                _, body, _ = get("127.0.0.1", service.port, "/lifespan")
                started_in, serving_from = re.fullmatch(rb"lifespan started in (\d+), serving from (\d+)\n",
                                                        body).groups()
                assert started_in == serving_from and int(serving_from) in serving[main], body

        check_generation(mains[0], "version one")
        with Load("127.0.0.1", service.port, clients=6, pause=0.005) as load:
            load.wait_for_requests(100)
            for version in ("version two", "version three"):
                service.write_app("sample_starlette_app", app_source("sample_starlette_app", GREETING=version))
                result = service.reload()
                assert result.returncode == 0
                new = service.main_pid()
                assert new not in mains
                mains.append(new)
                check_generation(new, version)
                wait_until(lambda: any(load.result.pids[p] for p in serving[new]), timeout=10,
                           what=f"the load to reach generation {len(mains)}")
            load.wait_for_requests(100)
        assert load.result.failures == [], load.result.summary()

        # Lifespan startup ran in every serving process of every generation, with the code of its
        # generation; shutdown in every one that drained.
        wait_until(lambda: set(service.cgroup_pids()) == service.generation(mains[-1]), timeout=30,
                   what="old generations to exit")

        def by_generation(entries):
            found = {}
            for entry in entries:
                greeting = re.search(r"app lifespan \w+: (.*) \(pid \d+\)$", entry["MESSAGE"]).group(1)
                found.setdefault(entry["GENERATION"], set()).add((int(entry["_PID"]), greeting))
            return found

        versions = ["version one", "version two", "version three"]
        assert by_generation(lifespan_entries(service, "startup")) == {
            str(g + 1): {(pid, versions[g]) for pid in serving[main]} for g, main in enumerate(mains)}
        expected_shutdowns = {str(g + 1): {(pid, versions[g]) for pid in serving[main]}
                              for g, main in enumerate(mains[:-1])}
        service.container.wait_for(lambda: by_generation(lifespan_entries(service, "shutdown")) == expected_shutdowns,
                                   what=f"lifespan shutdown lines {expected_shutdowns}")
        assert service.state()["NRestarts"] == "0"


FLASK_SETUPS = [("pypi", "", 1), ("debian", "", 1), ("pypi", "--interface wsgi", 2), ("debian", "--interface wsgi", 1)]


@pytest.mark.systemd
@pytest.mark.parametrize("engine,interface,workers", FLASK_SETUPS)
def test_flask_app_across_reloads_under_load(engine, interface, workers):
    require_packages(engine)
    name = container_name(f"flask-{engine}-{'wsgi' if interface else 'auto'}{workers}")
    with InstalledService(name, engine, serve_args=f"sample_flask_app:app {interface} --workers {workers}") as service:
        service.write_app("sample_flask_app", app_source("sample_flask_app", GREETING="flask one"))
        service.container.systemctl("start", SERVICE)
        wait_for_answer(service, b"flask one")
        mains = [service.main_pid()]
        with Load("127.0.0.1", service.port, clients=6, pause=0.005) as load:
            load.wait_for_requests(100)
            for version in ("flask two", "flask three"):
                service.write_app("sample_flask_app", app_source("sample_flask_app", GREETING=version))
                assert service.reload().returncode == 0
                mains.append(service.main_pid())
                assert mains[-1] not in mains[:-1]
                body = wait_for_answer(service, version.encode())
                serving = {mains[-1]} if workers == 1 else set(service.children(mains[-1]))
                assert pid_of(body) in serving
                wait_until(lambda: any(load.result.pids[p] for p in serving), timeout=10,
                           what="the load to reach the new generation")
            load.wait_for_requests(100)
        assert load.result.failures == [], load.result.summary()
        journal = service.journal()
        # Every generation (every worker) detected, or was told, that this is a WSGI app.
        assert journal.count("loaded sample_flask_app:app (wsgi)") == 3 * workers, journal[-3000:]
        assert service.state()["NRestarts"] == "0"


BAD_DEPLOYS = {
    # name: (shell command deploying it in /srv/app, the reason the reload must give)
    "missing module": ("rm /srv/app/sample_swap.py",
                       "cannot import 'sample_swap': no module named 'sample_swap'"),
    "missing attribute": ("printf 'application = None\\n' > /srv/app/sample_swap.py",
                          "module 'sample_swap' has no attribute 'app'"),
    "not an app": ("printf 'app = \"/srv/app\"\\n' > /srv/app/sample_swap.py",
                   "'sample_swap:app' is a str, not an application"),
    "WSGI app as ASGI": ("cp /srv/app/sample_flask_app.py /srv/app/sample_swap.py",
                         "'sample_swap:app' is not an ASGI 3 application"),
}


@pytest.mark.systemd
@pytest.mark.parametrize("engine", ["pypi", "debian"])
def test_bad_apps_make_the_reload_fail_and_the_old_generation_serve(engine):
    require_packages(engine)
    with InstalledService(container_name(f"badapp-{engine}"), engine,
                          serve_args="sample_swap:app --interface asgi3") as service:
        good = app_source("sample_starlette_app", GREETING="the good one")
        service.write_app("sample_swap", good)
        service.write_app("sample_flask_app", app_source("sample_flask_app"))
        service.container.systemctl("start", SERVICE)
        wait_for_answer(service, b"the good one")
        serving = service.main_pid()
        with Load("127.0.0.1", service.port, clients=4, pause=0.01) as load:
            load.wait_for_requests(50)
            for case, (deploy, reason) in BAD_DEPLOYS.items():
                service.write_app("sample_swap", good)
                service.container.run(deploy)
                result = service.reload(check=False)
                assert result.returncode != 0, f"{case}: the reload succeeded"
                assert service.main_pid() == serving, case
                state = service.state()
                assert (state["ActiveState"], state["SubState"]) == ("active", "running"), (case, state)
                journal = service.journal()
                assert f"reload failed: {reason}" in journal, f"{case}:\n{journal[-2000:]}"
                status = service.container.show(SERVICE, "StatusText")["StatusText"]
                assert status.startswith(f"reload failed: {reason}"), (case, status)
                assert get("127.0.0.1", service.port, "/")[1].startswith(b"the good one"), case
                load.wait_for_requests(20)
            # Fixed: the reload goes through.
            service.write_app("sample_swap", app_source("sample_starlette_app", GREETING="fixed"))
            assert service.reload().returncode == 0
            assert service.main_pid() != serving
            wait_for_answer(service, b"fixed")
            load.wait_for_requests(20)
        assert load.result.failures == [], load.result.summary()
        assert service.state()["NRestarts"] == "0"


# ---- WSGI requests across a handover (standalone) -------------------------------------------


@pytest.mark.parametrize("engine", list(ENGINES))
def test_wsgi_requests_in_flight_finish_and_the_graceful_timeout_holds(engine, tmp_path):
    """A blocking WSGI handler runs in a thread: the handover lets it finish, and the graceful timeout
    still ends the old generation when one takes too long (its thread must not keep the process alive)."""
    require_packages(engine)
    import signal
    import threading

    pid_file = tmp_path / "gh.pid"
    with ServeProcess(ENGINES[engine], tmp_path, "sample_flask_app:app", "--app-dir", str(APPS),
                      "--graceful-timeout", "2", "--pid-file", str(pid_file)) as server:
        server.wait_serving()
        first = server.pid
        answers = {}

        def ask(name, seconds):
            try:
                answers[name] = get(HOST, server.port, f"/sleep?seconds={seconds}", timeout=60)
            except OSError as exc:  # the stuck one is cut
                answers[name] = exc

        quick = threading.Thread(target=ask, args=("quick", 1))
        stuck = threading.Thread(target=ask, args=("stuck", 30), daemon=True)
        quick.start()
        stuck.start()
        time.sleep(0.3)  # both requests are in the handler threads
        os.kill(first, signal.SIGHUP)
        wait_until(lambda: pid_file.read_text().strip() not in ("", str(first)), timeout=20,
                   what="a new generation to take over")
        handed_over = time.monotonic()
        quick.join(timeout=20)
        assert isinstance(answers.get("quick"), tuple), answers
        status, body, _ = answers["quick"]
        assert status == 200 and pid_of(body) == first, "the request in flight finished in the old generation"
        server.wait_for_log("graceful timeout (2s) reached: cut 1 request(s)")
        wait_until(lambda: not alive(first), timeout=8,
                   what=f"the old generation (pid {first}) to exit at its graceful timeout, not when its"
                        " stuck WSGI handler returns")
        assert time.monotonic() - handed_over < 10


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_app_is_called_without_middleware_nobody_asked_for(engine, tmp_path):
    """Between uvicorn's protocol and the app: graceful-http's control layer, nothing else.

    Debian's uvicorn 0.17.6 adds its per-message trace logger (MessageLoggerMiddleware) whenever
    the "uvicorn.error" logger has no level of its own: work on every message, for lines nobody sees.
    """
    with ServeProcess(ENGINES[engine], tmp_path, "sample_stack_app:app", "--app-dir", str(APPS)) as server:
        status, body, _ = server.wait_serving()
        stack = body.decode()
        assert "graceful_http/control.py" in stack
        assert "message_logger" not in stack, stack
