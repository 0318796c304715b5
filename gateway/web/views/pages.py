"""The HTML pages of this stage: the device list with live values.

The page is rendered complete on the server (it is honest without JavaScript: the
values are those of the moment it was loaded) and ``static/live.js`` then keeps it
current over the live feed. The full technician UI (issue 5) grows from here.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.auth.principal import Principal
from gateway.models import Device
from gateway.web.access import principal_of, requires
from gateway.web.keys import GATEWAY
from gateway.web.render import Safe, join, page, render, tag

routes = web.RouteTableDef()


def format_value(value: float) -> str:
    # the same rule as live.js, so a value does not change look when it updates
    text = f"{round(value, 3):.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _time(ts: float | None, tz: ZoneInfo) -> Safe:
    if ts is None:
        return tag("time", "never")
    dt = datetime.fromtimestamp(ts, tz)
    shown = dt.strftime("%H:%M:%S") if time.time() - ts < 86400 else dt.strftime("%Y-%m-%d %H:%M")
    return tag("time", shown, datetime=dt.isoformat(timespec="seconds"), data_ts=f"{ts:.3f}")


def _values(latest: dict[str, dict[str, Any]]) -> Safe:
    items = []
    for metric in sorted(latest):
        v = latest[metric]
        value = v.get("value")
        shown = format_value(float(value)) if isinstance(value, int | float) else str(value)
        dd = Safe(tag("span", shown, class_="v") + " " + tag("span", v.get("unit") or "", class_="u"))
        items.append(tag("div", Safe(tag("dt", metric) + tag("dd", dd)), data_metric=metric))
    return join(items)


def device_card(dev: Device, latest: dict[str, dict[str, Any]], tz: ZoneInfo) -> Safe:
    status = "online" if dev.online else "offline"
    head = Safe(
        tag("h2", dev.name or dev.id) + tag("span", status, class_=f"badge {status}", data_role="status")
    )
    meta = join(
        [
            tag("span", dev.id, class_="id"),
            " · ",
            tag("span", dev.state.value, class_="state", data_role="state"),
            " · last seen ",
            _time(dev.last_seen, tz),
            *([" · ", tag("span", dev.location, class_="loc")] if dev.location else []),
        ]
    )
    body = join(
        [
            tag("div", head, class_="head"),
            tag("p", meta, class_="meta"),
            tag("dl", _values(latest), class_="values"),
        ]
    )
    return tag("li", body, class_="device", data_device=dev.id, data_online=str(dev.online).lower())


def user_bar(principal: Principal) -> Safe:
    return render(
        "user_bar.html", username=principal.username, role=principal.role.value, csrf=principal.csrf or ""
    )


@routes.get("/")
@requires("devices.read", page=True)
async def index(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    tz = ZoneInfo(gw.settings.gateway.timezone)
    devices = await gw.registry.list_devices()
    cards = join(device_card(d, gw.registry.latest(d.id), tz) for d in devices)
    return page(
        "index.html",
        title="Devices",
        gateway_name=gw.settings.gateway.name,
        header=user_bar(principal_of(request)),
        count=len(devices),
        cards=cards,
        empty_hidden=Safe(" hidden") if devices else "",
    )
