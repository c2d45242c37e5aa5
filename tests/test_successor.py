"""An old main's view of its successor, with stand-in processes on a real handoff channel and pidfd."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from graceful_http import generation as g
from graceful_http.handoff import SuccessorLink
from graceful_http.successor import Successor

# A stand-in new generation: runs the given steps on its end of the handoff channel, then exits.
STAND_IN = """\
import socket, sys, time
channel = socket.socket(fileno=int(sys.argv[1]))
for step in sys.argv[2:]:
    if step == "read":
        channel.recv(100)
    elif step == "linger":
        time.sleep(30)
    else:
        channel.sendall(step.encode() + b"\\n")
"""


def start(*steps: str) -> tuple[Successor, subprocess.Popen]:
    link = SuccessorLink()
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(link.theirs.fileno()), *steps],
                               pass_fds=[link.theirs.fileno()])
    link.close_theirs()
    return Successor(1, process.pid, link), process


def test_ready():
    async def scenario():
        successor, process = start("ready", "linger")
        try:
            assert await asyncio.wait_for(successor.until_ready(), 10) == g.ChildReady(1, process.pid)
            assert successor.alive()
        finally:
            process.kill()
            process.wait()
            successor.close()

    asyncio.run(scenario())


def test_a_failure_it_reports_then_exits():
    async def scenario():
        successor, process = start("failed cannot import 'app'")
        try:
            assert await asyncio.wait_for(successor.until_ready(), 10) == g.ChildFailed(1, "cannot import 'app'")
        finally:
            process.wait()
            successor.close()

    asyncio.run(scenario())


def test_a_failure_reported_by_a_generation_already_reaped():
    """A new generation can fail (a bad config) and be reaped by PID 1 before the old main has its pid: its
    reason is still on the channel, and it is not an error to start with ('[Errno 3] No such process')."""
    async def scenario():
        link = SuccessorLink()
        process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(link.theirs.fileno()), "failed bad config"],
                                   pass_fds=[link.theirs.fileno()])
        link.close_theirs()
        process.wait()  # exited and reaped
        successor = Successor(1, process.pid, link)
        try:
            assert not successor.alive()
            assert await asyncio.wait_for(successor.until_ready(), 10) == g.ChildFailed(1, "bad config")
        finally:
            successor.close()

    asyncio.run(scenario())


def test_exiting_without_a_word():
    async def scenario():
        successor, process = start()
        try:
            event = await asyncio.wait_for(successor.until_ready(), 10)
            assert event == g.ChildFailed(1, f"new generation (pid {process.pid}) exited before it was ready")
            process.wait()
            assert not successor.alive()
        finally:
            successor.close()

    asyncio.run(scenario())


def test_serving_confirmed_after_main():
    async def scenario():
        successor, process = start("ready", "read", "serving", "linger")
        try:
            assert isinstance(await asyncio.wait_for(successor.until_ready(), 10), g.ChildReady)
            successor.tell_main()
            assert await asyncio.wait_for(successor.until_serving(), 10) is True
        finally:
            process.kill()
            process.wait()
            successor.close()

    asyncio.run(scenario())


def test_exiting_after_main_without_confirming_is_a_failed_handover():
    async def scenario():
        successor, process = start("ready", "read")
        try:
            assert isinstance(await asyncio.wait_for(successor.until_ready(), 10), g.ChildReady)
            successor.tell_main()
            assert await asyncio.wait_for(successor.until_serving(), 10) is False
        finally:
            process.wait()
            successor.close()

    asyncio.run(scenario())
