"""``/firmware``: firmware images (upload, block), rollout campaigns (start, pause,
resume, abort, progress) and USB flashing of a node on the gateway's serial ports."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.web.access import principal_of, requires
from gateway.web.keys import GATEWAY
from gateway.web.permissions import authorise
from gateway.web.render import render_page

routes = web.RouteTableDef()


@routes.get("/firmware")
@requires("ota.read", page=True)
async def firmware_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ota = gw.ota
    firmware = await ota.registry.list()
    campaigns = await ota.campaigns.list()
    ports: list[Any] = []
    if authorise(principal_of(request), "ota.flash"):
        from gateway.ota.flashing import list_ports

        try:
            ports = await asyncio.to_thread(list_ports)
        except Exception:  # no serial support on this machine: the form says so
            ports = []
    devices = await gw.registry.list_devices()
    return render_page(request, "firmware.html", title="Firmware", current="/firmware", firmware=firmware,
                       campaigns=campaigns, ports=ports, device_ids=[d.id for d in devices if d.kind != "ble"])
