"""The site at a glance: devices online/offline, open alerts, cloud link, gateway health.

One model (:class:`Overview`) feeds both the overview page (rendered on the server) and
``GET /api/v1/overview`` (which the page's script polls to stay current), so the two can
never disagree. Figures are gathered from the rooms that own them (registry, rules, the
sync status row, the health snapshot); nothing here keeps state of its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel

import gateway
from gateway.web.access import requires
from gateway.web.bodies import json_ok
from gateway.web.keys import GATEWAY
from gateway.web.openapi import described

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

LATEST_ALERTS = 5


class DeviceCounts(BaseModel):
    total: int = 0
    online: int = 0
    offline: int = 0
    # heard of but not adopted yet (waiting for a technician), and deliberately ignored
    discovered: int = 0
    ignored: int = 0


class AlertBrief(BaseModel):
    id: int
    device: str | None
    severity: str
    state: str
    message: str
    raised_at: float


class AlertSummary(BaseModel):
    available: bool
    open: int = 0
    critical: int = 0
    warning: int = 0
    latest: list[AlertBrief] = []


class SyncSummary(BaseModel):
    enabled: bool
    # "off" (not configured), "down" (sync process not reporting), "disconnected", "connected"
    state: Literal["off", "down", "disconnected", "connected", "unknown"]
    backlog: int | None = None
    backlog_oldest_age_s: float | None = None
    connected_since: float | None = None
    disconnected_since: float | None = None
    last_error: str | None = None


class HealthSummary(BaseModel):
    status: Literal["ok", "degraded"]
    problems: list[str]
    version: str
    uptime_s: float
    clock_synchronised: bool
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    process_rss_mb: float | None = None
    cpu_temperature_c: float | None = None
    load_1m: float | None = None


class Overview(BaseModel):
    gateway: str
    name: str
    ts: float
    nodes: DeviceCounts
    ble: DeviceCounts
    alerts: AlertSummary
    sync: SyncSummary
    health: HealthSummary


def _memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of the machine, from /proc/meminfo (Linux only)."""
    total = avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


async def _counts(gw: Any) -> tuple[DeviceCounts, DeviceCounts]:
    nodes, ble = DeviceCounts(), DeviceCounts()
    for dev in await gw.registry.list_devices():
        c = ble if dev.kind == "ble" else nodes
        c.total += 1
        state = dev.state.value
        if state == "ignored":
            c.ignored += 1
            continue
        if state == "discovered":
            c.discovered += 1
        if dev.online:
            c.online += 1
        else:
            c.offline += 1
    return nodes, ble


async def _alerts(gw: Any) -> AlertSummary:
    rules = getattr(gw, "rules", None)
    if rules is None:
        return AlertSummary(available=False)
    counts = await rules.alerts.counts()
    latest = await rules.alerts.query(state="open", limit=LATEST_ALERTS)
    return AlertSummary(
        available=True,
        open=sum(counts.values()),
        critical=counts.get("critical", 0),
        warning=counts.get("warning", 0),
        latest=[AlertBrief(id=a.id, device=a.device, severity=a.severity, state=a.state, message=a.message,
                           raised_at=a.raised_at) for a in latest],
    )


async def _sync(gw: Any) -> SyncSummary:
    cloud = gw.settings.cloud
    if not cloud.enabled:
        return SyncSummary(enabled=False, state="off")
    from cloud_sync.status import read_sync_view

    try:
        # the same view GET /api/v1/sync answers with, read off the event loop
        v = await asyncio.to_thread(read_sync_view, gw.settings.db_path, enabled=True,
                                    status_interval_s=cloud.status_interval_s)
    except Exception as exc:  # the overview must render even if the sync tables are not there yet
        log.warning("web.overview_sync_failed", error=f"{type(exc).__name__}: {exc}")
        return SyncSummary(enabled=True, state="unknown")
    state = "connected" if v["connected"] else ("disconnected" if v["process"]["running"] else "down")
    return SyncSummary(enabled=True, state=state, backlog=v["backlog"]["count"],
                       backlog_oldest_age_s=v["backlog"]["oldest_age_s"], connected_since=v["connected_since"],
                       disconnected_since=v["disconnected_since"], last_error=v["last_error"])


def _health(gw: Any) -> HealthSummary:
    snap = gw.health.snapshot()
    comps: dict[str, Any] = snap.get("components", {})
    problems = sorted(name for name, c in comps.items() if isinstance(c, dict) and not c.get("ok", True))
    disk = comps.get("disk", {})
    clock = comps.get("clock", {})
    system = snap.get("system", {})
    total, avail = _memory()
    return HealthSummary(
        status="degraded" if problems else "ok",
        problems=problems,
        version=gateway.__version__,
        uptime_s=float(snap.get("uptime_s", 0.0)),
        clock_synchronised=bool(clock.get("synchronised", False)),
        disk_free_bytes=disk.get("free_bytes"),
        disk_total_bytes=disk.get("total_bytes"),
        memory_total_bytes=total,
        memory_available_bytes=avail,
        process_rss_mb=system.get("rss_mb"),
        cpu_temperature_c=system.get("cpu_temperature_c"),
        load_1m=system.get("load_1m"),
    )


async def gather(gw: Any) -> Overview:
    nodes, ble = await _counts(gw)
    return Overview(gateway=gw.settings.gateway.id, name=gw.settings.gateway.name, ts=time.time(), nodes=nodes,
                    ble=ble, alerts=await _alerts(gw), sync=await _sync(gw), health=_health(gw))


@routes.get("/api/v1/overview")
@requires("devices.read")
@described("The site at a glance: devices, alerts, cloud link, gateway health", response=Overview)
async def overview(request: web.Request) -> web.Response:
    return json_ok(await gather(request.app[GATEWAY]))
