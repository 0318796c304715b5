"""``/ble``: BLE sensors heard nearby; adopt, ignore, enter a bindkey (``static/js/ble.js``
refreshes the list every few seconds: adverts are not on the live feed)."""

from __future__ import annotations

from aiohttp import web

from gateway.web.access import requires
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page

routes = web.RouteTableDef()


@routes.get("/ble")
@requires("devices.read", page=True)
async def ble_page(request: web.Request) -> web.Response:
    ble = getattr(request.app[GATEWAY], "ble", None)
    sensors = ble.manager.nearby() if ble is not None else []
    return render_page(request, "ble.html", title="Nearby BLE sensors", current="/ble",
                       state=getattr(ble, "state", "unavailable"), reason=getattr(ble, "reason", None),
                       sensors=sensors)
