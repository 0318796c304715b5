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
    ids = [r[0] for r in await gw.db.fetchall("SELECT DISTINCT device_id FROM series ORDER BY device_id")]
    metrics = [r[0] for r in await gw.db.fetchall("SELECT DISTINCT metric FROM series ORDER BY metric")]
    return render_page(request, "export.html", title="Export", current="/export",
                       devices=[(i, names.get(i)) for i in ids], metrics=metrics)
