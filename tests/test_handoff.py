"""Both ends of the handoff channel in one process, over a real socketpair: the conversation of a reload."""

from __future__ import annotations

import asyncio

from graceful_http.handoff import PredecessorLink, SuccessorLink


def ends() -> tuple[SuccessorLink, PredecessorLink]:
    """The old main's link, and the new generation's (which would inherit `theirs` at fd 3+N)."""
    old_main = SuccessorLink()
    new_generation = PredecessorLink(old_main.theirs.dup())
    old_main.close_theirs()
    return old_main, new_generation


def test_ready_main_serving():
    async def conversation():
        old_main, new_generation = ends()
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main())
        assert await old_main.next_message() == ("ready", "")
        assert not waiting.done(), "the new generation must wait until systemd knows it as main"
        old_main.tell_main()
        assert await waiting is True
        new_generation.confirm_serving()
        assert await old_main.serving_confirmed(timeout=5) is True
        old_main.close()

    asyncio.run(conversation())


def test_a_failure_is_one_line_even_when_the_successor_exits_right_after():
    async def conversation():
        old_main, new_generation = ends()
        new_generation.report_failed("importing 'app' raised\nRuntimeError: boom")
        new_generation.close()
        assert old_main.pending_failure() == "importing 'app' raised RuntimeError: boom"
        old_main.close()

    asyncio.run(conversation())


def test_failed_then_closed_is_read_in_order():
    async def conversation():
        old_main, new_generation = ends()
        new_generation.report_failed("cannot listen")
        new_generation.close()
        assert await old_main.next_message() == ("failed", "cannot listen")
        assert await old_main.next_message() == ("eof", "")
        old_main.close()

    asyncio.run(conversation())


def test_the_new_generation_learns_when_the_old_main_went_away():
    async def conversation():
        old_main, new_generation = ends()
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main())
        assert await old_main.next_message() == ("ready", "")
        old_main.close()
        assert await waiting is False

    asyncio.run(conversation())


def test_no_confirmation_when_the_successor_closes_without_serving():
    async def conversation():
        old_main, new_generation = ends()
        old_main.tell_main()
        new_generation.close()
        assert await old_main.serving_confirmed(timeout=5) is False
        old_main.close()

    asyncio.run(conversation())
