"""Lame-duck draining decisions (drain.IdleCloser)."""

from __future__ import annotations

from graceful_http.drain import ConnectionView, IdleCloser


def idle(key, last_data_at=0.0):
    return ConnectionView(key, busy=False, last_data_at=last_data_at)


def busy(key, last_data_at=0.0):
    return ConnectionView(key, busy=True, last_data_at=last_data_at)


def test_busy_connection_is_never_closed():
    closer = IdleCloser(grace=1.0)
    for tick in range(0, 600):
        assert closer.due([busy(1, last_data_at=0.0)], now=100.0 + tick * 0.5) == []


def test_idle_connection_closed_only_after_the_grace():
    closer = IdleCloser(grace=1.0)
    assert closer.due([idle(1)], now=100.0) == []  # first seen idle now
    assert closer.due([idle(1)], now=100.5) == []
    assert closer.due([idle(1)], now=100.99) == []
    assert closer.due([idle(1)], now=101.0) == [1]
    assert closer.due([idle(1)], now=101.5) == [1]  # still due until it is gone


def test_received_data_resets_idleness():
    closer = IdleCloser(grace=1.0)
    assert closer.due([idle(1, last_data_at=99.0)], now=100.0) == []
    assert closer.due([idle(1, last_data_at=100.8)], now=100.9) == []  # bytes arrived at 100.8
    assert closer.due([idle(1, last_data_at=100.8)], now=101.5) == []  # 0.7s since them
    assert closer.due([idle(1, last_data_at=100.8)], now=101.8) == [1]


def test_old_data_does_not_make_a_connection_look_idle_for_longer():
    closer = IdleCloser(grace=1.0)
    # data long ago, but first seen idle only now: the grace counts from now
    assert closer.due([idle(1, last_data_at=10.0)], now=100.0) == []
    assert closer.due([idle(1, last_data_at=10.0)], now=101.0) == [1]


def test_a_request_resets_idleness():
    closer = IdleCloser(grace=1.0)
    assert closer.due([idle(1)], now=100.0) == []
    assert closer.due([busy(1)], now=100.9) == []  # a request started
    assert closer.due([idle(1)], now=101.2) == []  # idle again from 101.2
    assert closer.due([idle(1)], now=102.1) == []
    assert closer.due([idle(1)], now=102.2) == [1]


def test_only_due_connections_are_named_and_gone_ones_forgotten():
    closer = IdleCloser(grace=1.0)
    assert closer.due([idle(1), busy(2), idle(3, last_data_at=100.5)], now=100.0) == []
    assert closer.due([idle(1), busy(2), idle(3, last_data_at=100.5)], now=101.0) == [1]
    assert closer.due([busy(2), idle(3, last_data_at=100.5)], now=101.5) == [3]
    # key 1 comes back (ids are reused): a new connection, its grace starts afresh
    assert closer.due([idle(1)], now=102.0) == []
    assert closer.due([idle(1)], now=103.0) == [1]


def test_zero_grace_closes_idle_at_once_but_never_busy():
    closer = IdleCloser(grace=0.0)
    assert closer.due([idle(1), busy(2)], now=5.0) == [1]
