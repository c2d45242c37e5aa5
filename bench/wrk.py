"""Run Debian's wrk and read its report."""

from __future__ import annotations

import re
import subprocess

WRK = "/usr/bin/wrk"

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"([\d.]+)(us|ms|s|m|h)"


class WrkError(RuntimeError):
    pass


def seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse(text: str) -> dict:
    """wrk --latency output → requests, req_s, p50/p75/p90/p99/max (seconds), errors."""
    result = {"requests": None, "req_s": None, "p50": None, "p75": None, "p90": None, "p99": None, "max": None,
              "non_2xx_3xx": 0, "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    match = re.search(rf"Latency\s+{_NUMBER}\s+{_NUMBER}\s+{_NUMBER}", text)
    if match:
        result["max"] = seconds(match.group(5), match.group(6))
    for percent, key in (("50", "p50"), ("75", "p75"), ("90", "p90"), ("99", "p99")):
        match = re.search(rf"^\s+{percent}(?:\.0+)?%\s+{_NUMBER}", text, re.MULTILINE)
        if match:
            result[key] = seconds(match.group(1), match.group(2))
    match = re.search(r"(\d+) requests in", text)
    if match:
        result["requests"] = int(match.group(1))
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if match:
        result["req_s"] = float(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        result["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups())))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        result["non_2xx_3xx"] = int(match.group(1))
    if result["requests"] is None or result["req_s"] is None:
        raise WrkError(f"cannot read wrk's report:\n{text}")
    result["socket_errors"] = sum(result["errors"].values())
    return result


def start(url: str, duration: float, connections: int = 50, threads: int = 1, timeout: float = 2.0):
    """Start wrk in the background; finish() it for the parsed report."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", f"{timeout:g}s", url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise WrkError(f"wrk exited with {process.returncode}:\n{out}")
    return parse(out)


def run(url: str, duration: float, connections: int = 50, threads: int = 1) -> dict:
    return finish(start(url, duration, connections, threads), timeout=duration + 60)


def version() -> str:
    out = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" Copyright")[0].strip() if out else "unknown"
