"""The pure (or nearly pure) modules: LISTEN_* parsing, sd_notify, settings,
drain decisions, the control layer's peer check, the app loader, the demo's
/sleep parameter and the control socket's line protocol.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
if str(SERVICE) not in sys.path:
    sys.path.insert(0, str(SERVICE))

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from graceful_http import controlsocket, reloadclient, sdnotify  # noqa: E402
from graceful_http.apploader import AppLoadError, load_app  # noqa: E402
from graceful_http.control import peer_allowed  # noqa: E402
from graceful_http.demo import DEFAULT_SLEEP, parse_sleep_seconds  # noqa: E402
from graceful_http.drain import ConnectionView, IdleCloser  # noqa: E402
from graceful_http.generation import Outcome  # noqa: E402
from graceful_http.listenfds import ListenFdsError, passed_fd_count, successor_environ  # noqa: E402
from graceful_http.settings import (  # noqa: E402
    BindAddress,
    SettingsError,
    parse_bind,
    parse_network,
    parse_seconds,
)

# ---- listenfds -----------------------------------------------------------------


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


# ---- sdnotify --------------------------------------------------------------------


def test_format_message_puts_mainpid_before_ready():
    assert sdnotify.format_message({"READY": 1, "MAINPID": 5}) == "MAINPID=5\nREADY=1"
    assert sdnotify.format_message({"STATUS": "gen 2 · serving", "READY": 1, "MAINPID": 77}) == (
        "MAINPID=77\nREADY=1\nSTATUS=gen 2 · serving")


def test_format_message_full_order_and_unknown_fields_last():
    fields = {"X_CUSTOM": "1", "WATCHDOG": 1, "STATUS": "s", "STOPPING": 1, "RELOADING": 1, "READY": 1,
              "MAINPID": 9}
    assert sdnotify.format_message(fields).splitlines() == [
        "MAINPID=9", "READY=1", "RELOADING=1", "STOPPING=1", "STATUS=s", "WATCHDOG=1", "X_CUSTOM=1"]


@pytest.mark.parametrize("fields", [{"ready": 1}, {"A=B": 1}, {"STATUS": "two\nlines"}])
def test_format_message_refuses_what_would_corrupt_the_datagram(fields):
    with pytest.raises(ValueError, match="invalid notify field"):
        sdnotify.format_message(fields)


def test_parse_message():
    assert sdnotify.parse_message("MAINPID=5\nREADY=1\nSTATUS=a=b c\nnoise\n") == {
        "MAINPID": "5", "READY": "1", "STATUS": "a=b c"}
    assert sdnotify.parse_message("") == {}


@given(st.dictionaries(st.sampled_from(["MAINPID", "READY", "RELOADING", "STOPPING", "STATUS", "X_Y"]),
                       st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                                                      blacklist_categories=("Cs",)), max_size=20)))
def test_parse_message_inverts_format_message(fields):
    assert sdnotify.parse_message(sdnotify.format_message(fields)) == fields


def test_notifier_is_silent_without_notify_socket():
    notifier = sdnotify.Notifier(environ={})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    assert notifier.barrier(timeout=0.1) is False


@pytest.fixture
def notify_socket(monkeypatch):
    """A fake systemd: an AF_UNIX datagram socket bound in a short temporary directory."""
    directory = tempfile.mkdtemp(prefix="gh-notify-")  # tmp_path can exceed sun_path's 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # systemd.daemon.notify reads os.environ
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_notifier_sends_exact_datagrams(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.send(READY=1, STATUS="gen 1 · ready", MAINPID=1234) is True
    assert sock.recv(4096) == "MAINPID=1234\nREADY=1\nSTATUS=gen 1 · ready".encode()
    assert notifier.send(STOPPING=1) is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.send(RELOADING=1, STATUS="reloading") is True
    assert sock.recv(4096) == b"RELOADING=1\nSTATUS=reloading"


def test_barrier_returns_once_the_manager_closes_the_passed_fd(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("ok", notifier.barrier(timeout=10)))
    thread.start()
    try:
        message, fds, _flags, _address = socket.recv_fds(sock, 4096, 4)
        assert message == b"BARRIER=1"
        assert len(fds) == 1
        assert thread.is_alive()  # still waiting: we hold its pipe end
    finally:
        for fd in fds if "fds" in locals() else ():
            os.close(fd)  # what systemd does on reaching the barrier
        thread.join(timeout=10)
    assert not thread.is_alive(), "barrier() did not return after the fd was closed"
    assert result == {"ok": True}


def test_barrier_times_out_when_nobody_reads(notify_socket):
    path, sock = notify_socket
    notifier = sdnotify.Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.barrier(timeout=0.2) is False
    message, fds, _flags, _address = socket.recv_fds(sock, 4096, 4)  # drain it, and close what it carried
    for fd in fds:
        os.close(fd)
    assert message == b"BARRIER=1"


@pytest.mark.parametrize("environ, interval", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "41"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_interval(environ, interval):
    assert sdnotify.watchdog_interval(environ, 42) == interval


# ---- settings -------------------------------------------------------------------


@pytest.mark.parametrize("text, address, shown", [
    ("127.0.0.1:8080", BindAddress(host="127.0.0.1", port=8080), "127.0.0.1:8080"),
    ("0.0.0.0:1", BindAddress(host="0.0.0.0", port=1), "0.0.0.0:1"),
    ("localhost:65535", BindAddress(host="localhost", port=65535), "localhost:65535"),
    ("[::1]:80", BindAddress(host="::1", port=80), "[::1]:80"),
    ("[::]:9999", BindAddress(host="::", port=9999), "[::]:9999"),
    ("unix:/run/graceful-http.sock", BindAddress(path="/run/graceful-http.sock"), "unix:/run/graceful-http.sock"),
    ("unix:relative.sock", BindAddress(path="relative.sock"), "unix:relative.sock"),
])
def test_parse_bind_valid(text, address, shown):
    parsed = parse_bind(text)
    assert parsed == address
    assert str(parsed) == shown
    assert parsed.is_unix == (address.path is not None)


EXPECTED = "expected HOST:PORT, [IPV6]:PORT or unix:PATH"
PORT = "port must be a number from 1 to 65535"


@pytest.mark.parametrize("text, message", [
    ("nonsense", f"invalid --bind 'nonsense': {EXPECTED}"),
    ("", f"invalid --bind '': {EXPECTED}"),
    (":80", f"invalid --bind ':80': {EXPECTED}"),
    ("::1:80", f"invalid --bind '::1:80': {EXPECTED}"),
    ("[::1]80", f"invalid --bind '[::1]80': {EXPECTED}"),
    ("[::1]", f"invalid --bind '[::1]': {EXPECTED}"),
    ("[example.com]:80", "invalid --bind '[example.com]:80': 'example.com' is not an IPv6 address"),
    ("[127.0.0.1]:80", "invalid --bind '[127.0.0.1]:80': '127.0.0.1' is not an IPv6 address"),
    ("unix:", "invalid --bind 'unix:': empty unix socket path"),
    ("localhost:", f"invalid --bind 'localhost:': {PORT}"),
    ("localhost:http", f"invalid --bind 'localhost:http': {PORT}"),
    ("localhost:0", f"invalid --bind 'localhost:0': {PORT}"),
    ("localhost:65536", f"invalid --bind 'localhost:65536': {PORT}"),
    ("localhost:-1", f"invalid --bind 'localhost:-1': {PORT}"),
    ("[::1]:99999", f"invalid --bind '[::1]:99999': {PORT}"),
])
def test_parse_bind_invalid(text, message):
    with pytest.raises(SettingsError) as caught:
        parse_bind(text)
    assert str(caught.value) == message


def test_parse_bind_non_ascii_digit_port_is_a_settings_error():
    """KNOWN SERVICE BUG (fails): '²'.isdigit() is True but int('²') raises a bare ValueError,
    so `serve --bind 127.0.0.1:²` dies with a traceback and exit 1 instead of one line and exit 2."""
    with pytest.raises(SettingsError) as caught:
        parse_bind("127.0.0.1:²")
    assert str(caught.value) == f"invalid --bind '127.0.0.1:²': {PORT}"


@pytest.mark.parametrize("text, network", [
    ("10.0.0.0/8", ipaddress.ip_network("10.0.0.0/8")),
    ("10.1.2.3/8", ipaddress.ip_network("10.0.0.0/8")),  # host bits are forgiven
    ("192.0.2.7", ipaddress.ip_network("192.0.2.7/32")),
    ("::1", ipaddress.ip_network("::1/128")),
    ("fd00::/8", ipaddress.ip_network("fd00::/8")),
])
def test_parse_network(text, network):
    assert parse_network(text) == network


@pytest.mark.parametrize("text", ["bogus", "10.0.0.0/33", "", "10.0.0.0/8/8"])
def test_parse_network_invalid(text):
    with pytest.raises(SettingsError) as caught:
        parse_network(text)
    assert str(caught.value) == f"invalid --control-allow {text!r}: expected an address or CIDR such as 10.0.0.0/8"


@pytest.mark.parametrize("text, minimum, value", [
    ("30", 0.0, 30.0), ("0", 0.0, 0.0), ("2.5", 0.1, 2.5), ("0.1", 0.1, 0.1), ("1e2", 0.0, 100.0)])
def test_parse_seconds(text, minimum, value):
    assert parse_seconds(text, "--ready-timeout", minimum=minimum) == value


@pytest.mark.parametrize("text, minimum, message", [
    ("soon", 0.0, "invalid --graceful-timeout 'soon': expected a number of seconds"),
    ("", 0.0, "invalid --graceful-timeout '': expected a number of seconds"),
    ("-1", 0.0, "invalid --graceful-timeout '-1': must be a finite number >= 0"),
    ("nan", 0.0, "invalid --graceful-timeout 'nan': must be a finite number >= 0"),
    ("inf", 0.0, "invalid --graceful-timeout 'inf': must be a finite number >= 0"),
    ("0", 0.1, "invalid --graceful-timeout '0': must be a finite number >= 0.1"),
])
def test_parse_seconds_invalid(text, minimum, message):
    with pytest.raises(SettingsError) as caught:
        parse_seconds(text, "--graceful-timeout", minimum=minimum)
    assert str(caught.value) == message


# ---- drain.IdleCloser ----------------------------------------------------------


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


# ---- control.peer_allowed --------------------------------------------------------

LOOPBACK = tuple(parse_network(n) for n in ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"))


@pytest.mark.parametrize("client, allowed", [
    (None, False),  # a unix socket peer has no address to be in a network
    (("127.0.0.1", 40000), True),
    (("127.8.9.10", 40000), True),
    (("::1", 40000), True),
    (("::ffff:127.0.0.1", 40000), True),
    (("10.0.0.1", 40000), False),
    (("192.168.1.1", 40000), False),
    (("::ffff:10.0.0.1", 40000), False),
    (("2001:db8::1", 40000), False),
    (("fe80::1%eth0", 40000), False),
    (("::", 40000), False),
    (("not-an-address", 40000), False),
    (("", 40000), False),
])
def test_peer_allowed_in_loopback(client, allowed):
    assert peer_allowed(client, LOOPBACK) is allowed


@pytest.mark.parametrize("client, allowed", [
    (("10.0.0.1", 1), True),
    (("10.255.255.255", 1), True),
    (("::ffff:10.1.2.3", 1), True),  # v4-mapped matches a v4 network
    (("11.0.0.1", 1), False),
    (("127.0.0.1", 1), True),
    (("fd00::5%eth0", 1), True),  # a scope id does not stop a match
])
def test_peer_allowed_with_extra_networks(client, allowed):
    allow = LOOPBACK + (parse_network("10.0.0.0/8"), parse_network("fd00::/8"))
    assert peer_allowed(client, allow) is allowed


def test_peer_allowed_with_nothing_allowed_allows_nobody():
    assert peer_allowed(None, ()) is False
    assert peer_allowed(("127.0.0.1", 1), ()) is False


# ---- apploader -------------------------------------------------------------------


@pytest.fixture
def app_module(tmp_path):
    """Write a module with a unique name into tmp_path; yields a writer returning its name."""
    written = []

    def write(source: str) -> str:
        name = f"gh_test_app_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_load_app_works(app_module, tmp_path):
    name = app_module("async def app(scope, receive, send):\n    pass\n\nclass ns:\n    app = app\n")
    assert callable(load_app(f"{name}:app", str(tmp_path)))
    assert load_app(f"{name}:ns.app", str(tmp_path)) is load_app(f"{name}:app", str(tmp_path))


@pytest.mark.parametrize("spec", ["nocolon", ":app", "module:", ""])
def test_load_app_invalid_spec(spec):
    with pytest.raises(AppLoadError) as caught:
        load_app(spec)
    assert str(caught.value) == f"invalid APP {spec!r}: expected module:attribute, e.g. myproject.asgi:application"


def test_load_app_missing_module(tmp_path):
    with pytest.raises(AppLoadError) as caught:
        load_app("gh_no_such_module_here:app", str(tmp_path))
    assert str(caught.value) == "cannot import 'gh_no_such_module_here': no module named 'gh_no_such_module_here'"
    assert caught.value.details == ""


def test_load_app_missing_package_of_a_dotted_module(tmp_path):
    with pytest.raises(AppLoadError) as caught:
        load_app("gh_no_such_pkg.asgi:app", str(tmp_path))
    assert str(caught.value) == "cannot import 'gh_no_such_pkg.asgi': no module named 'gh_no_such_pkg'"


def test_load_app_module_missing_a_dependency(app_module, tmp_path):
    name = app_module("x = 1\nimport gh_missing_dependency_xyz\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == (f"importing {name!r} raised ModuleNotFoundError: "
                                 f"No module named 'gh_missing_dependency_xyz' ({tmp_path / name}.py:2)")


def test_load_app_missing_attribute(app_module, tmp_path):
    name = app_module("application = None\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"module {name!r} has no attribute 'app'"


def test_load_app_not_callable(app_module, tmp_path):
    name = app_module("app = 42\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"'{name}:app' is a int, not an application (not callable)"


def test_load_app_module_raising_at_import(app_module, tmp_path):
    name = app_module('import os\n\nraise RuntimeError("deploy went wrong")\n')
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    message = str(caught.value)
    assert message == f"importing {name!r} raised RuntimeError: deploy went wrong ({tmp_path / name}.py:3)"
    assert "\n" not in message
    assert "Traceback (most recent call last)" in caught.value.details
    assert "deploy went wrong" in caught.value.details


def test_load_app_module_exiting_at_import(app_module, tmp_path):
    name = app_module("import sys\nsys.exit(3)\n")
    with pytest.raises(AppLoadError) as caught:
        load_app(f"{name}:app", str(tmp_path))
    assert str(caught.value) == f"importing {name!r} raised SystemExit: 3 ({tmp_path / name}.py:2)"


def test_load_app_syntax_error_names_the_app_file():
    """KNOWN SERVICE BUG (fails): for a SyntaxError the last traceback frame is importlib's,
    so the message ends with '(<frozen importlib._bootstrap>:241)' instead of the app's file:line."""
    with tempfile.TemporaryDirectory() as directory:
        name = f"gh_test_app_{uuid.uuid4().hex[:12]}"
        path = Path(directory) / f"{name}.py"
        path.write_text("x = 1\ndef app(:\n")
        try:
            with pytest.raises(AppLoadError) as caught:
                load_app(f"{name}:app", directory)
        finally:
            sys.modules.pop(name, None)
            sys.path.remove(directory)
    message = str(caught.value)
    assert message.startswith(f"importing {name!r} raised SyntaxError: ")
    assert "\n" not in message
    assert "<frozen" not in message, message
    assert message.endswith(f"({path}:2)"), message


# ---- demo.parse_sleep_seconds -----------------------------------------------------


@pytest.mark.parametrize("query, seconds", [
    ("", DEFAULT_SLEEP),
    ("other=1", DEFAULT_SLEEP),
    ("seconds=3", 3.0),
    ("seconds=0", 0.0),
    ("seconds=0.25", 0.25),
    ("seconds=3600", 3600.0),
    ("seconds=1&seconds=2", 2.0),  # the last one wins
])
def test_parse_sleep_seconds(query, seconds):
    assert parse_sleep_seconds(query) == seconds


@pytest.mark.parametrize("query, message", [
    ("seconds=abc", "seconds must be a number, got 'abc'"),
    ("seconds=", "seconds must be a number, got ''"),
    ("seconds=-1", "seconds must be between 0 and 3600, got '-1'"),
    ("seconds=3600.5", "seconds must be between 0 and 3600, got '3600.5'"),
    ("seconds=nan", "seconds must be between 0 and 3600, got 'nan'"),
    ("seconds=inf", "seconds must be between 0 and 3600, got 'inf'"),
])
def test_parse_sleep_seconds_invalid(query, message):
    with pytest.raises(ValueError) as caught:
        parse_sleep_seconds(query)
    assert str(caught.value) == message


# ---- controlsocket line protocol -------------------------------------------------


def test_format_line():
    assert controlsocket.format_line(Outcome("done", "generation 2 (pid 5) is serving", 5)) == (
        b"done 5 generation 2 (pid 5) is serving\n")
    assert controlsocket.format_line(Outcome("failed", "importing 'app' raised\nRuntimeError:  x", 9)) == (
        b"failed 9 importing 'app' raised RuntimeError: x\n")  # one line, whatever the detail held
    assert controlsocket.format_line(Outcome("refused", "reload already in progress", None)) == (
        b"refused 0 reload already in progress\n")


def test_parse_line():
    assert reloadclient.parse_line("started 77 reloading: starting pid 77\n") == (
        reloadclient.Outcome("started", "reloading: starting pid 77", 77))
    assert reloadclient.parse_line("failed x detail") == reloadclient.Outcome("failed", "detail", None)
    assert reloadclient.parse_line("refused 0 the service is stopping").pid == 0


words = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Zs",
                                                                                                    "Zl", "Zp", "Cc")),
                min_size=1, max_size=12)


@given(code=st.sampled_from(["started", "done", "failed", "refused"]),
       pid=st.integers(min_value=1, max_value=2**22),
       detail=st.lists(words, max_size=8).map(" ".join))
def test_control_line_round_trip(code, pid, detail):
    outcome = Outcome(code, detail, pid)
    line = controlsocket.format_line(outcome)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert reloadclient.parse_line(line.decode()) == reloadclient.Outcome(code, detail, pid)


@given(detail=st.text(max_size=60))
def test_control_line_round_trip_normalises_whitespace(detail):
    line = controlsocket.format_line(Outcome("failed", detail, 3)).decode()
    assert line.count("\n") == 1
    assert reloadclient.parse_line(line) == reloadclient.Outcome("failed", " ".join(detail.split()), 3)
