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


def test_a_rollout_is_agreed_and_the_channel_stays_open_for_it():
    async def conversation():
        old_main, new_generation = ends()
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main(adopts=True, rollout=True))
        assert await old_main.next_message() == ("ready", "adopts rollout")
        old_main.tell_main(rollout=True)
        assert await waiting is True and new_generation.rollout_agreed
        new_generation.confirm_serving(keep_open=True)
        new_generation.sock.sendall(b"retire 1\n")
        assert await old_main.serving_confirmed(timeout=5) is True
        assert await old_main.next_message() == ("retire", "1")
        old_main.close()
        new_generation.close()

    asyncio.run(conversation())


def test_an_old_main_that_knows_no_rollout_hands_over_whole():
    async def conversation():
        old_main, new_generation = ends()
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main(rollout=True))
        await old_main.next_message()
        old_main.tell_main()  # plain `main`
        assert await waiting is True and not new_generation.rollout_agreed
        old_main.close()
        new_generation.close()

    asyncio.run(conversation())


def test_a_canary_hears_counts_until_main_and_serving_skips_the_late_ones():
    async def conversation():
        old_main, new_generation = ends()
        counted = iter([(3, 0), (9, 1), (20, 2)] + [(20, 2)] * 100)
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main(counts=lambda: next(counted)))
        assert await old_main.next_message() == ("ready", "")
        old_main.start_canary()
        assert await old_main.counts_during(0.6) == (20, 2)
        old_main.tell_main()
        assert await waiting is True
        new_generation.confirm_serving()
        assert await old_main.serving_confirmed(timeout=5) is True
        old_main.close()

    asyncio.run(conversation())


def test_a_rejected_canary_is_told_why():
    async def conversation():
        old_main, new_generation = ends()
        waiting = asyncio.create_task(new_generation.report_ready_and_wait_until_main(counts=lambda: (0, 0)))
        await old_main.next_message()
        old_main.start_canary()
        old_main.reject("canary: 21 of 104 requests failed vs 0 of 412")
        assert await waiting is False
        assert new_generation.rejected == "canary: 21 of 104 requests failed vs 0 of 412"
        old_main.close()
        new_generation.close()

    asyncio.run(conversation())
