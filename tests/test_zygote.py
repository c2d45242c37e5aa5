"""A new generation forked from the old main (not exec'd) when the code on disk is the code loaded, and exec'd
as soon as any loaded file changed: the pure decisions, then real reloads of a real service."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from graceful_http import zygote
from graceful_http.zygote import eligible, interpreter_environment, mapped_files, unchanged_since
from support.serve_process import ENGINES, SERVICE_DIR, ServeProcess

APPS_DIR = Path(__file__).parent / "apps"
FORKED = "forked from the previous main, not exec'd"


def test_files_changed_at_or_after_the_reference_time_or_gone_are_changed():
    times = {"/a": 100, "/b": 199, "/c": 200, "/gone": None}
    assert unchanged_since(["/a", "/b"], 200, times.get)
    assert not unchanged_since(["/a", "/c"], 200, times.get)
    assert not unchanged_since(["/a", "/gone"], 200, times.get)
    assert unchanged_since([], 200, times.get)


def test_a_generation_is_forked_while_what_it_keeps_of_its_predecessors_stays_within_the_budget(monkeypatch):
    """A standby's fork keeps less than a serving main's (see `zygote`): more generations in a row may be forks."""
    budget = zygote.LEFTOVER_BUDGET
    monkeypatch.setattr(zygote, "leftover", 0)
    assert zygote.within_budget(zygote.KEPT_BY_A_FORKED_MAIN)
    monkeypatch.setattr(zygote, "leftover", budget - zygote.KEPT_BY_A_STANDBY_FORK)
    assert zygote.within_budget(zygote.KEPT_BY_A_STANDBY_FORK)
    assert not zygote.within_budget(zygote.KEPT_BY_A_FORKED_MAIN)
    assert budget // zygote.KEPT_BY_A_STANDBY_FORK >= 4 * (budget // zygote.KEPT_BY_A_FORKED_MAIN)


def test_mapped_files_are_read_from_maps_and_a_replaced_one_is_noticed():
    maps = (
        "55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234 /usr/bin/python3.11\n"
        "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n"
        "7f0000002000-7f0000003000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
        "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]\n"
    )
    files, replaced = mapped_files(maps)
    assert files == {"/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libssl.so.3"}
    assert not replaced
    _, replaced = mapped_files(maps + "7f0000004000-7f0000005000 r-xp 00000000 08:01 77 /usr/lib/libz.so.1 (deleted)\n")
    assert replaced


def test_shared_memory_and_devices_mapped_are_not_code():
    """Shared memory mapped (a memfd, multiprocessing's) reads "(deleted)" in maps but is no replaced library."""
    maps = "".join(f"7f0000{n:02d}0000-7f0000{n:02d}1000 rw-s 00000000 00:01 {n} {name}\n" for n, name in enumerate((
        "/memfd:graceful-http-balance (deleted)", "/SYSV00000000 (deleted)", "/dev/zero (deleted)",
        "/dev/shm/psm_3f2a (deleted)", "/dev/shm/wnsm_1", "/anon_hugepage (deleted)", "/[aio] (deleted)")))
    maps += "7f0000990000-7f0000991000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
    assert mapped_files(maps) == ({"/usr/lib/x86_64-linux-gnu/libssl.so.3"}, False)


def test_the_module_files_listed_before_the_standby_forked_are_the_ones_examined_while_no_module_came_since(
        monkeypatch, tmp_path):
    old = tmp_path / "old.py"
    old.touch()
    monkeypatch.setattr(zygote, "CODE_LOADED_SINCE_NS", old.stat().st_ctime_ns + 1)  # loaded after it was written
    monkeypatch.setattr(zygote, "mapped_files", lambda maps: (set(), False))  # not this test's: what its process maps
    monkeypatch.setattr(zygote, "_listed_ahead", None)
    zygote.list_module_files_ahead()
    assert zygote.os.__file__ in zygote._listed_ahead[1].split("\0")
    monkeypatch.setattr(zygote, "_listed_ahead", (len(zygote.sys.modules), str(old)))
    zygote.list_module_files_ahead()
    assert zygote._listed_ahead[1] == str(old), "listed again with the same modules loaded"
    assert zygote.same_code_as_on_disk(), "the listed file is older than the code loaded"
    monkeypatch.setattr(zygote, "_listed_ahead", (len(zygote.sys.modules), str(tmp_path / "gone.py")))
    assert not zygote.same_code_as_on_disk(), "a listed file that is gone is a change"
    # A module loaded since: every module's file is examined, and listed again.
    monkeypatch.setattr(zygote, "_module_files", lambda: [str(tmp_path / "gone.py")])
    monkeypatch.setattr(zygote, "_listed_ahead", (len(zygote.sys.modules) - 1, str(old)))
    assert not zygote.same_code_as_on_disk()
    zygote.list_module_files_ahead()
    assert zygote._listed_ahead == (len(zygote.sys.modules), str(tmp_path / "gone.py"))


def test_only_a_main_of_workers_without_the_app_or_metrics_loaded_forks():
    assert eligible(4, preload=False, metrics=False)
    assert not eligible(1, preload=False, metrics=False)  # the main serves itself: its connections are in it
    assert not eligible(4, preload=True, metrics=False)  # the app's import-time state would be the old one's
    assert not eligible(4, preload=False, metrics=True)


def test_the_variables_that_shape_an_interpreter_are_compared():
    started = {"PYTHONPATH": "/srv/a", "LD_PRELOAD": "libjemalloc.so", "HOME": "/root"}
    assert interpreter_environment(started) == {"PYTHONPATH": "/srv/a", "LD_PRELOAD": "libjemalloc.so"}
    assert interpreter_environment({**started, "APP_SETTING": "2"}) == interpreter_environment(started)
    assert interpreter_environment({**started, "PYTHONPATH": "/srv/b"}) != interpreter_environment(started)


def served_by_copy(engine: str, tmp_path: Path, workers: int = 2) -> ServeProcess:
    """A service running from its own copy of graceful_http (so that a test may edit that code)."""
    shutil.copytree(Path(SERVICE_DIR) / "graceful_http", tmp_path / "service" / "graceful_http",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(APPS_DIR / "footprint_app.py", tmp_path / "footprint_app.py")
    return ServeProcess(ENGINES[engine], tmp_path, "footprint_app:app", "--app-dir", str(tmp_path),
                        "--workers", str(workers), "--no-access-log", pid_file=True,
                        environ={"PYTHONPATH": str(tmp_path / "service"), "FOOTPRINT_MB": "4"})


@pytest.mark.parametrize(("engine", "workers"), [("pypi", 2), ("debian", 2), ("pypi", 1)])
def test_an_unchanged_install_reloads_by_fork_and_an_edited_one_by_exec(engine, workers, tmp_path):
    """With workers the new main is a fork of the old one; with one process, of its standby, which examines the
    module files its main listed before forking it (`zygote.list_module_files_ahead`)."""
    with served_by_copy(engine, tmp_path, workers) as server:
        server.wait_serving()
        # Generation 1 may have started within a clock tick of the copy, which then counts as a change after
        # its start (so its successor may be exec'd); generation 2 started well after it.
        server.reload_and_wait()
        server.reload_and_wait()
        assert "gen 3: " + FORKED in server.log(), server.log_tail()

        # A new version of a module the main has loaded: the next generation must run it, so it is exec'd.
        edited = tmp_path / "service" / "graceful_http" / "zygote.py"
        edited.write_text(edited.read_text() + "\nimport sys\nsys.stderr.write('zygote.py as edited\\n')\n")
        server.reload_and_wait()
        log = server.log()
        assert "gen 4: " + FORKED not in log, server.log_tail()
        assert log.count("zygote.py as edited") == 1, server.log_tail()  # imported anew, by the exec'd main only
