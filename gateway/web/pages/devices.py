"""``/devices`` (search, filter, live) and ``/devices/{id}`` (live values, charts, events,
commands, rename/locate, adopt/ignore, remove).

Filtering is done here from the query string, so the list works and can be bookmarked
without JavaScript; ``static/js/devices.js`` then filters as one types and keeps rows
current over the live feed.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.models import Device
from gateway.web.access import requires
from gateway.web.bodies import parse_query
from gateway.web.errors import ApiError
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page
from gateway.web.views.devices import find_device

routes = web.RouteTableDef()

RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
# shown in the list's "values" column before the rest is left to the device page
LIST_VALUES = 3


class ListFilter(BaseModel):
    model_config = ConfigDict(extra="ignore")

    q: str = Field(default="", max_length=128)
    status: Literal["", "online", "offline"] = ""
    kind: Literal["", "node", "ble"] = ""
    state: Literal["", "discovered", "adopted", "ignored"] = ""


def matches(dev: Device, f: ListFilter) -> bool:
    if f.status and dev.online != (f.status == "online"):
        return False
    if f.kind and (dev.kind == "ble") != (f.kind == "ble"):
        return False
    if f.state and dev.state.value != f.state:
        return False
    if f.q:
        hay = " ".join(x for x in (dev.id, dev.name or "", dev.location or "", dev.firmware or "") if x).lower()
        return all(word in hay for word in f.q.lower().split())
    return True


def row(gw: Any, dev: Device) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = gw.registry.latest(dev.id)
    shown = [m for m in sorted(latest) if m not in ("battery", "rssi")][:LIST_VALUES]
    return {
        "dev": dev,
        "values": [(m, latest[m]) for m in shown],
        "more": max(0, len(latest) - len(shown) - sum(1 for m in ("battery", "rssi") if m in latest)),
        "battery": latest.get("battery"),
        "rssi": latest.get("rssi"),
    }


@routes.get("/devices")
@requires("devices.read", page=True)
async def devices_page(request: web.Request) -> web.Response:
    try:
        f = parse_query(request, ListFilter)
    except ApiError:  # a mangled bookmark shows the whole list rather than an error
        f = ListFilter()
    gw = request.app[GATEWAY]
    devices = await gw.registry.list_devices()
    rows = [row(gw, d) for d in devices]
    for r in rows:
        r["hidden"] = not matches(r["dev"], f)
    return render_page(request, "devices.html", title="Devices", current="/devices", rows=rows, f=f,
                       shown=sum(1 for r in rows if not r["hidden"]))


# what a node reports about itself rather than about the site: charted only when asked for
HOUSEKEEPING = frozenset({"battery", "rssi", "uptime", "heap", "relay", "voltage_battery"})


def default_metric(metrics: list[str]) -> str | None:
    """The chart a technician most likely opened the page for: a measurement, not housekeeping."""
    for m in metrics:
        if m not in HOUSEKEEPING:
            return m
    return metrics[0] if metrics else None


class DeviceView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metric: str | None = Field(default=None, max_length=64)
    range: Literal["1h", "24h", "7d", "custom"] = "24h"
    since: str | None = Field(default=None, max_length=40)
    until: str | None = Field(default=None, max_length=40)


@routes.get("/devices/{device_id}")
@requires("devices.read", page=True)
async def device_page(request: web.Request) -> web.Response:
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    try:
        view = parse_query(request, DeviceView)
    except ApiError:  # an unknown range or metric falls back to the defaults
        view = DeviceView()
    metrics = await gw.readings.metrics_of(dev.id)
    metric = view.metric if view.metric in metrics else default_metric(metrics)
    latest = gw.registry.latest(dev.id)
    status = dev.attributes.get("status") if isinstance(dev.attributes.get("status"), dict) else {}
    events = await gw.events.query(device=dev.id, limit=30)
    commands = await gw.commander.list_for(dev.id, limit=10)
    attributes = {k: v for k, v in dev.attributes.items() if k != "status" and not isinstance(v, dict | list)}
    return render_page(
        request, "device.html", title=dev.name or dev.id, current="/devices", dev=dev,
        latest=[(m, latest[m]) for m in sorted(latest)], metrics=metrics, metric=metric, view=view,
        ranges=list(RANGES), relay=status.get("relay") if status else None,
        events=events, commands=commands, attributes=attributes, now=time.time(),
        credentials=gw.credentials.has(dev.id),
    )
