#!/usr/bin/python3
"""Write graceful-http(1) in roff to stdout, from the command line's own parser.

Every command, option, metavar and help text comes from
graceful_http.cli.build_parser(), so the page says what the installed command
accepts. Only what argparse does not know (signals, systemd, files) is written
here. Run by debian/rules at build time:

    PYTHONPATH=service python3 debian/manpage.py --version 0.1.0 > graceful-http.1
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from graceful_http.cli import build_parser

HEADER = r"""
.SH DESCRIPTION
.B graceful\-http
serves an ASGI or WSGI application on the listening sockets systemd passes to
it (socket activation), or on addresses of its own.
On
.BR "systemctl reload" ,
.B "POST /graceful"
or
.B SIGHUP
it starts a new generation of itself that inherits the sockets and re\-reads
the code from disk.
systemd is told the new main PID, and the old generation finishes its
in\-flight requests and exits: no connection is refused and no request fails.
A new generation that cannot start is killed, the old one keeps serving, and
the reload fails with the reason.
.PP
Without an
.I APP
argument it serves a demo:
.B "GET /"
answers with the pid of the process that served it, and
.B "GET /sleep?seconds=N"
answers after N seconds.
"""

FOOTER = r"""
.SH SIGNALS
.TP
.B SIGHUP
Reload: hand over to a new generation, as
.B graceful\-http reload
does.
.TP
.BR SIGTERM ", " SIGINT
Stop gracefully: stop accepting, finish the requests in flight (up to the
graceful timeout), exit 0.
.SH ENDPOINTS
Served before the app on every listener:
.TP
.B "POST /graceful"
Start a reload: 202, or 409 if one is under way, 403 unless the peer is
allowed.
.TP
.B "GET /healthz"
200 while this generation accepts connections, 503 once it drains.
.SH SYSTEMD
The package installs the units listed under
.BR FILES ,
and enables and starts its sockets: the service starts on the first
connection, or with
.BR "systemctl start graceful\-http" .
.PP
.B systemctl reload graceful\-http
runs
.BR "graceful\-http reload" ,
which waits for the outcome: it succeeds once the new generation serves and
fails, with the reason, when the old one kept serving.
.PP
Upgrading the package does not stop or restart the sockets or the service: if
the service runs, the package reloads it, so the new version takes over
without dropping a request.
If the new version cannot start, the old generation keeps serving, and the
upgrade says so and leaves the package installed.
.PP
To serve another app, override
.B ExecStart=
with a drop\-in
.RB ( "systemctl edit graceful\-http" ):
.PP
.RS
.nf
[Service]
ExecStart=
ExecStart=/usr/bin/graceful\-http serve myproject.asgi:application \e
    \-\-app\-dir /srv/myproject
.fi
.RE
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1),
.BR systemd.socket (5),
.BR systemd.service (5)
"""


def escape(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each command, in the order --help lists them."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps no public list
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}  # noqa: SLF001
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def option_label(action: argparse.Action) -> str:
    """How an option is written in the page: `--flag METAVAR`, or the positional's METAVAR."""
    if not action.option_strings:
        return italic(action.metavar or action.dest)
    if action.nargs == 0:
        return ", ".join(bold(flag) for flag in action.option_strings)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"{bold(flag)} {italic(metavar)}" for flag in action.option_strings)


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()  # noqa: SLF001 - expands %(default)s and friends as --help does
    return formatter._expand_help(action) if action.help else ""  # noqa: SLF001


def synopsis(parser: argparse.ArgumentParser) -> str:
    """The usage line: the command in bold, each [...] group kept on one output line."""
    words = parser.format_usage().strip().removeprefix("usage:").split()
    prog_words = len(parser.prog.split())
    text = escape(" ".join(words[prog_words:]))
    # Unbreakable spaces inside brackets, so that groff wraps only between groups.
    depth, chars = 0, []
    for char in text:
        depth += char == "["
        depth -= char == "]"
        chars.append("\\ " if char == " " and depth > 0 else char)
    return bold(parser.prog) + " " + "".join(chars)


def options(parser: argparse.ArgumentParser, with_help: bool) -> list[str]:
    """.TP paragraphs for the positionals, then the options, as --help lists them."""
    lines = []
    for action in parser._actions:  # noqa: SLF001
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            continue
        if isinstance(action, argparse._HelpAction) and not with_help:  # noqa: SLF001
            continue
        lines += [".TP", option_label(action), escape(expanded_help(parser, action))]
    return lines


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values of a systemd unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def files_section(units_dir: str | None, files: list[str]) -> list[str]:
    """FILES: the configuration files (INSTALLED=SOURCE, described by the comments that open SOURCE),
    then each unit the package ships, with its description and, for sockets, where it listens."""
    lines = [".SH FILES"]
    for spec in files:
        installed, _, source = spec.partition("=")
        with open(source, encoding="utf-8") as file:
            head = []
            for line in file:  # the comment block that opens the file
                if not line.startswith("#"):
                    break
                head.append(line.lstrip("#").strip())
        lines += [".TP", italic(installed), escape(" ".join(head))]
    if units_dir is None:
        return lines
    for name in sorted(os.listdir(units_dir), key=lambda n: (not n.endswith(".service"), n)):
        if not name.endswith((".service", ".socket")):
            continue
        with open(os.path.join(units_dir, name), encoding="utf-8") as file:
            settings = unit_settings(file.read())
        text = " ".join(settings.get("Unit.Description", [name])[-1:])
        listens = [v for v in settings.get("Socket.ListenStream", []) if v]
        if listens:
            text += "; listens on " + ", ".join(listens)
        lines += [".TP", italic(f"/lib/systemd/system/{name}"), escape(text + ".")]
    return lines


def render(version: str, date: str, units_dir: str | None = None, files: list[str] = ()) -> str:
    parser = build_parser()
    commands = subcommands(parser)
    out = [
        f'.TH GRACEFUL\\-HTTP 1 "{date}" "graceful\\-http {escape(version)}" "User Commands"',
        ".SH NAME",
        f"graceful\\-http \\- {escape(parser.description[0].lower() + parser.description[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
    ]
    out += [".ad l", ".nh"]  # no hyphens or stretched spaces in the long usage lines
    for sub in [parser] + [sub for _, _, sub in commands]:
        out += [".PP", synopsis(sub)]
    out += [".ad", ".hy"]
    out.append(HEADER.strip())
    out += [".SH COMMANDS"]
    described: dict[tuple[str, ...], str] = {}
    for name, summary, sub in commands:
        out += [".SS " + bold(sub.prog), escape(sub.description or summary)]
        listed = options(sub, with_help=False)
        same_as = described.setdefault(tuple(listed), sub.prog)
        if same_as != sub.prog:
            out += [".PP", f"It takes the same arguments as {bold(same_as)}."]
        else:
            out += listed
    out += [".SH OPTIONS", "Before the command:"] + options(parser, with_help=True)
    footer = FOOTER.strip().split("\n")
    see_also = footer.index(".SH SEE ALSO")
    out += footer[:see_also] + (files_section(units_dir, list(files)) if units_dir or files else []) + footer[see_also:]
    return "\n".join(out) + "\n"


def main() -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--version", required=True, help="the package version, shown in the page's footer")
    arguments.add_argument("--date", help="the page's date, YYYY-MM-DD (default: from $SOURCE_DATE_EPOCH, else today)")
    arguments.add_argument("--units", metavar="DIR", help="the systemd units the package installs, for FILES")
    arguments.add_argument("--file", action="append", default=[], metavar="INSTALLED=SOURCE",
                           help="a configuration file the package installs, for FILES")
    args = arguments.parse_args()
    date = args.date
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
                else datetime.datetime.now(datetime.timezone.utc))
        date = when.strftime("%Y-%m-%d")
    sys.stdout.write(render(args.version, date, args.units, args.file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
