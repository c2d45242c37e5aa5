"""With --start-nice 19 a new generation starts at nice 19 and has the old main's priority back once it is
ready: the kernel's rule for raising a priority again, the gate where it may not, and a real reload read from
/proc, with and without workers; by default (0) it starts at the old main's priority."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess

import pytest

from graceful_http.startpriority import CAP_SYS_NICE, START_NICE, may_raise_to
from support.serve_process import ENGINES, SERVICE_DIR, ServeProcess, clean_environ, wait_until

NICE = 19  # what the tests ask for with --start-nice (the default, 0, is off)
# How the gate tests run a script: as root without CAP_SYS_NICE, or as nobody.
WITHOUT_CAP_SYS_NICE = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice"]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Records the nice value its process had when it imported the app (the start), and answers with its pid.
RECORDING_APP = """\
import os

with open({log!r}, "a") as log:
    log.write(f"{{os.getpid()}} {{os.getpriority(os.PRIO_PROCESS, 0)}}\\n")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({{"type": "lifespan.startup.complete"}})
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    body = b"pid:%d" % os.getpid()
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}})
    await send({{"type": "http.response.body", "body": body}})
"""


def test_raising_a_priority_again_needs_cap_sys_nice_or_a_high_enough_rlimit_nice():
    assert may_raise_to(0, 1 << CAP_SYS_NICE, 0)
    assert not may_raise_to(0, 0, 0)  # the default RLIMIT_NICE: no way back from nice 19
    assert not may_raise_to(0, 0, 19)
    assert may_raise_to(0, 0, 20)  # systemd's LimitNICE=+0
    assert may_raise_to(5, 0, 15)
    assert may_raise_to(0, 0, resource.RLIM_INFINITY)


# Prints what start_nice() says, then whether the kernel lets this process go from nice 19 back to where it was.
GATE = """\
import os
from graceful_http.startpriority import start_nice
print(start_nice(19))
before = os.getpriority(os.PRIO_PROCESS, 0)
os.setpriority(os.PRIO_PROCESS, 0, 19)
try:
    os.setpriority(os.PRIO_PROCESS, 0, before)
    print("raised again")
except OSError as exc:
    print(exc.strerror)
"""


@pytest.mark.parametrize("setpriv, expected", [
    ([], ["(19, 0)", "raised again"]),
    (WITHOUT_CAP_SYS_NICE, ["None", "Permission denied"]),
    (AS_NOBODY, ["None", "Permission denied"]),
], ids=["root", "root-without-cap-sys-nice", "nobody"])
def test_a_process_that_could_not_give_the_priority_back_does_not_lower_it(setpriv, expected):
    """With the default RLIMIT_NICE (0) only CAP_SYS_NICE lets a priority go back up: the gate agrees with the
    kernel."""
    assert run_gate(setpriv, GATE) == expected


def run_gate(prefix: list[str], script: str) -> list[str]:
    """What `script` prints, run (as `prefix` makes it: another user, fewer capabilities) with the default
    RLIMIT_NICE, which only CAP_SYS_NICE overrides."""
    assert resource.getrlimit(resource.RLIMIT_NICE)[0] == 0, "run this test with the default RLIMIT_NICE"
    result = subprocess.run([*prefix, ENGINES["pypi"], "-c", script], capture_output=True, text=True,
                            env=clean_environ(PYTHONPATH=str(SERVICE_DIR)), timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def of_threads(pid: int, field: int) -> set[int]:
    """Field `field` (numbered as in proc(5)) of /proc/<pid>/task/<tid>/stat, for every thread of `pid`."""
    values = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            values.add(int(stat.read().rpartition(")")[2].split()[field - 3]))  # fields 1-2 end at the ")"
    return values


def nice_of_threads(pid: int) -> set[int]:
    """The nice value of every thread of `pid` (field 19)."""
    return of_threads(pid, 19)


def recorded(log) -> dict[int, int]:
    """pid → nice at its app import."""
    return {int(pid): int(nice) for pid, nice in (line.split() for line in log.read_text().splitlines())}


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    return request.param


def start_and_reload(engine: str, tmp_path, *args: str) -> tuple[ServeProcess, dict[int, int], int]:
    """Serve the recording app with ARGS, SIGHUP, wait until only the new generation is left: (server, the new
    generation's app imports as pid → nice, its main)."""
    log = tmp_path / "nice.log"
    (tmp_path / "recording.py").write_text(RECORDING_APP.format(log=str(log)))
    server = ServeProcess(ENGINES[engine], tmp_path, "--app-dir", str(tmp_path), *args, "recording:app",
                          pid_file=True)
    server.start()
    server.wait_serving()
    old = server.main_pid()
    before = set(recorded(log))
    os.kill(old, signal.SIGHUP)
    new = server.wait_new_main(old)
    wait_until(lambda: old not in server.processes(), 20, f"the old main {old} to exit", server.log_tail)
    return server, {pid: nice for pid, nice in recorded(log).items() if pid not in before}, new


@pytest.mark.parametrize("args", [("--start-nice", "0"), ()], ids=["start-nice-0", "default"])
def test_start_nice_0_starts_a_new_generation_at_the_old_priority(engine, args, tmp_path):
    assert START_NICE == 0
    server, started, new = start_and_reload(engine, tmp_path, *args)
    try:
        assert started == {new: os.getpriority(os.PRIO_PROCESS, 0)}
    finally:
        server.kill_all()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_generation_imports_its_app_at_nice_19_and_serves_at_the_old_priority(engine, workers, tmp_path):
    log = tmp_path / "nice.log"
    (tmp_path / "recording.py").write_text(RECORDING_APP.format(log=str(log)))
    assert os.getpriority(os.PRIO_PROCESS, 0) < NICE, "the test runs at nice 19 already: nothing to see"
    with ServeProcess(ENGINES[engine], tmp_path, "--app-dir", str(tmp_path), "--workers", str(workers),
                      "--start-nice", str(NICE), "recording:app", pid_file=True) as server:
        server.wait_serving()
        old = server.main_pid()
        before = set(recorded(log))
        os.kill(old, signal.SIGHUP)
        new = server.wait_new_main(old)
        size = workers + 1  # the new main and its workers, or its standby
        generation = wait_until(lambda: len(found := server.processes()) == size and found, 20,
                                f"only the new generation's {size} processes to be left", server.log_tail)
        assert new in generation

        # Started at 19: the new main imports the app itself; with workers, the first worker does, forked by
        # the new main before it is ready, and the others after (at our priority again).
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        started = {pid: nice for pid, nice in recorded(log).items() if pid not in before}
        expected = {new: NICE} if workers == 1 else None
        assert started == expected if workers == 1 else sorted(started.values()) == [ours, NICE], started
        for pid in generation:  # serving at our priority, every thread of every process
            assert nice_of_threads(pid) == {ours}, f"pid {pid} (new main {new}) after the reload"
        assert server.get_pid() in generation


# -- The idle start (on by default where the new generation can leave SCHED_IDLE again)

# Prints what idle_start_allowed() says, then whether the kernel lets this process go SCHED_IDLE and back.
IDLE_GATE = """\
import os
from graceful_http.startpriority import idle_start_allowed
print(idle_start_allowed())
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
try:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    print("left idle")
except OSError as exc:
    print(exc.strerror)
"""


@pytest.mark.parametrize("setpriv, expected", [
    ([], ["True", "left idle"]),
    (WITHOUT_CAP_SYS_NICE, ["False", "Operation not permitted"]),
    (AS_NOBODY, ["False", "Operation not permitted"]),
    (["chrt", "--batch", "0"], ["False", "left idle"]),  # a policy chosen by the admin is left alone
], ids=["root", "root-without-cap-sys-nice", "nobody", "sched-batch"])
def test_the_idle_start_gate_agrees_with_the_kernel(setpriv, expected):
    """Leaving SCHED_IDLE counts as raising nice to 0: CAP_SYS_NICE, or RLIMIT_NICE 20 (systemd's LimitNICE=+0,
    which the shipped unit sets; this machine's root cannot raise the limit to try that case)."""
    assert run_gate(setpriv, IDLE_GATE) == expected


# Records its scheduling policy at import (the start), starts a thread there (which inherits that policy), and
# answers with its pid and that policy.
POLICY_APP = """\
import os
import threading

POLICY = os.sched_getscheduler(0)
with open({log!r}, "a") as log:
    log.write(f"{{os.getpid()}} {{POLICY}}\\n")
threading.Thread(target=threading.Event().wait, daemon=True).start()  # an app's background thread


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({{"type": "lifespan.startup.complete"}})
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    body = b"pid:%d policy-at-import:%d" % (os.getpid(), POLICY)
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}})
    await send({{"type": "http.response.body", "body": body}})
"""


def policies_of_threads(pid: int) -> set[int]:
    """The scheduling policy of every thread of `pid` (field 41)."""
    return of_threads(pid, 41)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_generation_imports_its_app_at_sched_idle_and_serves_at_sched_other(engine, workers, tmp_path):
    """The default: the standby (one process) or the old main's fork (workers) starts the new generation at
    SCHED_IDLE; every process of it takes SCHED_OTHER back, every thread, as it becomes ready."""
    log = tmp_path / "policy.log"
    (tmp_path / "policy.py").write_text(POLICY_APP.format(log=str(log)))
    with ServeProcess(ENGINES[engine], tmp_path, "--app-dir", str(tmp_path), "--workers", str(workers),
                      "policy:app", pid_file=True) as server:
        server.wait_serving()
        old = server.main_pid()
        first = dict(line.split() for line in log.read_text().splitlines())
        assert set(first.values()) == {str(os.SCHED_OTHER)}, "the first generation starts as we run"
        os.kill(old, signal.SIGHUP)
        new = server.wait_new_main(old)
        size = workers + 1  # the new main and its workers, or its standby
        generation = wait_until(lambda: len(found := server.processes()) == size and found, 20,
                                f"only the new generation's {size} processes to be left", server.log_tail)
        assert new in generation

        started = [int(policy) for pid, policy in (line.split() for line in log.read_text().splitlines())
                   if pid not in first]
        # One process: the new main imports the app. Workers: the first worker does, forked by the new main
        # before it is ready; the others after it is (at SCHED_OTHER).
        assert sorted(started) == ([os.SCHED_IDLE] if workers == 1 else [os.SCHED_OTHER, os.SCHED_IDLE])
        for pid in generation:  # serving at SCHED_OTHER, every thread; its standby (one process) stays idle
            standby = workers == 1 and pid != new
            assert policies_of_threads(pid) == {os.SCHED_IDLE if standby else os.SCHED_OTHER}, \
                f"pid {pid} (new main {new}) after the reload"
        assert server.get_pid() in ({new} if workers == 1 else generation)


# An app whose import takes about 0.2 s of CPU (a large app's), at its own pace whatever the clock does.
HEAVY_APP = """\
import os
import time

deadline = time.process_time() + 0.2
while time.process_time() < deadline:
    pass


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b"pid:%d" % os.getpid()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
"""


def test_an_idle_start_that_busy_cpus_starve_is_taken_out_of_sched_idle_and_the_reload_succeeds(tmp_path):
    """In a CPU cgroup of their own (as in a container, or a unit with CPUWeight=: autogroups do not apply there),
    pinned to one CPU beside a process that keeps it busy, an idle start gets next to nothing (0.2 s of CPU would
    take about a minute): after RESTORE_AFTER the old main takes it out of SCHED_IDLE, and the reload is done
    well within --ready-timeout, instead of failing on it."""
    from graceful_http.startpriority import RESTORE_AFTER

    group = f"/sys/fs/cgroup/cpu/gh-test-idle-start-{os.getpid()}"  # cgroup v1's cpu hierarchy, as here and in CI
    os.mkdir(group)
    join = ("sh", "-c", f'echo $$ > {group}/cgroup.procs && exec taskset -c 0 "$@"', "sh")
    (tmp_path / "heavy.py").write_text(HEAVY_APP)
    spinner = subprocess.Popen([*join, ENGINES["pypi"], "-c", "while True: pass"])
    try:
        with ServeProcess(ENGINES["pypi"], tmp_path, "--app-dir", str(tmp_path), "--ready-timeout", "25",
                          "heavy:app", pid_file=True, prefix=join) as server:
            server.wait_serving(timeout=30)
            old = server.main_pid()
            result = server.reload_cli()
            assert result.returncode == 0, result.stdout + result.stderr + server.log_tail()
            new = server.main_pid()
            assert new != old
            server.wait_for_log(f"was still starting after {RESTORE_AFTER:g}s at idle CPU priority")
            assert policies_of_threads(new) == {os.SCHED_OTHER}
            assert server.get_pid() == new
    finally:
        spinner.kill()
        spinner.wait()
        wait_until(lambda: not open(f"{group}/cgroup.procs").read(), 20, "the test's cgroup to empty")
        os.rmdir(group)


GRANT_CAP_SYS_NICE = "CapabilityBoundingSet=CAP_SYS_NICE\nAmbientCapabilities=CAP_SYS_NICE\nPrivateUsers=no\n"
# ...and a filter that kills on sched_setscheduler (SIGSYS: no SystemCallErrorNumber=): the gate must find
# out in a child of its own, and the service start at SCHED_OTHER, as it would without the right.
FILTER_WITH_SIGSYS = GRANT_CAP_SYS_NICE + "SystemCallFilter=~sched_setscheduler\nSystemCallErrorNumber=\n"


@pytest.mark.systemd
@pytest.mark.parametrize("workers, extra, idle", [(1, GRANT_CAP_SYS_NICE, True), (2, GRANT_CAP_SYS_NICE, True),
                                                  (1, FILTER_WITH_SIGSYS, False)],
                         ids=["cap-sys-nice-1", "cap-sys-nice-2", "filtered-with-sigsys-1"])
def test_under_systemd_a_new_generation_starts_idle_where_it_may_and_serves_at_sched_other(workers, extra, idle):
    """The same under systemd, in the shipped unit's sandbox (its system-call filter allows sched_setscheduler;
    RestrictRealtime= filters its policies). The shipped LimitNICE=+0 is what lets the new generation leave
    SCHED_IDLE on a host; this machine's root cannot raise that limit (no CAP_SYS_RESOURCE), so the drop-in
    grants CAP_SYS_NICE instead, the other way the kernel allows it."""
    from harness.systemd_service import SOCKET, InstalledService
    from support.load import get

    with InstalledService(f"gh-idle-start-{workers}{idle:d}-{os.getpid()}", "pypi",
                          serve_args=f"--workers {workers} policy:app", service_extra=extra) as service:
        service.write_app("policy", POLICY_APP.format(log="/dev/null"))
        service.container.systemctl("start", SOCKET)
        status, body, _ = get("127.0.0.1", service.port)
        assert status == 200 and body.endswith(b"policy-at-import:%d" % os.SCHED_OTHER), body
        first = service.main_pid()
        assert service.reload().returncode == 0
        new = service.main_pid()
        assert new != first
        wait_until(lambda: set(service.cgroup_pids()) == service.generation(new)
                   and len(service.generation(new)) == workers + 1, 30, "only the new generation to be left")
        serving = {new} if workers == 1 else set(service.children(new))
        answers = set()
        deadline = 200
        while len({pid for pid, _ in answers}) < len(serving) and deadline:
            status, body, _ = get("127.0.0.1", service.port)
            assert status == 200, body
            pid, policy = re.match(rb"pid:(\d+) policy-at-import:(\d+)", body).groups()
            answers.add((int(pid), int(policy)))
            deadline -= 1
        assert {pid for pid, _ in answers} == serving
        policies = sorted(policy for _, policy in answers)
        if not idle:
            assert policies == [os.SCHED_OTHER], answers
        else:
            assert policies == ([os.SCHED_IDLE] if workers == 1 else [os.SCHED_OTHER, os.SCHED_IDLE]), answers
        for pid in service.generation(new):  # its main and workers, or its main and standby (idle where allowed)
            standby = idle and workers == 1 and pid != new
            assert service.policies(pid) == {os.SCHED_IDLE if standby else os.SCHED_OTHER}, (pid, new)
        assert service.state()["NRestarts"] == "0"
        assert "SIGSYS" not in service.journal() and "core-dump" not in service.journal()
