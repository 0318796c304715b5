"""BLE, composed: store, manager, decoders and (when there is a radio) scanner and watchdog.

``Gateway`` creates one :class:`BleService` and calls :meth:`start`; every loop it runs is
a supervised task. With no adapter (or no BlueZ) it reports "unavailable" in /healthz and
the rest of the gateway runs as usual; the development run may then feed it simulated
beacons (:meth:`simulate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from gateway.ble.manager import BleManager
from gateway.ble.shaping import RateShaper
from gateway.ble.store import BleStore

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.ble.scanner import Scanner
    from gateway.ble.watchdog import Watchdog

log = structlog.get_logger(__name__)


class BleService:
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        cfg = self.cfg = gw.settings.ble
        self.store = BleStore(gw.db, gw.settings.data_dir)
        self.manager = BleManager(
            ingest=gw.ingest, registry=gw.registry, events=gw.events, store=self.store, metrics=gw.metrics,
            shaper=RateShaper(cfg.store_interval_s, cfg.thresholds, cfg.relative_threshold),
            nearby_max=cfg.nearby_max, nearby_expiry_s=cfg.nearby_expiry_s, auto_adopt=cfg.auto_adopt)
        self.scanner: Scanner | None = None
        self.watchdog: Watchdog | None = None
        # disabled | unavailable | radio | simulated | failed
        self.state = "disabled"
        self.reason: str | None = None

    async def start(self) -> None:
        cfg = self.cfg
        self._gw.health.register("ble", self.health)
        if cfg.enabled == "off":
            self.reason = "ble.enabled = off"
            return
        from gateway.ble.scanner import probe

        await self.manager.load()
        sup = self._gw.supervisor
        sup.start("ble.ingest", self.manager.run)
        sup.start("ble.housekeeping", self.manager.run_housekeeping)
        self._gw.metrics.ble_seconds_since_advert.set_function(
            lambda: -1.0 if (s := self.manager.seconds_since_advert()) is None else s)
        self._gw.on_stop(self.manager.flush_counters)
        present, reason = await probe(cfg.adapter)
        if not present:
            self.state, self.reason = "unavailable", reason
            log.warning("ble.unavailable", reason=reason, note="the gateway runs without BLE")
            return
        from gateway.ble import decoders
        from gateway.ble.scanner import Scanner
        from gateway.ble.watchdog import Watchdog

        await decoders.prepare()

        self.scanner = Scanner(self.manager.handle, adapter=cfg.adapter, mode=cfg.scan_mode,
                               poll_interval_s=cfg.adapter_poll_s)
        self.watchdog = Watchdog(self.manager, self.scanner, self._gw.metrics, silence_s=cfg.watchdog_silence_s,
                                 check_interval_s=cfg.watchdog_check_s)
        sup.start("ble.scanner", self.scanner.run)
        sup.start("ble.watchdog", self.watchdog.run)
        self.state, self.reason = "radio", None

    def simulate(self, count: int, interval_s: float) -> None:
        """Development run without a radio: simulated beacons through the same decoders."""
        if self.state != "unavailable" or count <= 0:
            return
        from gateway.ble.simulator import BeaconSimulator

        sim = BeaconSimulator(count, self.manager.handle, interval_s=interval_s)

        async def run() -> None:
            from gateway.ble import decoders

            await decoders.prepare()
            await sim.run()

        self._gw.supervisor.start("ble.simulator", run)
        self.state = "simulated"
        log.info("ble.simulating", beacons=count)

    def health(self) -> dict[str, Any]:
        m = self.manager
        since = m.seconds_since_advert()
        out: dict[str, Any] = {"state": self.state, "reason": self.reason, "nearby": len(m),
                               "adopted": m.adopted_count(),
                               "seconds_since_advert": None if since is None else round(since, 1),
                               "adverts": dict(m.counts)}
        ok = self.state != "failed"
        if self.state == "unavailable":
            ok = self.cfg.enabled != "on"  # an adapter was promised; its absence is a fault
        if self.scanner is not None:
            out.update(adapter=self.scanner.adapter, scan_mode=self.scanner.mode_in_use,
                       scanner=self.scanner.state, last_error=self.scanner.last_error)
            ok = self.scanner.state not in ("adapter_missing", "error")
        if self.watchdog is not None:
            out["watchdog_stage"] = self.watchdog.stage
            ok = ok and self.watchdog.healthy
        out["ok"] = ok
        return out
