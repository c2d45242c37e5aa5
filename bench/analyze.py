"""Figures from the load tool's per-request records and the reload instants."""

from __future__ import annotations

import statistics

import numpy as np

from bench.load import ERRORS

AFTER_RELOAD = 1.0  # seconds: "within the second after each reload"


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile of a sequence (None when empty)."""
    values = np.asarray(values, dtype=float)
    return float(np.percentile(values, q)) if values.size else None


def spread(samples: list[float]) -> dict:
    """median, p90, min, max (ms) of samples in seconds."""
    if not samples:
        return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None, "samples_ms": []}
    return {
        "n": len(samples),
        "median_ms": ms(statistics.median(samples)),
        "p90_ms": ms(percentile(samples, 90)),
        "min_ms": ms(min(samples)),
        "max_ms": ms(max(samples)),
        "samples_ms": [ms(s) for s in samples],
    }


def arrays(data: dict):
    start = np.asarray(data["start"], dtype=float)
    latency = np.asarray(data["latency"], dtype=float)
    code = np.asarray(data["code"], dtype=int)
    pid = np.asarray(data["pid"], dtype=int)
    return start, latency, code, pid


def _latency_figures(latency, answered, mask) -> dict:
    chosen = latency[mask & answered]
    return {
        "p50_ms": ms(percentile(chosen, 50)),
        "p99_ms": ms(percentile(chosen, 99)),
        "max_ms": ms(float(chosen.max())) if chosen.size else None,
    }


def _errors(code, mask) -> dict:
    answered = code > 0
    counts = {"non_2xx": int(np.count_nonzero(mask & answered & ((code < 200) | (code >= 300))))}
    for number, name in ERRORS.items():
        counts[name] = int(np.count_nonzero(mask & (code == number)))
    counts["socket"] = sum(counts[name] for name in ERRORS.values())
    counts["total"] = counts["non_2xx"] + counts["socket"]
    return counts


def summarize_probe(data: dict, reloads: list[dict], window: float = AFTER_RELOAD) -> dict:
    """Totals over the run, the same within `window` after each reload, and outside those windows.

    A request belongs to a reload's window when it was in flight at any moment of
    [reload requested, + window): started before the window ends and finished after it began.
    """
    start, latency, code, pid = arrays(data)
    end = start + latency
    answered = code > 0
    everything = np.ones(start.shape, dtype=bool)
    duration = data["ended"] - data["began"]

    first_answer = {}
    order = np.argsort(end)
    for index in order[answered[order]]:
        first_answer.setdefault(int(pid[index]), float(end[index]))

    after = np.zeros(start.shape, dtype=bool)
    per_reload = []
    for reload in reloads:
        t = reload["requested"]
        mask = (start < t + window) & (end >= t)
        after |= mask
        new = [seen for p, seen in first_answer.items() if seen >= t and p]
        per_reload.append({
            "at_s": round(t - data["began"], 3),
            "ok": reload["ok"],
            "done_after_ms": ms(reload["done"] - t) if reload.get("done") else None,
            "requests": int(np.count_nonzero(mask)),
            "errors": _errors(code, mask)["total"],
            **_latency_figures(latency, answered, mask),
            "new_pid_answers_after_ms": ms(min(new) - t) if new else None,
        })
    steady = ~after
    switch = [r["new_pid_answers_after_ms"] for r in per_reload if r["new_pid_answers_after_ms"] is not None]
    return {
        "duration_s": round(duration, 3),
        "connections": data["connections"],
        "requests": int(start.size),
        "req_s": round(int(np.count_nonzero(answered)) / duration, 1) if duration > 0 else None,
        "errors": _errors(code, everything),
        **_latency_figures(latency, answered, everything),
        "pids": len({int(p) for p in pid[answered] if p}),
        "idle_closes": data.get("idle_closes", 0),
        "reloads": len(reloads),
        "failed_reloads": sum(1 for r in reloads if not r["ok"]),
        "after_reload": {"requests": int(np.count_nonzero(after)), "errors": _errors(code, after),
                         **_latency_figures(latency, answered, after)},
        "steady": {"requests": int(np.count_nonzero(steady)), "errors": _errors(code, steady),
                   **_latency_figures(latency, answered, steady)},
        "new_pid_answers_after_ms": {"median": round(statistics.median(switch), 3) if switch else None,
                                     "max": max(switch) if switch else None},
        "p99_after_vs_steady_interval": ratio_interval(latency[answered], start[answered], after[answered],
                                                       [r["requested"] for r in reloads]),
        "per_reload": per_reload,
    }


def ratio_interval(latency, start, after, reload_times: list[float], resamples: int = 400,
                   seed: int = 1) -> list[float] | None:
    """A 95 % interval of (p99 within `window` after a reload ÷ p99 outside those windows) over the reloads
    of one run: a bootstrap of whole reload cycles (a reload's window and the steady stretch up to the
    next reload, drawn with replacement). One reload's second differs from the next's by far more than
    its requests differ among themselves (the same code saw 15 and 600 slow requests in two reloads of a
    run), so the figure alone says little about how near it is to a target; None with fewer than 3 reloads.
    `latency`, `start`: the answered requests' arrays; `after`: which of them were in a reload's window (as
    `summarize_probe` decides)."""
    times = sorted(reload_times)
    if len(times) < 3:
        return None
    boundaries = np.asarray(times[1:], dtype=float)
    cycle = np.searchsorted(boundaries, start, side="right")  # requests before the first reload: cycle 0's
    after_by_cycle = [latency[after & (cycle == i)] for i in range(len(times))]
    steady_by_cycle = [latency[~after & (cycle == i)] for i in range(len(times))]
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(times), len(times))
        after_p99 = np.concatenate([after_by_cycle[i] for i in chosen])
        steady_p99 = np.concatenate([steady_by_cycle[i] for i in chosen])
        if after_p99.size and steady_p99.size:
            ratios.append(np.percentile(after_p99, 99) / np.percentile(steady_p99, 99))
    if not ratios:
        return None
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [round(float(low), 3), round(float(high), 3)]


def median_of_runs(runs: list[dict]) -> dict:
    """The median of each wrk figure over several runs."""
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None
    return {
        "req_s": round(med("req_s"), 1) if med("req_s") is not None else None,
        "p50_ms": ms(med("p50")),
        "p99_ms": ms(med("p99")),
        "max_ms": ms(med("max")),
        "cpu_us_per_request": round(med("cpu_us_per_request"), 2) if med("cpu_us_per_request") else None,
        "server_cpus": round(med("server_cpus"), 2) if med("server_cpus") is not None else None,
        "wrk_cpus": round(med("wrk_cpus"), 2) if med("wrk_cpus") is not None else None,
        "runs_req_s": [round(r["req_s"]) for r in runs],
        "runs_p99_ms": [ms(r["p99"]) for r in runs],
        "errors": sum(r["socket_errors"] + r["non_2xx_3xx"] for r in runs),
    }
