"""What a main tells systemd between events: STATUS= at most once a second and only on change (so
`systemctl status` shows live traffic), and WATCHDOG=1 from the event loop (a stuck loop stops the
pings, and systemd restarts the service)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

STATUS_INTERVAL = 1.0


class StatusReporter:
    """Sends the state machine's notifications, and keeps STATUS= current while `status()` has one."""

    def __init__(self, notifier: Any, status: Callable[[], str | None], watchdog: float | None = None):
        self.notifier = notifier
        self.status = status
        self.watchdog = watchdog
        self.last_status = ""
        self._tasks: list[asyncio.Task] = []

    def send(self, **fields: object) -> None:
        if "STATUS" in fields:
            self.last_status = str(fields["STATUS"])
        self.notifier.send(**fields)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._keep_status_current()))
        if self.watchdog:
            self._tasks.append(loop.create_task(self._ping_watchdog(self.watchdog)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    async def _keep_status_current(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            status = self.status()
            if status is not None and status != self.last_status:
                self.send(STATUS=status)

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval)
