"""Worker-by-worker rollout and the canary under real systemd: `systemctl reload` with `--workers 4` and an app holding 40 MB
per worker, under load, sampled from inside the container (the unit's cgroup: processes, workers, PSS); and
the new main killed in the middle of the rollout, where systemd must take the old main back (it is still the
one PIDFile= names) and the old main must start again the workers it had retired. With `--canary`, a good
version is promoted and one failing a fifth of its requests is rolled back, with the figures in the journal
and STATUS=.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from harness.container import wait_until
from harness.systemd_service import APP_DIR, SERVICE, InstalledService
from support.appfiles import app_source
from support.faults import IsolatedCgroup, status_text
from support.load import Load, get, pid_of

pytestmark = pytest.mark.systemd

HOST = "127.0.0.1"
WORKERS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTS = "/run/graceful-http/main/starts"  # the service's runtime directory: written by its dynamic user


@pytest.fixture(scope="module")
def service():
    name = f"gh-rollout-{os.getpid()}"
    extra = f"Environment=FOOTPRINT_STARTS_FILE={STARTS}\n"
    with IsolatedCgroup(name) as group, InstalledService(
            name, "pypi", serve_args=f"footprint_app:app --workers {WORKERS} --no-access-log",
            service_extra=extra) as installed:
        group.leave()
        with open(os.path.join(REPO, "tests", "apps", "footprint_app.py")) as file:
            installed.write_app("footprint_app", file.read())
        with open(os.path.join(REPO, "harness", "pss.py")) as file:
            installed.container.write_file("/root/pss.py", file.read())
        installed.container.systemctl("start", SERVICE)
        yield installed


def cgroup_procs_files(service: InstalledService) -> str:
    group = service.container.show(SERVICE, "ControlGroup")["ControlGroup"]
    return f"/sys/fs/cgroup{group}/cgroup.procs /sys/fs/cgroup/systemd{group}/cgroup.procs"


def start_sampler(service: InstalledService, seconds: int = 60) -> None:
    service.container.run("rm -f /root/samples && systemd-run --quiet --unit=pss-sampler /usr/bin/python3"
                          f" /root/pss.py {seconds} /root/samples {cgroup_procs_files(service)}")


def stop_sampler(service: InstalledService) -> list[tuple[int, int, int]]:
    service.container.run("systemctl stop pss-sampler || true")
    text = service.container.run("cat /root/samples").stdout
    return [tuple(int(n) for n in line.split()) for line in text.splitlines() if len(line.split()) == 3]


def workers_of(service: InstalledService, main: int) -> list[int]:
    return service.children(main)


def starts_so_far(service: InstalledService) -> int:
    return len(service.container.run(f"cat {STARTS}").stdout.split())


def test_systemctl_reload_rolls_out_worker_by_worker_under_load(service):
    main = service.main_pid()
    wait_until(lambda: len(workers_of(service, main)) == WORKERS, timeout=20, what="4 workers")
    start_sampler(service)
    with Load(HOST, service.port, clients=4) as load:
        load.wait_for_requests(50)
        result = service.reload(check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        new = service.main_pid()
        assert new != main
        wait_until(lambda: load.result.pids and any(pid_of(get(HOST, service.port)[1]) in
                                                    workers_of(service, new) for _ in range(5)),
                   timeout=10, what="the new generation's workers to answer")
        load.wait_for_requests(50)
    samples = stop_sampler(service)
    assert not load.result.failures, load.result.summary()
    # The sampler ran from before the reload (the old generation alone) through the rollout (its peak below).
    # Not a count of samples: a quicker machine takes fewer (18-19 here, on the code before too).
    assert samples[0][:2] == (WORKERS, WORKERS + 1), samples[:3]
    assert max(s[0] for s in samples) == WORKERS + 1, samples[::10]
    # Two mains, N+1 workers, and the `graceful-http reload` ExecReload= runs.
    assert max(s[1] for s in samples) <= WORKERS + 1 + 2 + 1, samples[::10]
    journal = service.journal()
    assert journal.count("rollout: retiring worker pid") == WORKERS, journal[-3000:]
    assert "rollout: all 4 workers of this generation serving" in journal
    # Nothing changed on disk: the new main was forked from the old one, and logs to the journal as its own.
    assert "forked from the previous main, not exec'd" in journal, journal[-3000:]
    assert "workers not balanced" not in service.whole_journal()  # the sandbox lets workers share their counts
    assert "reception only permitted for main PID" not in service.whole_journal()
    wait_until(lambda: set(service.cgroup_pids()) == {new, *workers_of(service, new)}, timeout=30,
               what="only the new generation left")


def test_the_new_main_killed_mid_rollout_gives_systemd_back_the_old_main_with_all_its_workers(service):
    main = service.main_pid()
    wait_until(lambda: len(workers_of(service, main)) == WORKERS, timeout=20, what="4 workers")
    before = starts_so_far(service)
    # The next generation's first worker starts; its second never does: the rollout stalls after one step.
    service.container.write_file(f"{APP_DIR}/fail-starts", ",".join(str(before + n) for n in range(2, 80)) + "\n")
    try:
        service.container.systemctl("reload", "--no-block", SERVICE)
        wait_until(lambda: "rollout: new worker 2 failed to start" in service.journal(), timeout=30,
                   what="the rollout to stall on worker 2")
        new = int(service.container.show(SERVICE, "MainPID")["MainPID"])
        assert new != main  # systemd took MAINPID= for the new main at the handoff
        assert len(workers_of(service, main)) == WORKERS - 1  # one old worker retired
        service.container.run(f"kill -KILL {new}")
        wait_until(lambda: "exited during the rollout" in status_text(service), timeout=20,
                   what="the old main to report the failed reload")
        wait_until(lambda: len(workers_of(service, main)) == WORKERS, timeout=20,
                   what="the old main to have its 4 workers again")
        time.sleep(0.5)  # systemd would act on a dead main pid by now
        state = service.state()
        assert state == {"MainPID": str(main), "ActiveState": "active", "SubState": "running",
                         "NRestarts": "0", "Result": "success"}, state
        journal = service.journal()
        assert re.search(rf"reload failed: new generation \(pid {new}\) exited during the rollout", journal)
        answered = {pid_of(get(HOST, service.port)[1]) for _ in range(20)}
        assert answered <= set(workers_of(service, main)), answered
    finally:
        service.container.run(f"rm -f {APP_DIR}/fail-starts")
    # Main again: it reloads.
    assert service.reload(check=False).returncode == 0
    assert service.main_pid() != main
    assert "reception only permitted for main PID" not in service.whole_journal()


# ---- the canary -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_service():
    name = f"gh-canary-{os.getpid()}"
    with IsolatedCgroup(name) as group, InstalledService(
            name, "pypi", serve_args="footprint_app:app --workers 2 --canary 1.5 --no-access-log",
            service_extra="Environment=FOOTPRINT_MB=2\n") as installed:
        group.leave()
        installed.write_app("footprint_app", app_source("footprint_app"))
        installed.container.systemctl("start", SERVICE)
        yield installed


def test_a_canary_promotes_a_good_version_under_load(canary_service):
    service = canary_service
    main = service.main_pid()
    with Load(HOST, service.port, clients=4) as load:
        load.wait_for_requests(50)
        result = service.reload(check=False)
        assert result.returncode == 0, result.stdout + result.stderr + service.journal()[-3000:]
        load.wait_for_requests(50)
    assert not load.result.failures, load.result.summary()
    assert service.main_pid() != main
    assert re.search(r"canary: 0 of \d+ requests failed vs 0 of \d+ \(z = 0\.0 ≤ 2\.326\): promoting generation",
                     service.journal())


def test_a_canary_rolls_back_a_version_failing_one_request_in_five_under_load(canary_service):
    service = canary_service
    main = service.main_pid()
    service.write_app("footprint_app", app_source("footprint_app", FAIL_PERCENT=20))
    try:
        with Load(HOST, service.port, clients=4) as load:
            load.wait_for_requests(50)
            result = service.reload(check=False)
            load.wait_for_requests(50)
        assert result.returncode != 0, result.stdout + result.stderr
        figures = r"canary: \d+ of \d+ requests failed vs 0 of \d+ \(z = [\d.]+ > 2\.326\): worse than the old generation"
        journal = service.journal()
        assert re.search(r"reload failed: " + figures, journal), journal[-3000:]  # the old main, and ExecReload=
        assert re.search(r"graceful-http: reload failed: " + figures, journal)
        assert re.search(r"reload failed: " + figures, status_text(service))
        state = service.state()
        assert state == {"MainPID": str(main), "ActiveState": "active", "SubState": "running",
                         "NRestarts": "0", "Result": "success"}, state
        # Only the canary's own answers failed: no connection was refused or dropped.
        failures = load.result.failures
        assert failures and all(f.startswith("HTTP 500") for f in failures), load.result.summary()
        wait_until(lambda: set(service.cgroup_pids()) == {main, *workers_of(service, main)}, timeout=30,
                   what="the rejected generation to be gone")
    finally:
        service.write_app("footprint_app", app_source("footprint_app"))
    # Without traffic a canary judges nothing, and promotes nothing.
    result = service.reload(check=False)
    assert result.returncode != 0
    assert re.search(r"reload failed: canary: 0 of 0 requests failed vs 0 of 0 in 1.5s: too few to judge",
                     status_text(service))
    with Load(HOST, service.port, clients=4) as load:  # the fixed version, with traffic, goes through
        load.wait_for_requests(50)
        assert service.reload(check=False).returncode == 0
    assert not load.result.failures, load.result.summary()
