"""``GET /api/v1/openapi.json``: the API described from the route table (``gateway.web.openapi``)."""

from __future__ import annotations

from aiohttp import web

from gateway.web.access import public
from gateway.web.bodies import dumps
from gateway.web.openapi import build, described

routes = web.RouteTableDef()

@routes.get("/api/v1/openapi.json")
@public()
@described("This document (OpenAPI 3.1), no login: it describes the API, not the site")
async def openapi(request: web.Request) -> web.Response:
    # built on each request (tens of milliseconds): it is read by tools now and then, not by the UI
    resp = web.Response(text=dumps(build(request.app)), content_type="application/json")
    resp.enable_compression()
    return resp
