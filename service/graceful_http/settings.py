"""Validated settings for `serve`: pure values, no side effects.

Parsing errors are `SettingsError` with a message naming the offending value,
so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

DEFAULT_BIND = "127.0.0.1:9999"
DEFAULT_APP = "graceful_http.demo:app"
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message says which and why."""


@dataclass(frozen=True)
class BindAddress:
    """Where to listen when systemd passed no sockets: TCP host/port or a unix path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_bind(text: str) -> BindAddress:
    """Parse `HOST:PORT`, `[V6]:PORT` or `unix:PATH`."""
    expected = "expected HOST:PORT, [IPV6]:PORT or unix:PATH"
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise SettingsError(f"invalid --bind {text!r}: empty unix socket path")
        return BindAddress(path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise SettingsError(f"invalid --bind {text!r}: {expected}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SettingsError(f"invalid --bind {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise SettingsError(f"invalid --bind {text!r}: {expected}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"invalid --bind {text!r}: port must be a number from 1 to 65535")
    return BindAddress(host=host, port=int(port_text))


def parse_network(text: str) -> IPNetwork:
    """Parse a `--control-allow` CIDR (a bare address means just that host)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise SettingsError(f"invalid --control-allow {text!r}: expected an address or CIDR such as 10.0.0.0/8") from None


def parse_seconds(option: str, text: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"invalid {option} {text!r}: expected a number of seconds") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"invalid {option} {text!r}: must be a finite number >= {minimum:g}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Everything `serve` needs; the same command line yields the same settings in every generation."""

    app: str = DEFAULT_APP
    app_dir: str = "."
    binds: tuple[BindAddress, ...] = (parse_bind(DEFAULT_BIND),)
    graceful_timeout: float = 30.0
    ready_timeout: float = 30.0
    pid_file: str | None = None
    control_allow: tuple[IPNetwork, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)
    )
    access_log: bool = True
    idle_grace: float = 1.0
