"""One snapshot of every component's health, for /healthz and the overview page."""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import gateway

if TYPE_CHECKING:
    from gateway.app import Gateway

DISK_LOW_FRACTION = 0.05


def _cpu_temperature() -> float | None:
    try:
        with open("/sys/class/thermal/thermal_zone0/temp") as f:
            return int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Health:
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self.started_at = time.time()
        self._extra: dict[str, Any] = {}

    def register(self, name: str, probe: Any) -> None:
        """Later rooms (BLE, sync) add a zero-argument callable returning {"ok": bool, ...}."""
        self._extra[name] = probe

    def snapshot(self) -> dict[str, Any]:
        gw = self._gw
        comps: dict[str, dict[str, Any]] = {}
        err = gw.db.last_commit_error
        comps["store"] = {"ok": err is None, "last_error": err, "queue_depth": gw.db.queue_depth(),
                          "db_bytes": gw.db.size_bytes(), "commits": gw.db.commits,
                          "quota_refusing": gw.maintenance.refusing,
                          "dropped_by_quota": gw.maintenance.dropped_total}
        if gw.broker is not None:
            comps["broker"] = {"ok": True, **gw.broker.stats()}
        comps["clock"] = {"ok": True, "synchronised": gw.clock_monitor.synced,
                          "last_step_s": gw.clock_monitor.last_step_s}
        du = shutil.disk_usage(gw.settings.data_dir)
        comps["disk"] = {"ok": du.free / du.total > DISK_LOW_FRACTION, "free_bytes": du.free,
                         "total_bytes": du.total}
        for name, st in gw.supervisor.health().items():
            comps[f"task:{name}"] = st
        for name, probe in self._extra.items():
            try:
                comps[name] = probe()
            except Exception as exc:  # a broken probe must not break /healthz
                comps[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        load = os.getloadavg()
        return {
            "status": "ok" if all(c.get("ok", True) for c in comps.values()) else "degraded",
            "gateway": gw.settings.gateway.id,
            "version": gateway.__version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "system": {"cpu_temperature_c": _cpu_temperature(), "rss_mb": _rss_mb(),
                       "load_1m": load[0]},
            "components": comps,
        }
