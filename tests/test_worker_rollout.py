"""Worker-by-worker rollout, standalone (no systemd): real processes, real HTTP load, memory sampled.

With `--workers 4` and an app holding 40 MB in every worker, a reload under load must fail no request and
never run more than 5 workers; a new worker that fails to start in the middle is retried while the old
worker it replaces keeps serving; a new main that dies in the middle leaves the old generation serving,
with all its workers back. (The peak memory figures, against uvicorn and gunicorn, are in bench/run.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from harness.pss import PeakSampler
from support.appfiles import app_source
from support.load import Load, get, pid_of
from support.serve_process import ENGINES, HOST, ServeProcess, wait_until

APPS_DIR = os.path.join(os.path.dirname(__file__), "apps")
WORKERS = 4


def footprint_server(engine: str, tmp_path, *args: str, environ: dict[str, str] | None = None,
                     workers: int = WORKERS, access_log: bool = False) -> ServeProcess:
    shutil.copy(os.path.join(APPS_DIR, "footprint_app.py"), tmp_path / "footprint_app.py")
    return ServeProcess(ENGINES[engine], tmp_path, "footprint_app:app", "--app-dir", str(tmp_path),
                        "--workers", str(workers), "--access-log" if access_log else "--no-access-log", *args,
                        pid_file=True, environ=environ)


def started_as(server: ServeProcess, generation: int) -> int:
    found = server.wait_for_log(f"generation {generation} started as pid")
    return int(re.search(rf"generation {generation} started as pid (\d+)", found).group(1))


@pytest.mark.parametrize("engine", ["pypi", "debian"])
def test_a_rollout_under_load_fails_nothing_and_never_runs_more_than_n_plus_one_workers(engine, tmp_path):
    with footprint_server(engine, tmp_path) as server:
        server.wait_serving()
        with PeakSampler(server.processes) as sampler, Load(HOST, server.port, clients=4) as load:
            load.wait_for_requests(50)
            steady = sampler.samples[-1]
            old = server.main_pid()
            result = server.reload_cli()
            assert result.returncode == 0, result.stdout + result.stderr + server.log_tail()
            server.wait_new_main(old)
            server.wait_gone(old)
            load.wait_for_requests(50)
        result = load.result
        samples = sampler.samples
    assert not result.failures, result.summary()
    assert steady[0] == WORKERS, steady
    assert max(workers for workers, _, _ in samples) == WORKERS + 1, samples[::10]
    assert max(processes for _, processes, _ in samples) <= WORKERS + 1 + 2, samples[::10]
    log = server.log()
    assert log.count("rollout: all 4 workers of this generation serving") == 1, server.log_tail()
    assert log.count("rollout: retiring worker pid") == WORKERS


def test_a_whole_generation_rollout_is_still_there_when_asked_for(tmp_path):
    with footprint_server("pypi", tmp_path, "--rollout", "generation") as server:
        server.wait_serving()
        with PeakSampler(server.processes) as sampler:
            old = server.main_pid()
            assert server.reload_cli().returncode == 0, server.log_tail()
            server.wait_new_main(old)
            server.wait_gone(old)
    assert max(workers for workers, _, _ in sampler.samples) == 2 * WORKERS
    assert "rollout:" not in server.log()


def test_a_new_worker_that_fails_mid_rollout_is_retried_while_the_old_one_serves(tmp_path):
    # Starts 1-3: generation 1; 4: generation 2's first worker; 5 and 6 (its second worker, twice) fail.
    starts = tmp_path / "starts"
    environ = {"FOOTPRINT_STARTS_FILE": str(starts), "FOOTPRINT_FAIL_STARTS": "5,6", "FOOTPRINT_MB": "8"}
    with footprint_server("pypi", tmp_path, environ=environ, workers=3) as server:
        server.wait_serving()
        with PeakSampler(server.processes) as sampler, Load(HOST, server.port, clients=4) as load:
            load.wait_for_requests(50)
            old = server.main_pid()
            result = server.reload_cli()
            assert result.returncode == 0, result.stdout + result.stderr + server.log_tail()
            server.wait_new_main(old)
            load.wait_for_requests(50)
        assert not load.result.failures, load.result.summary()
        log = server.log()
        assert log.count("rollout: new worker 2 failed to start") == 2, server.log_tail()
        assert "retrying in 0.5s" in log and "retrying in 1s" in log
        assert "rollout: all 3 workers of this generation serving" in log
        assert len(starts.read_text().split()) == 3 + 3 + 2
    assert max(workers for workers, _, _ in sampler.samples) <= 3 + 1


def test_a_new_main_dying_mid_rollout_leaves_the_old_generation_serving_with_all_its_workers(tmp_path):
    # Generation 2's second worker never starts: the rollout stalls with one old worker retired.
    starts = tmp_path / "starts"
    environ = {"FOOTPRINT_STARTS_FILE": str(starts), "FOOTPRINT_FAIL_STARTS": ",".join(map(str, range(6, 60))),
               "FOOTPRINT_MB": "8"}
    with footprint_server("pypi", tmp_path, environ=environ) as server:
        server.wait_serving()
        old = server.main_pid()
        reload = server.run_background("reload", "--pid-file", str(server.pid_file), "--timeout", "60")
        new = started_as(server, 2)
        server.wait_for_log("rollout: new worker 2 failed to start")
        os.kill(new, signal.SIGKILL)
        stdout, stderr = reload.communicate(timeout=30)
        assert reload.returncode == 1, stdout + stderr
        assert f"new generation (pid {new}) exited during the rollout" in stdout + stderr
        server.wait_for_log("keeps serving")
        wait_until(lambda: sum(1 for p in server.processes() if p != old) == WORKERS, 20,
                   "the old main to have 4 workers again", server.log_tail)
        assert server.main_pid() == old
        answered = {pid_of(get(HOST, server.port, "/")[1]) for _ in range(40)}
        assert answered and answered <= server.processes() - {old}
        assert "rollout: new generation" in server.log() and "restoring 1 worker(s)" in server.log()


def test_a_reload_asked_of_a_new_main_during_its_rollout_starts_once_the_rollout_is_done(tmp_path):
    """systemd serializes reloads, but SIGHUP, POST /graceful or `graceful-http reload` may reach the new main
    while its workers still replace the old ones: that reload waits its turn instead of failing."""
    starts, release = tmp_path / "starts", tmp_path / "release"
    os.mkfifo(release)
    # Starts 1-2: generation 1; 3: generation 2's first worker; 4: its second, held until released.
    environ = {"FOOTPRINT_STARTS_FILE": str(starts), "FOOTPRINT_HOLD_STARTS": "4",
               "FOOTPRINT_RELEASE_FIFO": str(release), "FOOTPRINT_MB": "8"}
    with footprint_server("pypi", tmp_path, environ=environ, workers=2) as server:
        server.wait_serving()
        first = server.run_background("reload", "--pid-file", str(server.pid_file), "--timeout", "60")
        new = started_as(server, 2)
        wait_until(lambda: starts.exists() and len(starts.read_text().split()) == 4 or None, 20,
                   "generation 2's second worker to start", server.log_tail)
        second = server.run_background("reload", "--pid", str(new), "--timeout", "60")
        server.wait_for_log("waits until this generation's workers have replaced the previous one's")
        assert first.poll() is None and second.poll() is None
        with open(release, "w") as held:  # the held worker starts: the rollout ends, the waiting reload begins
            held.write("go")
        stdout, stderr = first.communicate(timeout=30)
        assert first.returncode == 0, stdout + stderr + server.log_tail()
        stdout, stderr = second.communicate(timeout=60)
        assert second.returncode == 0, stdout + stderr + server.log_tail()
        assert "generation 3" in stderr and "the reload waits until" in stderr
        assert "refused" not in server.log()


# ---- the canary ---------------------------------------------------------------------------------------------


def test_reload_with_a_canary_rolls_back_a_version_that_fails_one_request_in_five_with_one_worker(tmp_path):
    """`graceful-http reload --canary S` on a service without a canary setting, --workers 1: the new generation
    serves beside the old one for S seconds, is found worse, drains and exits; the old one serves on."""
    # Failures are counted where requests are observed: with the access log (the default), or --canary.
    with footprint_server("pypi", tmp_path, environ={"FOOTPRINT_MB": "1"}, workers=1, access_log=True) as server:
        server.wait_serving()
        old = server.main_pid()
        (tmp_path / "footprint_app.py").write_text(app_source("footprint_app", FAIL_PERCENT=20))
        with Load(HOST, server.port, clients=4) as load:
            load.wait_for_requests(50)
            result = server.run("reload", "--pid-file", str(server.pid_file), "--canary", "1.5")
            load.wait_for_requests(50)
        assert result.returncode == 1, result.stdout + result.stderr + server.log_tail()
        assert re.search(r"reload failed: canary: (\d+) of (\d+) requests failed vs 0 of (\d+) \(z = [\d.]+ > 2.326\)"
                         r": worse than the old generation", result.stderr), result.stderr
        new = started_as(server, 2)
        server.wait_gone(new)
        assert server.main_pid() == old
        assert server.get_pid() == old
        failures = load.result.failures
        assert failures and all(f.startswith("HTTP 500") for f in failures), load.result.summary()
        assert "previous generation keeps serving: canary:" in server.log()


# ---- --preload ----------------------------------------------------------------------------------------------


def test_preload_imports_the_app_once_and_a_replacement_worker_gets_the_mains_copy(tmp_path):
    starts = tmp_path / "starts"
    environ = {"FOOTPRINT_STARTS_FILE": str(starts), "FOOTPRINT_MB": "4"}
    with footprint_server("pypi", tmp_path, "--preload", environ=environ, workers=2) as server:
        server.wait_serving()
        main = server.main_pid()
        assert len(starts.read_text().split()) == 1  # imported in the main only; the workers share it
        assert "preloaded footprint_app:app in the main" in server.log()
        workers = server.processes() - {main}
        assert len(workers) == 2
        # New code on disk is not what a replacement runs: it is forked from the main, with the main's copy.
        (tmp_path / "footprint_app.py").write_text(app_source("footprint_app", FAIL_PERCENT=100))
        victim = workers.pop()
        os.kill(victim, signal.SIGKILL)
        def replaced():
            now = server.processes() - {main, victim, *workers}
            return now if len(now) == 1 else None
        replacement = wait_until(replaced, 20, "a replacement worker", server.log_tail).pop()
        wait_until(lambda: server.get_pid() == replacement, 20, "the replacement to answer 200", server.log_tail)
        assert len(starts.read_text().split()) == 1
        # A reload imports the code on disk.
        assert server.reload_cli().returncode == 0, server.log_tail()
        assert get(HOST, server.port, "/")[0] == 500


QUIET_APP = '''"""Imports nothing: whatever a process imports once it serves is graceful-http's, uvicorn's or Python's."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''


def imported_modules(log: str) -> set[str]:
    """The modules `python -X importtime` (PYTHONPROFILEIMPORTTIME) reported importing in `log`."""
    return {line.rpartition("|")[2].strip() for line in log.splitlines() if line.startswith("import time:")
            and not line.rstrip().endswith("| imported package")}


@pytest.mark.parametrize(("engine", "workers"), [("pypi", 2), ("debian", 2), ("pypi", 1)])
def test_a_reload_imports_nothing_but_the_app(engine, workers, tmp_path):
    """What a reload needs is imported by the first generation's main before it forks its workers or its standby
    (`import_ahead`), so no process imports it while the old generation serves: not the old main nor the new
    one (the rollout's machines: 8–13 ms of CPU each; systemd-python, for the sockets), not a new worker
    (ctypes, for its parent-death signal), and nobody retries an import that failed (Debian's uvicorn without
    httptools or uvloop: a search of sys.path each time). A new worker (or one-process main)
    imports the app only (through importlib, which -X importtime does not report: the app here imports
    nothing, so that any line after the first generation serves is something else)."""
    (tmp_path / "quiet_app.py").write_text(QUIET_APP)
    with ServeProcess(ENGINES[engine], tmp_path, "quiet_app:app", "--app-dir", str(tmp_path), "--workers", str(workers),
                      "--no-access-log", pid_file=True, environ={"PYTHONPROFILEIMPORTTIME": "1"}) as server:
        server.wait_serving()
        serving = len(server.log())
        assert "graceful_http.engine" in imported_modules(server.log()), server.log_tail()  # the report is on
        server.reload_and_wait()  # (the old main exits once the rollout is over)
        server.reload_and_wait()
        since = server.log()[serving:]
    assert since.count("rollout: all 2 workers of this generation serving") == (2 if workers > 1 else 0), since[-3000:]
    assert since.count("forked from the previous main") == 2, since[-3000:]  # (the standby's fork, with one)
    assert imported_modules(since) == set(), since[-3000:]
