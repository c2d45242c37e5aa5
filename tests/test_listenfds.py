"""LISTEN_* parsing and the environment of a new generation (listenfds)."""

from __future__ import annotations

import pytest

from graceful_http import sdnotify
from graceful_http.listenfds import ListenFdsError, passed_fd_count, successor_environ


def test_no_listen_fds_means_zero():
    assert passed_fd_count({}, 42) == 0
    assert passed_fd_count({"LISTEN_PID": "42"}, 42) == 0


def test_listen_fds_counted_for_this_process():
    assert passed_fd_count({"LISTEN_FDS": "1", "LISTEN_PID": "42"}, 42) == 1
    assert passed_fd_count({"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "http:admin"}, 42) == 2
    assert passed_fd_count({"LISTEN_FDS": "0", "LISTEN_PID": "42", "LISTEN_FDNAMES": ""}, 42) == 0


@pytest.mark.parametrize("environ, message", [
    ({"LISTEN_FDS": "two", "LISTEN_PID": "42"}, "LISTEN_FDS='two' is not a number"),
    ({"LISTEN_FDS": "-1", "LISTEN_PID": "42"}, "LISTEN_FDS='-1' is not a number"),
    ({"LISTEN_FDS": "", "LISTEN_PID": "42"}, "LISTEN_FDS='' is not a number"),
    ({"LISTEN_FDS": "1"}, "LISTEN_FDS is set but LISTEN_PID='' is not a process id"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "self"}, "LISTEN_FDS is set but LISTEN_PID='self' is not a process id"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "41"},
     "LISTEN_PID=41 is not this process (42): the sockets were passed to another process"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "http"},
     "LISTEN_FDNAMES='http' does not name 2 sockets (LISTEN_FDS=2)"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "42", "LISTEN_FDNAMES": "http:admin"},
     "LISTEN_FDNAMES='http:admin' does not name 1 sockets (LISTEN_FDS=1)"),
])
def test_passed_fd_count_errors(environ, message):
    with pytest.raises(ListenFdsError) as caught:
        passed_fd_count(environ, 42)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_successor_environ_replaces_every_listen_variable():
    base = {"PATH": "/usr/bin", "LISTEN_PID": "1", "LISTEN_FDS": "5", "LISTEN_FDNAMES": "a:b:c:d:e", "X": "y"}
    environ = successor_environ(base, ["http", "admin"], 4242)
    assert environ == {"PATH": "/usr/bin", "X": "y", "LISTEN_PID": "4242", "LISTEN_FDS": "2",
                       "LISTEN_FDNAMES": "http:admin"}
    assert base["LISTEN_FDS"] == "5"  # the input is not modified
    assert passed_fd_count(environ, 4242) == 2  # and it is what the successor will accept


def test_successor_environ_without_old_listen_variables():
    assert successor_environ({"HOME": "/root"}, ["http"], 7) == {
        "HOME": "/root", "LISTEN_PID": "7", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}


def test_successor_environ_moves_the_watchdog_to_the_new_pid():
    base = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1"}
    environ = successor_environ(base, ["http"], 77)
    assert environ["WATCHDOG_PID"] == "77" and environ["WATCHDOG_USEC"] == "30000000"
    assert sdnotify.watchdog_interval(environ, 77) == 15.0


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256])
def test_successor_environ_refuses_unpassable_names(name):
    with pytest.raises(ListenFdsError, match="cannot be passed in LISTEN_FDNAMES"):
        successor_environ({}, ["http", name], 7)
