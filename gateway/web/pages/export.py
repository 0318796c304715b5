"""``/export``: choose devices, metrics and a time range; the download is
``GET /api/v1/export.csv`` (streamed)."""

from __future__ import annotations

from aiohttp import web

from gateway.web.access import requires
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page

routes = web.RouteTableDef()


@routes.get("/export")
@requires("devices.read", page=True)
async def export_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    names = {d.id: d.name for d in await gw.registry.list_devices()}
    # every device with stored data, removed ones too: their readings stay and can be exported
    ids = await gw.readings.devices_with_data()
    metrics = await gw.readings.all_metrics()
    return render_page(request, "export.html", title="Export", current="/export",
                       devices=[(i, names.get(i)) for i in ids], metrics=metrics)
