"""End-to-end under real systemd 252 (booted in a container), with a real HTTP load.

Each test boots its own systemd, installs the shipped units with a drop-in
that points at this checkout, and runs once per engine: the newest uvicorn
from PyPI and Debian 12's python3-uvicorn 0.17.6 (what the .deb runs on).
"""

from __future__ import annotations

import os
import re
import threading

import pytest

from harness.container import wait_until
from harness.systemd_service import SERVICE, SOCKET, InstalledService, count
from support.load import Load, get, pid_of

pytestmark = pytest.mark.systemd

ENGINES = ["pypi", "debian"]
# (engine, workers): both engines, single-process and a two-worker generation.
SETUPS = [("pypi", 1), ("debian", 1), ("pypi", 2), ("debian", 2)]

WORKING_APP = '''
from graceful_http.demo import app as demo

VERSION = "{version}"

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/version":
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": VERSION.encode()}})
        return
    await demo(scope, receive, send)
'''
CRASHING_APP = 'raise RuntimeError("deploy went wrong")\n'
HANGING_APP = "import time\ntime.sleep(3600)\n"


def container_name(engine: str, test: str) -> str:
    return f"gh-{engine}-{test}-{os.getpid()}"[:60]


def assert_journal_truthful(service: InstalledService) -> None:
    whole = service.whole_journal()
    assert "reception only permitted for main PID" not in whole
    assert "which is not our child" not in whole


@pytest.mark.parametrize("engine,workers", SETUPS)
def test_reloads_under_load_follow_main_pid(engine, workers):
    with InstalledService(container_name(engine, f"reload{workers}"), engine,
                          serve_args=f"--workers {workers}") as service:
        service.container.systemctl("start", SOCKET)
        # Socket activation: the first connection starts the service.
        status, body, _ = get("127.0.0.1", service.port)
        assert status == 200
        first = service.main_pid()
        serving = lambda main: {main} if workers == 1 else set(service.children(main))  # noqa: E731
        assert pid_of(body) in serving(first)
        assert len(serving(first)) == workers
        expected_cmdline = service.cmdline(first)
        assert expected_cmdline[1:] == ["-m", "graceful_http", "serve", "--app-dir", "/srv/app",
                                        "--pid-file", "/run/graceful-http/main/pid", "--workers", str(workers)]

        pids = [first]
        with Load("127.0.0.1", service.port, clients=8, pause=0.005) as load:
            load.wait_for_requests(200)
            for round in range(5):
                if round % 2 == 0:
                    result = service.reload()
                    assert result.returncode == 0
                else:
                    # The public listener refuses reloads (a reverse proxy would relay them from loopback)...
                    status, body, _ = get("127.0.0.1", service.port, "/graceful", method="POST")
                    assert status == 403, body
                    # ...the admins' control socket takes them.
                    status, body = service.control_post()
                    assert status == 202, body
                    wait_until(lambda: service.main_pid() not in pids, timeout=30, what="MainPID to change")
                    # The control socket answers at once; with workers the new generation then rolls out one
                    # worker at a time, refusing reloads until it has all of them (`systemctl reload` waits).
                    wait_until(lambda: len(serving(service.main_pid())) == workers
                               and not set(service.cgroup_pids()) - service.generation(service.main_pid()),
                               timeout=60, what="the rollout to end and the old generation to leave")
                new = service.main_pid()
                assert new not in pids
                pids.append(new)
                # The new generation serves: the load sees it.
                wait_until(lambda: any(load.result.pids[p] for p in serving(new)), timeout=10,
                           what=f"a response from generation of pid {new}")
            load.wait_for_requests(200)
        result = load.result
        assert result.failures == [], result.summary()
        assert result.ok > 1000, result.summary()

        state = service.state()
        assert state == {"MainPID": str(pids[-1]), "ActiveState": "active", "SubState": "running",
                         "NRestarts": "0", "Result": "success"}
        # Old generations drain and leave: only the current one remains in the cgroup.
        wait_until(lambda: set(service.cgroup_pids()) == service.generation(pids[-1]), timeout=30,
                   what="old generations to exit")
        current = service.generation(pids[-1])  # its main and workers, or its main and standby
        # `ps` shows the same command line after any number of reloads (workers too).
        for pid in current:
            assert service.cmdline(pid) == expected_cmdline
        # It serves at SCHED_OTHER, every thread of every process, whether it started idle (where systemd could
        # apply the unit's LimitNICE=+0) or not (CI's sandbox: see test_start_priority); its standby, which
        # forks the next generation, is idle where the start is.
        idle_start = service.nice_limit(pids[-1]) >= 20
        for pid in current:
            idle = idle_start and workers == 1 and pid != pids[-1]
            assert service.policies(pid) == {os.SCHED_IDLE if idle else os.SCHED_OTHER}, (pid, pids[-1])

        journal = service.journal()
        for pid in pids[:-1]:
            assert f"handed over to pid {pids[pids.index(pid) + 1]}" in journal
        assert count(r"listening on 127\.0\.0\.1:\d+ \(http, inherited\)", journal) == len(pids)
        assert count(r"listening on unix:/run/graceful-http/control.sock \(control, inherited\)", journal) == len(pids)
        assert count(r"reload requested by graceful-http reload", journal) == 3
        assert count(r"reload requested by POST /graceful from the control socket", journal) == 2
        # Each old main, and each of its workers, says it drained.
        assert count(r"drained: \d+ request\(s\) answered while draining, 0 cut", journal) == \
            (len(pids) - 1) * (1 if workers == 1 else workers + 1)
        assert count(r"exited: generation \d+", journal) == len(pids) - 1
        assert_journal_truthful(service)


@pytest.mark.parametrize("engine", ENGINES)
def test_access_log_has_one_line_per_request_from_the_serving_pid(engine):
    with InstalledService(container_name(engine, "access"), engine) as service:
        service.container.systemctl("start", SERVICE)
        for _ in range(20):
            assert get("127.0.0.1", service.port, "/counted")[0] == 200
        service.reload()
        for _ in range(15):
            assert get("127.0.0.1", service.port, "/counted")[0] == 200
        entries = [e for e in service.container.journal_json(SERVICE) if "GET /counted" in e.get("MESSAGE", "")]
        assert len(entries) == 35
        # Native journal entries carry each generation's own pid and number.
        by_pid = {}
        for entry in entries:
            by_pid.setdefault(entry["_PID"], set()).add(entry.get("GENERATION"))
        assert len(by_pid) == 2
        assert sorted(g for gens in by_pid.values() for g in gens) == ["1", "2"]
        assert all(entry.get("_SYSTEMD_UNIT") == SERVICE for entry in entries)


@pytest.mark.parametrize("engine,workers", SETUPS)
def test_failed_reloads_leave_the_old_generation_serving(engine, workers):
    with InstalledService(container_name(engine, f"fail{workers}"), engine,
                          serve_args=f"myapp:app --ready-timeout 3 --workers {workers}") as service:
        service.write_app("myapp", WORKING_APP.format(version="one"))
        service.container.systemctl("start", SERVICE)
        serving = service.main_pid()
        assert get("127.0.0.1", service.port, "/version")[1] == b"one"

        with Load("127.0.0.1", service.port, clients=4, pause=0.01) as load:
            load.wait_for_requests(50)

            # 1. The new code raises at import.
            service.write_app("myapp", CRASHING_APP)
            result = service.reload(check=False)
            assert result.returncode != 0
            assert service.main_pid() == serving
            state = service.state()
            assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0")
            journal = service.journal()
            assert "reload failed: importing 'myapp' raised RuntimeError: deploy went wrong" in journal
            status = service.container.systemctl("status", SERVICE, check=False).stdout
            assert "reload failed: importing 'myapp' raised RuntimeError" in status

            # 2. The new code hangs: killed at the ready timeout.
            service.write_app("myapp", HANGING_APP)
            result = service.reload(check=False)
            assert result.returncode != 0
            assert "not ready within 3s" in service.journal()
            assert service.main_pid() == serving
            wait_until(lambda: set(service.cgroup_pids()) == service.generation(serving), timeout=10,
                       what="the hung generation to be gone")
            assert serving in service.cgroup_pids()

            # 3. Fixed code: the reload goes through and serves the new version.
            service.write_app("myapp", WORKING_APP.format(version="two"))
            service.reload()
            assert service.main_pid() != serving
            assert get("127.0.0.1", service.port, "/version")[1] == b"two"
            load.wait_for_requests(50)
        assert load.result.failures == [], load.result.summary()
        assert service.state()["NRestarts"] == "0"
        assert_journal_truthful(service)


@pytest.mark.parametrize("engine,workers", SETUPS)
def test_stop_after_reload_finishes_in_flight_request(engine, workers):
    with InstalledService(container_name(engine, f"stop{workers}"), engine,
                          serve_args=f"--workers {workers}") as service:
        service.container.systemctl("start", SERVICE)
        service.reload()
        main = service.main_pid()
        answer = {}

        def slow_request():
            answer["response"] = get("127.0.0.1", service.port, "/sleep?seconds=4")

        client = threading.Thread(target=slow_request)
        client.start()
        wait_until(lambda: _in_flight(service), timeout=10, what="the slow request to be in flight")
        service.container.systemctl("stop", SERVICE, timeout=60)
        client.join(timeout=30)
        status, body, _ = answer["response"]
        assert status == 200
        assert pid_of(body) == main or workers > 1
        state = service.container.show(SERVICE, "ActiveState", "Result")
        assert state == {"ActiveState": "inactive", "Result": "success"}
        journal = service.journal()
        assert "SIGTERM received: stopping, finishing in-flight requests" in journal
        assert count(r"drained: 1 request\(s\) answered while draining, 0 cut", journal) == (1 if workers == 1 else 2)
        whole = service.whole_journal()
        assert "with signal SIGKILL" not in whole
        assert_journal_truthful(service)


def _in_flight(service: InstalledService) -> bool:
    """The access log line comes after the response; STATUS= says what is in flight now."""
    status = service.container.show(SERVICE, "StatusText")["StatusText"]
    return "1 in flight" in status


def test_shipped_service_unit_is_locked_down():
    """`systemd-analyze security` under the container's systemd 252: exposure 1.5 or less."""
    with InstalledService(container_name("any", "security"), "debian") as service:
        report = service.container.run(f"systemd-analyze security {SERVICE} --no-pager").stdout
        match = re.search(r"Overall exposure level for graceful-http\.service: (\d+\.\d+)", report)
        assert match, report[-2000:]
        assert float(match.group(1)) <= 1.5, report


def test_a_reload_asked_while_the_service_is_still_starting_waits_for_the_start_and_happens():
    """systemd folds a reload asked during the start into the start job and reloads nothing (systemctl still
    exits 0): the harness's reload() waits for the start, so a test's reload is a real one."""
    with InstalledService(container_name("pypi", "reload-at-start"), "pypi", serve_args="--workers 2") as service:
        service.container.systemctl("start", SOCKET)
        service.container.systemctl("start", "--no-block", SERVICE)
        assert service.reload().returncode == 0
        handovers = re.findall(r"handed over to pid (\d+) \(generation (\d+)\)", service.journal())
        assert handovers == [(str(service.main_pid()), "2")], service.journal()
