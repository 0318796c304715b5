"""Scanning that silently stops is the classic failure of BLE gateways (a wedged
controller, a discovery session BlueZ forgot). The watchdog notices and escalates.

While at least one sensor is adopted, ``silence_s`` without a single advertisement
(from anyone: a site with adopted sensors is never that quiet) triggers, one stage per
further ``silence_s`` of silence:

1. restart the scan (stop and start discovery or the advertisement monitor);
2. power-cycle the adapter over D-Bus (Powered off, on) and scan again;
3. report BLE unhealthy in /healthz and keep power-cycling now and then, so that
   systemd (or whoever watches /healthz) can act, and a late recovery is still noticed.

Any advertisement resets it to stage 0.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from gateway.ble.manager import BleManager
    from gateway.ble.scanner import Scanner
    from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

STAGES = ("ok", "restart_scan", "power_cycle", "unhealthy")


class Watchdog:
    def __init__(self, manager: BleManager, scanner: Scanner, metrics: Metrics, *, silence_s: float,
                 check_interval_s: float) -> None:
        self._manager = manager
        self._scanner = scanner
        self._metrics = metrics
        self.silence_s = silence_s
        self.check_interval_s = check_interval_s
        self.stage = 0
        self.escalations = 0
        self.last_error: str | None = None
        self._started = time.monotonic()
        self._acted_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.stage < 3

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            await self.check(time.monotonic())

    async def check(self, now: float) -> None:
        if self._manager.adopted_count() == 0 or self._scanner.state == "adapter_missing":
            # nothing expected to be heard, or a missing adapter, which the scanner reports itself
            self._reset()
            return
        last = self._manager.last_advert_mono
        if last is None:
            last = self._started
        if now - last < self.silence_s:
            if self.stage:
                log.info("ble.watchdog_recovered", after_stage=STAGES[self.stage])
            self._reset()
            return
        if self._acted_at is not None and now - self._acted_at < self.silence_s:
            return  # the last action gets its own silence_s to show results
        self._acted_at = now
        self.stage = min(self.stage + 1, 3)
        self.escalations += 1
        name = STAGES[self.stage]
        self._metrics.ble_watchdog_escalations.labels(stage=name).inc()
        self._metrics.ble_watchdog_stage.set(self.stage)
        log.error("ble.watchdog_escalation", stage=name, silent_s=round(now - last, 1),
                  adopted=self._manager.adopted_count())
        try:
            if self.stage == 1:
                await self._scanner.restart()
            else:
                await self._scanner.power_cycle()
            self.last_error = None
        except Exception as exc:  # keep escalating: a failed remedy is still no advertisement
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            log.error("ble.watchdog_action_failed", stage=name, error=self.last_error)

    def _reset(self) -> None:
        if self.stage:
            self._metrics.ble_watchdog_stage.set(0)
        self.stage = 0
        self._acted_at = None
