"""Validated settings for `serve`: one table of options feeds the command line and the config file.

Pure: parsing and validation only. Errors are `SettingsError` with a one-line
message naming the option (or config key and line), the value, and what was
expected, so the CLI prints one line and exits 2, and a new generation with
a bad config file fails its reload with that line.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

DEFAULT_BIND = "127.0.0.1:9999"
DEFAULT_APP = "graceful_http.demo:app"
INTERFACES = ("auto", "asgi3", "asgi2", "wsgi")
LOG_LEVELS = ("debug", "info", "warning", "error")
WEBSOCKET_IMPLEMENTATIONS = ("auto", "websockets", "websockets-sansio", "wsproto", "none")
LIFESPAN_MODES = ("auto", "on", "off")
SSL_CERT_REQS = ("none", "optional", "required")
ROLLOUT_MODES = ("worker", "generation")  # how a reload replaces a generation of workers (see `rollout`)
DEFAULT_FORWARDED_ALLOW_IPS = ("127.0.0.1", "::1")  # the newest uvicorn's; $FORWARDED_ALLOW_IPS overrides it
FORWARDED_ALLOW_IPS_VARIABLE = "FORWARDED_ALLOW_IPS"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message says which and why."""


# ---- value parsers (each takes the option's name for its message) -------------


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


def parse_bind(text: str, option: str = "--bind") -> BindAddress:
    """Parse `HOST:PORT`, `[V6]:PORT` or `unix:PATH`."""
    expected = "expected HOST:PORT, [IPV6]:PORT or unix:PATH"
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise SettingsError(f"invalid {option} {text!r}: empty unix socket path")
        return BindAddress(path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise SettingsError(f"invalid {option} {text!r}: {expected}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SettingsError(f"invalid {option} {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise SettingsError(f"invalid {option} {text!r}: {expected}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise SettingsError(f"invalid {option} {text!r}: port must be a number from 1 to 65535")
    return BindAddress(host=host, port=int(port_text))


def parse_network(text: str, option: str = "--control-allow") -> IPNetwork:
    """Parse a CIDR (a bare address means just that host)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise SettingsError(f"invalid {option} {text!r}: expected an address or CIDR such as 10.0.0.0/8") from None


def parse_seconds(text, option: str, *, minimum: float = 0.0) -> float:
    if isinstance(text, bool):
        raise SettingsError(f"invalid {option} {text!r}: expected a number of seconds")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SettingsError(f"invalid {option} {text!r}: expected a number of seconds") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"invalid {option} {text!r}: must be a finite number >= {minimum:g}")
    return value


def _whole_number(text) -> int | None:
    """`text` (a flag's string or a config file's value) as a whole number ≥ 0, or None if it is not one."""
    if isinstance(text, bool) or not re.fullmatch(r"\s*\d+\s*", str(text)):
        return None
    return int(text)


def parse_workers(text, option: str = "--workers") -> int:
    value = _whole_number(text)
    if value is None:
        raise SettingsError(f"invalid {option} {text!r}: expected a whole number of worker processes >= 1")
    if value < 1:
        raise SettingsError(f"invalid {option} {text!r}: a generation needs at least 1 worker")
    return value


def parse_bytes(text, option: str) -> int:
    return parse_count(text, option, what="bytes")


def parse_count(text, option: str, *, what: str, minimum: int = 1) -> int:
    value = _whole_number(text)
    if value is None or value < minimum:
        raise SettingsError(f"invalid {option} {text!r}: expected a whole number of {what} >= {minimum}")
    return value


def parse_nice(text, option: str) -> int:
    """A nice value a process may lower itself to: 0 (highest without privileges) to 19 (lowest)."""
    value = _whole_number(text)
    if value is None or value > 19:
        raise SettingsError(f"invalid {option} {text!r}: expected a nice value from 0 to 19")
    return value


def parse_root_path(text, option: str = "--root-path") -> str:
    """The prefix a proxy mounts the app under: empty, or a path such as /api (no trailing slash)."""
    if not isinstance(text, str) or (text and (not text.startswith("/") or text.endswith("/"))) or \
            any(c.isspace() or c in "?#" for c in text):
        raise SettingsError(f"invalid {option} {text!r}: expected a path such as /api (starting with /, no"
                            " trailing /), or empty")
    return text


def parse_trusted_proxies(text, option: str = "--forwarded-allow-ips") -> tuple[str, ...]:
    """`*`, or addresses and networks separated by commas (uvicorn's format); each checked here."""
    if isinstance(text, (list, tuple)):
        items = [str(i).strip() for i in text]
    elif isinstance(text, str):
        items = [i.strip() for i in text.split(",")]
    else:
        items = [""]
    expected = "expected * or addresses and networks separated by commas, such as 127.0.0.1,10.0.0.0/8"
    if not items or any(not i for i in items):
        raise SettingsError(f"invalid {option} {text!r}: {expected}")
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False) if "/" in item else ipaddress.ip_address(item)
        except ValueError:
            raise SettingsError(f"invalid {option} {text!r}: {item!r} is not an address or network; {expected}")\
                from None
    if "*" in items and len(items) > 1:
        raise SettingsError(f"invalid {option} {text!r}: * trusts every peer and cannot be combined")
    return tuple(items)


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header(text, option: str = "--header") -> tuple[str, str]:
    """`NAME:VALUE`, a response header added to every response."""
    name, sep, value = text.partition(":") if isinstance(text, str) else ("", "", "")
    if not sep or not HEADER_NAME.fullmatch(name):
        raise SettingsError(f"invalid {option} {text!r}: expected NAME:VALUE with a header name such as X-Frame-Options")
    value = value.strip()
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value) or not value.isascii():
        raise SettingsError(f"invalid {option} {text!r}: the value must be printable ASCII")
    return name, value


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(text, option: str) -> str:
        if text not in choices:
            raise SettingsError(f"invalid {option} {text!r}: expected one of {', '.join(choices)}")
        return text
    return parse


def _text(text, option: str) -> str:
    if not isinstance(text, str) or not text:
        raise SettingsError(f"invalid {option} {text!r}: expected a non-empty string")
    return text


def _boolean(value, option: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"invalid {option} {value!r}: expected true or false")
    return value


# ---- the settings ---------------------------------------------------------------


@dataclass(frozen=True)
class ServeSettings:
    """Everything `serve` needs; the same command line yields the same settings in every generation."""

    app: str = DEFAULT_APP
    app_dir: str = "."
    factory: bool = False
    interface: str = "auto"
    binds: tuple[BindAddress, ...] = (parse_bind(DEFAULT_BIND),)
    workers: int = 1
    graceful_timeout: float = 30.0
    ready_timeout: float = 30.0
    pid_file: str | None = None
    control_allow: tuple[IPNetwork, ...] = ()  # who may POST /graceful without a token: nobody by default
    control_token_file: str | None = None
    access_log: bool = True
    log_level: str = "info"
    metrics: bool = False
    ws: str = "auto"
    ws_max_size: int = 16 * 1024 * 1024
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    websocket_close_spread: float = 5.0
    stable_pid: bool | None = None  # None: hold unless under systemd (see holderstate.holder_wanted)
    # HTTP, as uvicorn's options of the same names
    root_path: str = ""
    proxy_headers: bool = True
    forwarded_allow_ips: tuple[str, ...] | None = None  # None: $FORWARDED_ALLOW_IPS, else the default
    timeout_keep_alive: float = 75.0  # above the proxies' own idle timeouts: see README "Behind a proxy"
    limit_concurrency: int | None = None
    backlog: int = 2048
    headers: tuple[tuple[str, str], ...] = ()
    server_header: bool = True
    date_header: bool = True
    lifespan: str = "auto"
    h11_max_incomplete_event_size: int | None = None
    # TLS: loaded from disk by every new generation
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password_file: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "none"
    ssl_ciphers: str = "TLSv1"
    env_file: str | None = None
    idle_grace: float = 1.0
    # worker recycling and stuck workers (with --workers 2 or more); 0: off
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_worker_memory: int = 0  # MiB of resident memory
    max_worker_lifetime: float = 0.0
    worker_timeout: float = 0.0
    # reloads with workers
    rollout: str = "worker"
    canary: float = 0.0  # seconds the new generation's first worker serves beside the old ones before the handoff
    preload: bool = False  # import the app in the main before forking the workers (gunicorn's --preload)
    # a new generation's CPU priority while it starts beside the serving one (see startpriority)
    start_nice: int = 0


@dataclass(frozen=True)
class Option:
    """One `serve` option: its settings field, its config key, how to parse one value."""

    name: str  # the ServeSettings field
    parse: Callable[[object, str], object]
    repeated: bool = False  # a list in the config file, a repeatable flag
    key: str = ""  # config-file key (default: name)

    @property
    def config_key(self) -> str:
        return self.key or self.name

    @property
    def flag(self) -> str:
        return "--" + self.config_key.replace("_", "-")


OPTIONS = {
    option.config_key: option
    for option in (
        Option("app", _text),
        Option("app_dir", _text),
        Option("factory", _boolean),
        Option("interface", _choice(INTERFACES)),
        Option("binds", parse_bind, repeated=True, key="bind"),
        Option("workers", parse_workers),
        Option("graceful_timeout", parse_seconds),
        Option("ready_timeout", lambda v, o: parse_seconds(v, o, minimum=0.1)),
        Option("pid_file", _text),
        Option("control_allow", parse_network, repeated=True),
        Option("control_token_file", _text),
        Option("access_log", _boolean),
        Option("log_level", _choice(LOG_LEVELS)),
        Option("metrics", _boolean),
        Option("ws", _choice(WEBSOCKET_IMPLEMENTATIONS)),
        Option("ws_max_size", parse_bytes),
        Option("ws_ping_interval", parse_seconds),
        Option("ws_ping_timeout", parse_seconds),
        Option("websocket_close_spread", parse_seconds),
        Option("stable_pid", _boolean),
        Option("root_path", parse_root_path),
        Option("proxy_headers", _boolean),
        Option("forwarded_allow_ips", parse_trusted_proxies),
        Option("timeout_keep_alive", parse_seconds),
        Option("limit_concurrency", lambda v, o: parse_count(v, o, what="connections and requests")),
        Option("backlog", lambda v, o: parse_count(v, o, what="pending connections")),
        Option("headers", parse_header, repeated=True, key="header"),
        Option("server_header", _boolean),
        Option("date_header", _boolean),
        Option("lifespan", _choice(LIFESPAN_MODES)),
        Option("h11_max_incomplete_event_size", lambda v, o: parse_count(v, o, what="bytes", minimum=1024)),
        Option("ssl_certfile", _text),
        Option("ssl_keyfile", _text),
        Option("ssl_keyfile_password_file", _text),
        Option("ssl_ca_certs", _text),
        Option("ssl_cert_reqs", _choice(SSL_CERT_REQS)),
        Option("ssl_ciphers", _text),
        Option("env_file", _text),
        Option("max_requests", lambda v, o: parse_count(v, o, what="requests (0: off)", minimum=0)),
        Option("max_requests_jitter", lambda v, o: parse_count(v, o, what="requests", minimum=0)),
        Option("max_worker_memory", lambda v, o: parse_count(v, o, what="MiB (0: off)", minimum=0)),
        Option("max_worker_lifetime", parse_seconds),
        Option("worker_timeout", parse_seconds),
        # reloads with workers
        Option("rollout", _choice(ROLLOUT_MODES)),
        Option("canary", lambda v, o: parse_seconds(v, o, minimum=0.0)),
        Option("preload", _boolean),
        # the start of a new generation
        Option("start_nice", parse_nice),
    )
}


COUNTS = ("workers", "ws_max_size", "limit_concurrency", "backlog", "h11_max_incomplete_event_size",
          "max_requests", "max_requests_jitter", "max_worker_memory")


def build_settings(*layers: Mapping[str, object]) -> ServeSettings:
    """Settings from layers of already-parsed values (later layers win), over the defaults."""
    values: dict[str, object] = {}
    for layer in layers:
        values.update(layer)
    known = {f.name for f in fields(ServeSettings)}
    settings = ServeSettings(**{k: v for k, v in values.items() if k in known})
    return settings


def parse_value(option: Option, raw, where: str):
    """Parse a flag's or config entry's raw value for `option`; `where` names it in errors."""
    if option.repeated:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(option.parse(item, where) for item in items)
    return option.parse(raw, where)


def parse_config(text: str, path: str) -> dict[str, object]:
    """A TOML config file's settings, validated: errors name the key, line and what was expected."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    values = {}
    for key, raw in document.items():
        line = _line_of(text, key)
        where = f"{path}:{line}: {key}" if line else f"{path}: {key}"
        option = OPTIONS.get(key)
        if option is None:
            known = ", ".join(sorted(OPTIONS))
            raise SettingsError(f"{where}: unknown setting (known: {known})")
        if option.repeated and not isinstance(raw, (list, str)):
            raise SettingsError(f"{where}: expected a string or a list of strings, got {raw!r}")
        if key in ("bind", "control_allow") and isinstance(raw, list) and not all(isinstance(i, str) for i in raw):
            raise SettingsError(f"{where}: expected a list of strings, got {raw!r}")
        if key == "header" and isinstance(raw, list) and not all(isinstance(i, str) for i in raw):
            raise SettingsError(f"{where}: expected a list of strings, got {raw!r}")
        if key in COUNTS and isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        values[option.name] = parse_value(option, raw, where)
    return values


def _line_of(text: str, key: str) -> int | None:
    """The line defining top-level `key`: `key = …`, a dotted `key.sub = …`, or a `[key]`/`[key.sub]` table.

    Only blanks may precede the key: any whitespace would run over blank lines and name the first of them.
    """
    name = "|".join(re.escape(form) for form in (key, f'"{key}"', f"'{key}'"))
    pattern = re.compile(rf"^[ \t]*(?:(?:{name})[ \t]*[=.]|\[\[?[ \t]*(?:{name})[ \t]*[.\]])", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None
