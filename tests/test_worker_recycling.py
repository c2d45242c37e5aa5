"""Worker recycling (--max-requests, --max-worker-memory, --max-worker-lifetime) and stuck workers
(--worker-timeout), end to end: `graceful-http serve --workers 2` as a plain process (both engines),
real HTTP clients.

Recycling is new-first and hands the old worker's keep-alive connections over, so naive keep-alive
clients (support/naive_load.py: one connection each, never checked, never retried; an answer with
`Connection: close` counts as a failure) see no failure and no reconnect. A worker whose event loop
is blocked in `time.sleep` has its stack written to the log, is replaced, and killed, while other
requests are answered.
"""

from __future__ import annotations

import re
import threading

import pytest

from support.appfiles import APPS
from support.load import get, pid_of
from support.naive_load import NaiveClients
from support.prometheus import scrape
from support.serve_process import ENGINES, HOST, ServeProcess, wait_until

RECYCLED = re.compile(r"worker (\d) \(pid (\d+)\) recycled: (.*?); pid (\d+) serves in its place")


def serve(engine: str, tmp_path, *args: str) -> ServeProcess:
    return ServeProcess(ENGINES[engine], tmp_path, "recycle_app:app", "--app-dir", str(APPS), "--no-access-log",
                        "--workers", "2", *args, pid_file=True)


def recycles(server: ServeProcess) -> list[tuple[str, ...]]:
    return RECYCLED.findall(server.log())


def recycle_counts(server: ServeProcess) -> dict[str, float]:
    """graceful_http_worker_recycles_total by reason."""
    return {dict(labels)["reason"]: value for (name, labels), value in scrape(HOST, server.port).items()
            if name == "graceful_http_worker_recycles_total"}


def worker_pids(server: ServeProcess) -> set[int]:
    return server.processes() - {server.main_pid()}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_recycling_by_request_count_under_keep_alive_load_fails_no_request(engine, tmp_path):
    clients_count = 50
    with serve(engine, tmp_path, "--max-requests", "300", "--max-requests-jitter", "50", "--metrics") as server:
        server.wait_serving()
        first_workers = worker_pids(server)
        with NaiveClients(HOST, server.port, count=clients_count) as clients:
            clients.wait_for_requests(100)
            wait_until(lambda: len(recycles(server)) >= 3, 40, "three recycles under load", server.log_tail)
            clients.wait_for_requests(100)  # the load flows on after them
        result = clients.result
        wait_until(lambda: len(server.processes()) == 3, 20, "the recycled workers to be gone", server.log_tail)
        logged = recycles(server)
        counted = recycle_counts(server)
        log = server.log()
    assert result.failures == [], result.summary()
    assert result.connects == clients_count, f"clients had to reconnect: {result.summary()}"
    assert len(logged) >= 3
    for _, old, detail, new in logged:
        count, limit = map(int, re.fullmatch(r"(\d+) requests >= max-requests (\d+)", detail).groups())
        assert 300 <= limit <= 350 and count >= limit, detail
        assert old != new
    assert {int(old) for _, old, _, _ in logged[:2]} <= first_workers | {int(new) for *_, new in logged}
    assert counted.get("max-requests", 0) >= len(logged), (counted, len(logged))
    # Each recycled worker handed its idle keep-alive connections over and none fell back.
    moved = [(int(a), int(b)) for a, b in re.findall(r"drained: .*; connections: (\d+) handed over, (\d+) fell back",
                                                      log)]
    assert len(moved) >= 3 and all(fell == 0 for _, fell in moved) and sum(m for m, _ in moved) > 0, moved


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_worker_stuck_in_time_sleep_is_dumped_replaced_and_killed(engine, tmp_path):
    source = (APPS / "recycle_app.py").read_text().splitlines()
    sleep_line = next(number for number, line in enumerate(source, 1) if "time.sleep(seconds)" in line)
    with serve(engine, tmp_path, "--worker-timeout", "2") as server:
        server.wait_serving()
        before = worker_pids(server)
        blocked: list = []

        def block() -> None:
            try:
                blocked.append(get(HOST, server.port, "/block?seconds=60", timeout=60))
            except OSError as exc:
                blocked.append(exc)

        thread = threading.Thread(target=block, daemon=True)
        thread.start()
        stuck = re.compile(r"worker (\d) \(pid (\d+)\) is stuck: its event loop has not answered for")
        match = wait_until(lambda: stuck.search(server.log()), 20, "the stuck worker to be noticed", server.log_tail)
        stuck_pid = int(match.group(2))
        assert stuck_pid in before
        answered = set()
        while not re.search(rf"killed stuck worker \d \(pid {stuck_pid}\)", server.log()):  # meanwhile
            status, body, _ = get(HOST, server.port, "/", timeout=10)
            assert status == 200
            answered.add(pid_of(body))
        server.wait_gone(stuck_pid)
        thread.join(timeout=10)
        wait_until(lambda: len(server.processes()) == 3, 20, "two workers again", server.log_tail)
        after = worker_pids(server)
        answers = {pid_of(get(HOST, server.port, "/")[1]) for _ in range(20)}
        log = server.log()
    assert stuck_pid not in answered, "the stuck worker answered while its loop was blocked"
    assert answered, "nothing was answered while the worker was stuck"
    assert len(after) == 2 and stuck_pid not in after and len(after & before) == 1
    assert answers <= after
    # faulthandler's dump of the stuck worker: the sleeping line, in the function that called it.
    assert re.search(rf'File ".*recycle_app\.py", line {sleep_line} in block_the_event_loop', log), log
    assert isinstance(blocked[0], OSError), blocked  # its request died with it


@pytest.mark.parametrize("engine", list(ENGINES))
def test_workers_are_recycled_at_the_end_of_their_lifetime_one_at_a_time(engine, tmp_path):
    with serve(engine, tmp_path, "--max-worker-lifetime", "2") as server:
        server.wait_serving()
        with NaiveClients(HOST, server.port, count=8) as clients:
            wait_until(lambda: server.log().count(" is gone") >= 2, 30, "two recycles by lifetime",
                       server.log_tail)
            clients.wait_for_requests(8)
        result = clients.result
        logged = recycles(server)
        log = server.log()
    assert result.failures == [] and result.connects == 8, result.summary()
    assert all(re.fullmatch(r"\d+s old >= max-worker-lifetime 2s", detail) for _, _, detail, _ in logged), logged
    # One at a time: the next worker comes due only once the previous recycled one is gone.
    events = re.findall(r"worker \d \(pid (\d+)\) (is due for recycling|is gone)", log)
    assert [what for _, what in events[:4]] == ["is due for recycling", "is gone"] * 2, events
    assert events[0][0] == events[1][0] != events[2][0] == events[3][0], events


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_worker_over_its_memory_limit_is_recycled(engine, tmp_path):
    with serve(engine, tmp_path, "--max-worker-memory", "150", "--metrics") as server:
        server.wait_serving()
        status, body, _ = get(HOST, server.port, "/grow?mib=200")
        assert status == 200
        grown = pid_of(body)
        match = wait_until(lambda: re.search(rf"worker \d \(pid {grown}\) recycled: (\d+) MiB resident >"
                                             r" max-worker-memory 150 MiB", server.log()), 20,
                           "the grown worker to be recycled", server.log_tail)
        server.wait_gone(grown)
        counted = recycle_counts(server)
        others = [recycle for recycle in recycles(server) if int(recycle[1]) != grown]
    assert int(match.group(1)) > 150
    assert counted == {"max-worker-memory": 1.0}
    assert others == [], "only the grown worker was over the limit"


def test_reloads_while_workers_recycle_fail_no_request(tmp_path):
    """A reload drains the whole generation, a recycle in it included; the new generation recycles on."""
    import os
    import signal

    with serve("pypi", tmp_path, "--max-requests", "400", "--worker-timeout", "10") as server:
        server.wait_serving()
        main = server.main_pid()
        with NaiveClients(HOST, server.port, count=20) as clients:
            clients.wait_for_requests(100)
            for _ in range(3):
                wait_until(lambda: "is due for recycling" in server.log().split(f"[{main}]", 1)[-1], 20,
                           "a recycle in this generation", server.log_tail)
                os.kill(main, signal.SIGHUP)
                main = server.wait_new_main(main)
                clients.wait_for_requests(100)
        result = clients.result
        log = server.log()
    assert result.failures == [] and result.connects == 20, result.summary()
    assert "is stuck" not in log


# ---- under real systemd: the journal and STATUS= -------------------------------------------------


@pytest.mark.systemd
def test_under_systemd_recycles_show_in_status_and_a_stuck_workers_stack_in_the_journal():
    """The shipped unit (sandbox included): recycles are counted in `systemctl status`; a stuck worker's
    faulthandler dump reaches the journal, where the README's `journalctl --grep` finds it."""
    import os

    from harness.systemd_service import SERVICE, InstalledService

    sleep_line = next(number for number, line in enumerate((APPS / "recycle_app.py").read_text().splitlines(), 1)
                      if "time.sleep(seconds)" in line)
    name = f"gh-recycle-{os.getpid()}"
    with InstalledService(name, "pypi", serve_args="recycle_app:app --workers 2 --no-access-log --max-requests 300"
                                                   " --worker-timeout 2") as service:
        for app in ("recycle_app", "echo_app"):
            service.write_app(app, (APPS / f"{app}.py").read_text())
        service.container.systemctl("start", SERVICE)
        main = service.main_pid()
        with NaiveClients(HOST, service.port, count=10) as clients:
            service.container.wait_for(lambda: "max-requests)" in service.container.show(SERVICE, "StatusText")
                                       ["StatusText"], timeout=40, what="a recycle in STATUS=")
        assert clients.result.failures == [], clients.result.summary()
        blocked = threading.Thread(target=lambda: _ignore_errors(get, HOST, service.port, "/block?seconds=30",
                                                                 timeout=40), daemon=True)
        blocked.start()
        try:
            status = service.container.wait_for(
                lambda: (lambda text: text if "1 worker-timeout" in text else None)(
                    service.container.show(SERVICE, "StatusText")["StatusText"]),
                timeout=30, what="the stuck worker counted in STATUS=")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- journal (tail) ---\n{service.journal()[-3000:]}") from None
        found = service.container.wait_for(
            lambda: service.container.run("journalctl --no-pager -u graceful-http --grep 'is stuck' -o cat",
                                          check=False).stdout.strip(), timeout=20, what="journalctl --grep 'is stuck'")
        journal = service.container.wait_for(
            lambda: (lambda text: text if "killed stuck worker" in text else None)(service.journal()),
            timeout=20, what="the stuck worker killed")
        assert get(HOST, service.port, "/")[0] == 200
        state = service.state()
    assert re.fullmatch(r"worker \d \(pid \d+\) is stuck: its event loop has not answered for [\d.]+s"
                        r" \(worker-timeout 2s\); the stacks of its threads follow; it is replaced, then killed", found)
    assert re.search(rf'File "/srv/app/recycle_app\.py", line {sleep_line} in block_the_event_loop', journal), journal
    assert re.search(r"workers recycled \(\d+ max-requests, 1 worker-timeout\)", status), status
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"]) == ("active", str(main), "0"), state


def _ignore_errors(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except OSError:
        return None
