"""``/``: the site at a glance (the same :class:`~gateway.web.views.overview.Overview` the API serves)."""

from __future__ import annotations

from aiohttp import web

from gateway.web.access import requires
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page
from gateway.web.views.overview import gather

routes = web.RouteTableDef()


@routes.get("/")
@requires("devices.read", page=True)
async def overview_page(request: web.Request) -> web.Response:
    data = await gather(request.app[GATEWAY])
    return render_page(request, "overview.html", title="Overview", current="/", o=data)
