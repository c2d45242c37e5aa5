"""The command line: `serve` and `reload`. The only place exit codes are decided.

Exit codes: 0 success; 1 the service could not start, or a reload failed and
the old generation kept serving; 2 usage or connection errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from graceful_http import __version__
from graceful_http.settings import (
    DEFAULT_APP,
    DEFAULT_BIND,
    ServeSettings,
    SettingsError,
    parse_bind,
    parse_network,
    parse_seconds,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graceful-http",
        description="A socket-activated HTTP service whose reloads nobody notices.",
    )
    parser.add_argument("--version", action="version", version=f"graceful-http {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="serve an ASGI app (default: the demo app)",
                                description="Serve an ASGI app on the sockets systemd passed, or on --bind addresses.")
    serve.add_argument("app", nargs="?", default=DEFAULT_APP, metavar="APP",
                       help=f"the ASGI app as module:attribute (default: {DEFAULT_APP})")
    serve.add_argument("--app-dir", default=".", metavar="DIR",
                       help="directory added to the import path for APP (default: the working directory)")
    serve.add_argument("--bind", action="append", metavar="ADDR",
                       help=f"HOST:PORT, [V6]:PORT or unix:PATH; repeatable; used only when systemd passed no"
                            f" sockets (default: {DEFAULT_BIND})")
    serve.add_argument("--graceful-timeout", default="30", metavar="S",
                       help="how long a draining generation may finish its requests (default: 30)")
    serve.add_argument("--ready-timeout", default="30", metavar="S",
                       help="how long a new generation may take to become ready (default: 30)")
    serve.add_argument("--pid-file", metavar="PATH", help="keep the current main pid in PATH")
    serve.add_argument("--control-allow", action="append", metavar="CIDR",
                       help="also allow POST /graceful from these networks (default: loopback and unix sockets)")
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")

    reload = commands.add_parser("reload", help="hand over to a new generation and wait until it serves",
                                 description="Ask the running service for a reload and wait for the outcome."
                                             " Exit 0 and print the new main pid when the new generation serves;"
                                             " exit 1 with the reason when it failed (the old one keeps serving);"
                                             " exit 2 for usage or connection errors.")
    target = reload.add_mutually_exclusive_group()
    target.add_argument("--pid", type=int, help="the main pid (default: $MAINPID, as systemd sets for ExecReload=)")
    target.add_argument("--pid-file", metavar="PATH", help="read the main pid from PATH")
    reload.add_argument("--timeout", default="120", metavar="S", help="give up after S seconds (default: 120)")
    return parser


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    defaults = ServeSettings()
    return ServeSettings(
        app=args.app,
        app_dir=args.app_dir,
        binds=tuple(parse_bind(b) for b in args.bind) if args.bind else defaults.binds,
        graceful_timeout=parse_seconds("--graceful-timeout", args.graceful_timeout),
        ready_timeout=parse_seconds("--ready-timeout", args.ready_timeout, minimum=0.1),
        pid_file=args.pid_file,
        control_allow=defaults.control_allow + tuple(parse_network(n) for n in args.control_allow or ()),
        access_log=not args.no_access_log,
    )


def serve(args: argparse.Namespace) -> int:
    # Until our own handler is installed, a SIGHUP must not kill a starting generation.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = serve_settings(args)
    from graceful_http.supervisor import run

    _use_fastest_event_loop()
    return asyncio.run(run(settings))


def _use_fastest_event_loop() -> None:
    """uvloop when installed (as `uvicorn[standard]` brings), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def reload(args: argparse.Namespace) -> int:
    from graceful_http.controlsocket import ControlError, request_reload
    from graceful_http.pidfile import read_pid_file

    timeout = parse_seconds("--timeout", args.timeout, minimum=0.1)
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
        outcome = request_reload(pid, timeout, progress)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return reload(args)
    except SettingsError as exc:
        parser.exit(EXIT_USAGE, f"graceful-http: {exc}\n")
    except KeyboardInterrupt:
        return 130
