"""The command line: `serve`, `reload` and `check`. The only place exit codes are decided.

Exit codes: 0 success; 1 the service (or its app) could not start, or a
reload failed and the old generation kept serving; 2 usage, configuration
or connection errors.
"""

from __future__ import annotations

import os
import sys

from graceful_http import __version__

TYPE_CHECKING = False  # not `typing`'s: its import is 4 ms of every `systemctl reload` (see `main`)
if TYPE_CHECKING:
    import argparse
    from typing import NoReturn

    from graceful_http.settings import ServeSettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMANDS = ("serve", "check", "reload")
DEFAULT_RELOAD_TIMEOUT = 120.0


def _serve_help() -> dict[str, tuple[str | None, str]]:
    from graceful_http.settings import (
        DEFAULT_BIND,
        DEFAULT_FORWARDED_ALLOW_IPS,
        INTERFACES,
        LIFESPAN_MODES,
        LOG_LEVELS,
        ROLLOUT_MODES,
        SSL_CERT_REQS,
        WEBSOCKET_IMPLEMENTATIONS,
    )

    return {
        "app_dir": ("DIR", "directory put first on the import path for APP (default: the working directory)"),
        "factory": (None, "APP is a factory: call it (with no arguments) to get the app"),
        "interface": ("KIND", f"{' | '.join(INTERFACES)}: how to call APP (default: auto, which detects WSGI apps)"),
        "bind": ("ADDR", f"HOST:PORT, [V6]:PORT or unix:PATH; repeatable; used only when no sockets were passed"
                         f" (default: {DEFAULT_BIND})"),
        "workers": ("N", "worker processes per generation (default: 1)"),
        "graceful_timeout": ("S", "how long a draining generation may finish its requests (default: 30)"),
        "ready_timeout": ("S", "how long a new generation may take to become ready (default: 30)"),
        "pid_file": ("PATH", "keep the current main pid in PATH"),
        "control_allow": ("CIDR", ("allow POST /graceful without a token from these networks, unless proxied"
                             " (default: none; loopback is no credential)")),
        "control_token_file": ("PATH", "POST /graceful with this token (Authorization: Bearer) reloads,"
                                       " also through a proxy"),
        "access_log": (None, "log one line per request (default: on)"),
        "log_level": ("LEVEL", f"{' | '.join(LOG_LEVELS)} (default: info)"),
        "metrics": (None, "serve Prometheus metrics at GET /metrics (default: off)"),
        "stable_pid": (None, "stay as a small holder process whose pid never changes, forwarding signals to the"
                             " current main (default: on unless under systemd; always as PID 1)"),
        "ws": ("IMPL", f"{' | '.join(WEBSOCKET_IMPLEMENTATIONS)}: uvicorn's WebSocket implementation (default: auto)"),
        "ws_max_size": ("BYTES", "largest WebSocket message accepted (default: 16777216)"),
        "ws_ping_interval": ("S", "WebSocket ping interval (default: 20)"),
        "ws_ping_timeout": ("S", "WebSocket ping timeout (default: 20)"),
        "websocket_close_spread": ("S", "when draining, close WebSockets (1012 at a reload, 1001 at a stop) at"
                                        " moments spread over S seconds, at most half the graceful timeout"
                                        " (default: 5; 0: all at once)"),
        "root_path": ("PATH", "the prefix a proxy mounts the app under, such as /api (the ASGI root_path;"
                              " default: none)"),
        "proxy_headers": (None, "take the client address and scheme from X-Forwarded-For and X-Forwarded-Proto,"
                                " from trusted proxies only (default: on)"),
        "forwarded_allow_ips": ("IPS", "the trusted proxies: * or addresses and networks, comma-separated"
                                       f" (default: $FORWARDED_ALLOW_IPS, else {','.join(DEFAULT_FORWARDED_ALLOW_IPS)})"),
        "timeout_keep_alive": ("S", "close a keep-alive connection idle this long (default: 75)"),
        "limit_concurrency": ("N", "answer 503 beyond N connections or requests at once, per process"
                                   " (default: no limit)"),
        "backlog": ("N", "the listen queue of every listening socket (default: 2048)"),
        "header": ("NAME:VALUE", "add this header to every response; repeatable"),
        "server_header": (None, "send Server: uvicorn (default: on)"),
        "date_header": (None, "send Date (default: on)"),
        "lifespan": ("MODE", f"{' | '.join(LIFESPAN_MODES)}: run the app's ASGI lifespan (on: it must support it;"
                             " default: auto)"),
        "h11_max_incomplete_event_size": ("BYTES", "the largest request head accepted, with h11 and httptools alike"
                                                   " (default: 16384 with h11, 65536 with httptools)"),
        "ssl_certfile": ("PATH", "serve HTTPS with this PEM certificate (chain), re-read by every new generation"),
        "ssl_keyfile": ("PATH", "its private key (default: in the certificate file)"),
        "ssl_keyfile_password_file": ("PATH", "the private key's password is in PATH"),
        "ssl_ca_certs": ("PATH", "the CA certificates that sign client certificates (with --ssl-cert-reqs)"),
        "ssl_cert_reqs": ("MODE", f"{' | '.join(SSL_CERT_REQS)}: ask clients for a certificate (default: none)"),
        "ssl_ciphers": ("LIST", "OpenSSL cipher list for TLS 1.2 and older (default: TLSv1, as uvicorn)"),
        "env_file": ("PATH", "set environment variables from this dotenv file, re-read by every new generation"),
        "max_requests": ("N", "recycle a worker after about N requests: a new one first, then the old one hands"
                              " over its connections and drains (default: 0, off; with --workers 2 or more)"),
        "max_requests_jitter": ("J", "each worker's limit is N plus a random 0..J, so workers recycle apart"
                                     " (default: 0)"),
        "max_worker_memory": ("MIB", "recycle a worker whose resident memory exceeds MIB (default: 0, off)"),
        "max_worker_lifetime": ("S", "recycle a worker after S seconds (default: 0, off)"),
        "worker_timeout": ("S", "a worker whose event loop has not answered for S seconds has its threads' stacks"
                                " logged, is replaced, then killed (default: 0, off)"),
        "rollout": ("HOW", f"{' | '.join(ROLLOUT_MODES)}: with --workers, a reload replaces one worker at a time"
                           " (at most N+1 workers at once) or starts the whole new generation beside the old one"
                           " (default: worker)"),
        "canary": ("S", "at a reload, the new generation's first worker serves beside the old workers for S seconds;"
                        " if its error rate is worse (5xx and failed requests; a one-sided test at the 0.01"
                        " level), the reload"
                        " fails and the old generation serves on (default: 0, off)"),
        "start_nice": ("N", "a new generation starts at CPU priority nice N while the old one serves, and gets the"
                            " old main's back once ready; where it could not get it back (no CAP_SYS_NICE or"
                            " RLIMIT_NICE), or N is not lower than the old main's priority, it starts at the old"
                            " main's (default: 0, off)"),
        "preload": (None, "with --workers: import the app in the generation's main before forking the workers, which"
                          " share it copy-on-write; a replacement worker is forked from the main too, with the"
                          " main's copy of the code (default: off)"),
    }


def _parser_class():
    """argparse with one-line errors: `graceful-http: <what> (see --help)`, exit 2. (Made when first needed:
    a plain `graceful-http reload` does without argparse, see `quick_reload_arguments`.)"""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(EXIT_USAGE, f"graceful-http: {message} (see {self.prog} --help)\n")

    return _Parser


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    import argparse

    from graceful_http.settings import DEFAULT_APP, OPTIONS

    serve_help = _serve_help()
    parser.add_argument("app", nargs="?", default=argparse.SUPPRESS, metavar="APP",
                        help=f"the app as module:attribute (default: {DEFAULT_APP})")
    parser.add_argument("--config", metavar="PATH",
                        help="read settings from this TOML file (re-read by every new generation);"
                             " command-line options override it")
    for key, option in OPTIONS.items():
        if key == "app":
            continue
        metavar, help_text = serve_help[key]
        kwargs = {"dest": option.name, "default": argparse.SUPPRESS, "help": help_text}
        if metavar is None:  # a boolean: --x and --no-x, so the command line can undo what the file set
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif option.repeated:
            parser.add_argument(option.flag, action="append", metavar=metavar, **kwargs)
        else:
            parser.add_argument(option.flag, metavar=metavar, **kwargs)


def build_parser(commands: tuple[str, ...] = COMMANDS) -> argparse.ArgumentParser:
    """The command line, or only some of its commands (`main` builds just `reload`'s for a reload)."""
    parser_class = _parser_class()
    parser = parser_class(prog="graceful-http",
                     description="A socket-activated HTTP service and app server whose reloads nobody notices.")
    parser.add_argument("--version", action="version", version=f"graceful-http {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=parser_class)

    if "serve" in commands:
        serve = subparsers.add_parser("serve", help="serve an app (default: the demo app)",
                                      description="Serve an ASGI or WSGI app on the sockets systemd passed,"
                                                  " or on --bind addresses.")
        _add_serve_options(serve)

    if "check" in commands:
        check = subparsers.add_parser("check", help="load the settings and the app without serving (like nginx -t)",
                                      description="Load the config file and the app as `serve` would, without"
                                                  " serving: exit 0 and print `ok`, or exit 1 with the error.")
        _add_serve_options(check)

    if "reload" in commands:
        _add_reload_command(subparsers)
    return parser


_built: dict[tuple[str, ...], argparse.ArgumentParser] = {}


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for this command line: only its command's when it names one, built once per process.

    Building costs (about 100 `add_argument`s for serve and check) fall on every reload: `reload` is
    ExecReload=, started at every `systemctl reload`, and imports nothing of the server; a one-process main's
    new generation is a fork of its standby (see `standby`), which inherited the parser its main built."""
    commands = (argv[0],) if argv[:1] and argv[0] in COMMANDS else COMMANDS
    if commands not in _built:
        _built[commands] = build_parser(commands)
    return _built[commands]


RELOAD_OPTIONS = {"--pid": "pid", "--pid-file": "pid_file", "--timeout": "timeout", "--canary": "canary"}


def quick_reload_arguments(argv: list[str]):
    """A plain `reload` command line (each of RELOAD_OPTIONS at most once, `--x V` or `--x=V`, a numeric --pid,
    not both --pid and --pid-file) read without argparse, or None for argparse to read (and explain).

    Why: `graceful-http reload` is ExecReload=, started by every `systemctl reload` on the CPUs the traffic
    uses; argparse and what it imports (re, gettext, locale, shutil) were 12 ms of its 40 ms of CPU."""
    if argv[:1] != ["reload"]:
        return None
    values: dict[str, str] = {}
    rest = argv[1:]
    while rest:
        flag, equals, value = rest[0].partition("=")
        if flag not in RELOAD_OPTIONS or RELOAD_OPTIONS[flag] in values:
            return None
        if not equals:
            if len(rest) < 2 or rest[1].startswith("-"):
                return None
            value, rest = rest[1], rest[1:]
        values[RELOAD_OPTIONS[flag]] = value
        rest = rest[1:]
    if "pid" in values and ("pid_file" in values or not values["pid"].isdigit()):
        return None
    from types import SimpleNamespace

    return SimpleNamespace(command="reload", pid=int(values["pid"]) if "pid" in values else None,
                           **{name: values.get(name) for name in ("pid_file", "timeout", "canary")})


def _add_reload_command(subparsers) -> None:
    reload = subparsers.add_parser("reload", help="hand over to a new generation and wait until it serves",
                                 description="Ask the running service for a reload and wait for the outcome."
                                             " Exit 0 and print the new main pid when the new generation serves;"
                                             " exit 1 with the reason when it failed (the old one keeps serving);"
                                             " exit 2 for usage or connection errors.")
    target = reload.add_mutually_exclusive_group()
    target.add_argument("--pid", type=int, help="the main pid (default: $MAINPID, as systemd sets for ExecReload=)")
    target.add_argument("--pid-file", metavar="PATH", help="read the main pid from PATH")
    reload.add_argument("--timeout", metavar="S",
                        help=f"give up after S seconds (default: {DEFAULT_RELOAD_TIMEOUT:g})")
    reload.add_argument("--canary", metavar="S", help="this reload with a canary of S seconds (see serve --canary;"
                                                      " default: the service's setting)")


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Defaults, then the config file, then the command line."""
    from graceful_http.settings import OPTIONS, SettingsError, build_settings, parse_config, parse_value

    from_file = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise SettingsError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"config file {args.config} is not UTF-8 text") from None
        from_file = parse_config(text, args.config)
    from_flags = {}
    for key, option in OPTIONS.items():
        if option.name in vars(args):
            raw = getattr(args, option.name)
            from_flags[option.name] = raw if isinstance(raw, bool) else parse_value(
                option, raw, option.flag if key != "app" else "APP")
    return build_settings(from_file, from_flags)


def serve(args: argparse.Namespace) -> int:
    import signal

    from graceful_http.envfile import apply_env_file, read_env_file
    from graceful_http.inherited import Inherited, Role
    from graceful_http.settings import SettingsError

    # Until our own handler is installed, a SIGHUP must not kill a starting generation.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    inherited = Inherited.from_environ(os.environ)  # which process this is: decided here, once
    try:
        settings = serve_settings(args)
        environment = read_env_file(settings.env_file) if settings.env_file else None
    except SettingsError as exc:
        from graceful_http import logs
        from graceful_http.handoff import PredecessorLink
        from graceful_http.serving import report_start_failure

        logs.setup(inherited.generation)
        return report_start_failure(str(exc), PredecessorLink.from_inherited(inherited), EXIT_USAGE)
    if inherited.role is Role.FIRST_MAIN:
        from graceful_http.holder import hold_if_wanted

        if (held := hold_if_wanted(settings)) is not None:  # this process stayed as the stable-pid holder
            return held
    import asyncio  # not before: the holder runs no event loop

    apply_env_file(environment, os.environ)  # before the app is imported: it may read its settings from there
    _use_fastest_event_loop()
    if inherited.role is Role.WORKER:  # a replacement worker, forked and exec'd by its main
        from graceful_http.worker_process import run_worker
        from graceful_http.workers import MainLink

        _exit_without_teardown(asyncio.run(run_worker(settings, MainLink.from_inherited(inherited), inherited)))
    if settings.workers > (os.cpu_count() or 1):
        print(f"graceful-http: warning: --workers {settings.workers} is more than the {os.cpu_count()} CPUs here",
              file=sys.stderr)
    from graceful_http.main_process import run_main

    _exit_without_teardown(run_main(settings, inherited))


def _exit_without_teardown(code: int) -> NoReturn:
    """End a serving process that is done (drained, the app's shutdown run, `exited` logged): the atexit
    handlers run, the interpreter's teardown does not.

    The teardown frees every object one by one: 30 ms of CPU for a main with nothing but uvicorn loaded,
    more with an app's data, spent while the next generation serves on the same CPUs (a reload's old main
    exits in the very second the new one takes over). Nothing of it is needed by a process that exits.
    If app threads still run (a sync handler, WSGI or a Starlette `def` endpoint, cut at the graceful
    timeout goes on in its thread pool), the atexit handlers are skipped as well: the interpreter would
    join those threads first, keeping this generation alive past --graceful-timeout (forever, for a stuck
    handler) after it logged `exited`."""
    import atexit
    import threading

    from graceful_http.spawn import flush_and_exit

    if not any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        atexit._run_exitfuncs()
    flush_and_exit(code)


def _use_fastest_event_loop() -> None:
    """uvloop when installed (as `uvicorn[standard]` brings), else asyncio's own loop."""
    import asyncio

    global _uvloop_missing
    if _uvloop_missing:
        return
    try:
        import uvloop
    except ImportError:
        _uvloop_missing = True
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# uvloop was looked for and is missing: a new main forked from this one (see `zygote`) does not search sys.path
# for it again during a reload (a failed import is not remembered by Python).
_uvloop_missing = False


def check(args: argparse.Namespace) -> int:
    from graceful_http.apploader import AppLoadError, load_asgi3
    from graceful_http.envfile import apply_env_file, read_env_file
    from graceful_http.serving import StartError, read_token
    from graceful_http.settings import SettingsError
    from graceful_http.tls import TLSError, server_context

    try:
        settings = serve_settings(args)
        environment = read_env_file(settings.env_file) if settings.env_file else None
        apply_env_file(environment, os.environ)  # the app is loaded as serve would load it
        from graceful_http.engine import trusted_proxies

        trusted_proxies(settings)
    except SettingsError as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:  # what serve loads before serving, too
        read_token(settings.control_token_file)
        server_context(settings)
        load_asgi3(settings.app, settings.app_dir, factory=settings.factory, interface=settings.interface)
    except (AppLoadError, StartError, TLSError) as exc:
        return _fail(EXIT_FAILED, str(exc))
    print("ok")
    return EXIT_OK


def reload(args: argparse.Namespace) -> int:
    from graceful_http.pidfile import read_pid_file
    from graceful_http.reloadclient import ControlError, request_reload

    timeout = DEFAULT_RELOAD_TIMEOUT
    if args.timeout is not None:
        from graceful_http.settings import SettingsError, parse_seconds

        try:
            timeout = parse_seconds(args.timeout, "--timeout", minimum=0.1)
        except SettingsError as exc:
            return _fail(EXIT_USAGE, str(exc))
    canary = None
    if args.canary is not None:
        from graceful_http.settings import SettingsError, parse_seconds

        try:
            canary = parse_seconds(args.canary, "--canary", minimum=0.0)
        except SettingsError as exc:
            return _fail(EXIT_USAGE, str(exc))
    if args.pid is not None:
        pid = args.pid
    elif args.pid_file:
        try:
            pid = read_pid_file(args.pid_file)
        except ValueError as exc:
            return _fail(EXIT_USAGE, str(exc))
    elif os.environ.get("MAINPID", "").isdigit():
        pid = int(os.environ["MAINPID"])
    else:
        return _fail(EXIT_USAGE, "reload: no --pid or --pid-file given and $MAINPID is not set")

    def progress(outcome):
        print(f"graceful-http reload: {outcome.detail}", file=sys.stderr, flush=True)

    try:
        outcome = request_reload(pid, timeout, progress, canary)
    except ControlError as exc:
        return _fail(EXIT_USAGE, f"reload: {exc}")
    if outcome.code == "done":
        print(outcome.pid)
        print(f"graceful-http reload: {outcome.detail}", file=sys.stderr)
        return EXIT_OK
    return _fail(EXIT_FAILED, f"reload failed: {outcome.detail}")


def _fail(code: int, message: str) -> int:
    print(f"graceful-http: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = quick_reload_arguments(argv) or parser_for(argv).parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "check":
            return check(args)
        return reload(args)
    except KeyboardInterrupt:
        return 130
