"""``GET /api/v1/openapi.json``: the API described from the route table (``gateway.web.openapi``)."""

from __future__ import annotations

from aiohttp import web

from gateway.web.access import public
from gateway.web.bodies import dumps
from gateway.web.openapi import build, described

routes = web.RouteTableDef()

_CACHE = web.AppKey("siteward_openapi", str)


@routes.get("/api/v1/openapi.json")
@public()
@described("This document (OpenAPI 3.1), no login: it describes the API, not the site")
async def openapi(request: web.Request) -> web.Response:
    app = request.app
    if _CACHE not in app:
        # routes are frozen once the app runs: build once
        app[_CACHE] = dumps(build(app))
    resp = web.Response(text=app[_CACHE], content_type="application/json")
    resp.enable_compression()
    return resp
