"""`--env-file`: environment variables from a dotenv file, re-read by every new generation.

The parser is pure and strict: a line it cannot read is an error naming the
file and line (python-dotenv, which uvicorn uses, skips such lines with a
warning, so a typo would silently leave a setting at its old value).

Format: `NAME=VALUE` lines, optionally `export NAME=VALUE`; blank lines and
`#` comments; a VALUE is unquoted (trimmed, a ` #` starts a comment),
'single-quoted' (literal), or "double-quoted" (backslash escapes \\n \\t \\"
\\\\, may span lines). No `${VAR}` expansion: values are taken as written.

Applying a file must not leave the previous generation's values behind: the
process was started with some environment, a reload re-executes with the
current one, and a variable the file no longer sets must disappear (or get
its original value back). So what the file replaced is remembered in
`GRACEFUL_HTTP_ENV_FILE_ORIGINAL` and restored before the next file is applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import MutableMapping

from graceful_http.inherited import ENV_FILE_ORIGINAL as ORIGINAL_VARIABLE
from graceful_http.settings import SettingsError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGNMENT = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def parse_env_file(text: str, path: str) -> dict[str, str]:
    """The variables a dotenv file sets, in order; SettingsError naming `path:line` for a line we cannot read."""
    values: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = ASSIGNMENT.match(line)
        if match is None:
            raise SettingsError(f"{path}:{number}: expected NAME=VALUE, got {line.strip()[:60]!r}")
        name, rest = match.group(1), line[match.end():]
        if rest.startswith("'"):
            end = rest.find("'", 1)
            if end < 0:
                raise SettingsError(f"{path}:{number}: {name}: unterminated single-quoted value")
            value, after = rest[1:end], rest[end + 1:]
        elif rest.startswith('"'):
            value, after, index = _double_quoted(rest[1:], lines, index, path, number, name)
        else:
            value, _, _ = re.split(r"[ \t]#", rest, maxsplit=1)[0].partition("\n")
            value, after = value.strip(), ""
            if value.startswith(("'", '"')):
                raise SettingsError(f"{path}:{number}: {name}: unterminated quoted value")
        after = after.strip()
        if after and not after.startswith("#"):
            raise SettingsError(f"{path}:{number}: {name}: unexpected text after the quoted value: {after[:40]!r}")
        if "\0" in value:
            raise SettingsError(f"{path}:{number}: {name}: a value cannot contain a NUL character")
        reserved = _reserved(name)
        if reserved:
            raise SettingsError(f"{path}:{number}: {name}: {reserved}")
        values[name] = value
    return values


# Variables that are not the app's: the interpreter reads PYTHON* before any env file is read (and would
# read the file's values only when the next generation starts), and the rest carry the protocols between
# systemd, the generations and their workers.
PROTOCOL_PREFIXES = ("LISTEN_", "WATCHDOG_", "GRACEFUL_HTTP_")
PROTOCOL_NAMES = ("NOTIFY_SOCKET", "MAINPID", "INVOCATION_ID", "JOURNAL_STREAM", "PROMETHEUS_MULTIPROC_DIR")


def _reserved(name: str) -> str | None:
    if name.startswith("PYTHON"):
        return "the interpreter reads it before the env file: set it with Environment= in the unit"
    if name.startswith(PROTOCOL_PREFIXES) or name in PROTOCOL_NAMES:
        return "set by systemd or graceful-http itself, not by an env file"
    return None


def _double_quoted(rest: str, lines: list[str], index: int, path: str, number: int, name: str):
    """A double-quoted value from `rest` on, continuing on the next lines until its closing quote."""
    chars: list[str] = []
    while True:
        position = 0
        while position < len(rest):
            char = rest[position]
            if char == "\\" and position + 1 < len(rest):
                following = rest[position + 1]
                chars.append(ESCAPES.get(following, "\\" + following))
                position += 2
                continue
            if char == '"':
                return "".join(chars), rest[position + 1:], index
            chars.append(char)
            position += 1
        if index >= len(lines):
            raise SettingsError(f"{path}:{number}: {name}: unterminated double-quoted value")
        chars.append("\n")
        rest = lines[index]
        index += 1


def read_env_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise SettingsError(f"cannot read env file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"env file {path} is not UTF-8 text") from None
    return parse_env_file(text, path)


def apply_env_file(values: dict[str, str] | None, environ: MutableMapping[str, str]) -> None:
    """Restore what a previous generation's file replaced, then set `values` (None: no file now)."""
    saved = environ.pop(ORIGINAL_VARIABLE, None)
    if saved:
        try:
            original = json.loads(saved)
        except ValueError:
            original = {}
        for name, value in original.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
    if not values:
        return
    environ[ORIGINAL_VARIABLE] = json.dumps({name: environ.get(name) for name in values})
    environ.update(values)
