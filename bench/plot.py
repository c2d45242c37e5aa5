"""The picture: request latency over time during reloads, one colour per serving pid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.analyze import AFTER_RELOAD, arrays  # noqa: E402

PALETTE = plt.get_cmap("tab10").colors


def _panel(axis, title: str, data: dict, reloads: list[dict], summary: dict) -> None:
    start, latency, code, pid = arrays(data)
    began = data["began"]
    t = start - began
    answered = code > 0
    latency_ms = latency * 1000
    order = []
    for p in pid[answered]:
        if p not in order:
            order.append(p)
    colour_of = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(order)}
    for p in order:
        mask = answered & (pid == p)
        axis.scatter(t[mask], latency_ms[mask], s=1.5, color=colour_of[p], alpha=0.5, linewidths=0, rasterized=True)
    for i, reload in enumerate(reloads):
        at = reload["requested"] - began
        axis.axvspan(at, at + AFTER_RELOAD, color="0.85", alpha=0.5, linewidth=0, zorder=0)
        axis.axvline(at, color="black", linestyle="--", linewidth=0.8, label="reload requested" if i == 0 else None)
    failed = ~answered | (answered & ((code < 200) | (code >= 300)))
    top = max(float(latency_ms[answered].max()) if answered.any() else 1.0, 1.0) * 1.5
    if failed.any():
        axis.scatter(t[failed], np.full(int(failed.sum()), top), marker="x", s=14, color="red",
                     label=f"failed request ({int(failed.sum())})", zorder=5)
    axis.set_yscale("log")
    axis.set_xlabel("seconds into the run")
    errors = summary["errors"]["total"]
    after = summary["after_reload"]
    axis.set_title(f"{title}\n{summary['requests']:,} requests, {errors} failed · "
                   f"p99 {summary['p99_ms']:.1f} ms, p99 ≤1 s after reloads {after['p99_ms'] or 0:.1f} ms · "
                   f"{len(order)} pids", fontsize=9)
    axis.grid(True, which="both", axis="y", linewidth=0.3, alpha=0.5)
    axis.legend(loc="upper left", fontsize=8)


def draw(path: Path, panels: list[tuple[str, dict, list[dict], dict]], note: str = "") -> None:
    """One panel per (title, probe data, reloads, summary), side by side, sharing the latency axis."""
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), sharey=True, squeeze=False)
    for axis, (title, data, reloads, summary) in zip(axes[0], panels):
        _panel(axis, title, data, reloads, summary)
    axes[0][0].set_ylabel("request latency (ms, log scale)")
    figure.suptitle("Latency of every request under a 50-connection keep-alive load while reloading"
                    " (dashed: reload requested; grey: the second after; one colour per serving pid)", fontsize=10)
    if note:
        figure.text(0.5, 0.005, note, ha="center", fontsize=8, color="0.3")
    figure.tight_layout(rect=(0, 0.03, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)
