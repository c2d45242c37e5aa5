"""pidfd inode ids (MAINPIDFDID=, LISTEN_PIDFDID): detected by trying, passed on only where they identify."""

from __future__ import annotations

import os
import subprocess
import sys

from graceful_http import pidfd
from graceful_http.listenfds import successor_environ


def test_an_id_names_one_process_or_there_is_none():
    mine, parent = pidfd.inode_id(os.getpid()), pidfd.inode_id(os.getppid())
    if pidfd._ids_are_distinct():  # a kernel with pidfs: what these machines run
        assert mine and parent and mine != parent and mine == pidfd.inode_id(os.getpid())
    else:
        assert mine is None and parent is None


def test_a_process_that_is_gone_has_no_id():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert pidfd.inode_id(child.pid) is None


def test_a_new_generation_gets_its_own_listen_pidfdid_never_an_inherited_one():
    base = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "LISTEN_PIDFDID": "77", "PATH": "/bin"}
    assert successor_environ(base, ["http"], 42, pidfd_id=4242)["LISTEN_PIDFDID"] == "4242"
    assert "LISTEN_PIDFDID" not in successor_environ(base, ["http"], 42)


def test_the_handoff_names_the_new_main_by_its_pidfd_id_too():
    import asyncio

    from test_supervisor import FakeSuccessor, World, settle

    from graceful_http import generation as g

    async def scenario(child: subprocess.Popen):
        world = World()
        async def start_successor(attempt, generation):
            world.successors.append(FakeSuccessor(attempt, child.pid))
            return world.successors[-1]

        world.supervisor.ports.start_successor = start_successor
        assert await world.supervisor.become_main(handed_over=False)
        world.reload()
        await settle()
        [successor] = world.successors
        successor.ready.set_result(g.ChildReady(successor.attempt, successor.pid))
        await settle()
        return world.notifier.sent[-1]

    child = subprocess.Popen(["sleep", "30"])
    try:
        sent = asyncio.run(scenario(child))
        expected = pidfd.inode_id(child.pid)
    finally:
        child.kill()
        child.wait()
    assert sent["MAINPID"] == child.pid and sent.get("MAINPIDFDID") == expected
    assert expected is not None or not pidfd._ids_are_distinct()
