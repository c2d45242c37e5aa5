"""Who may ask for a reload over HTTP (control.peer_allowed)."""

from __future__ import annotations

import pytest

from graceful_http.control import peer_allowed
from graceful_http.settings import parse_network

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
