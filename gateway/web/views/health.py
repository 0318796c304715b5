"""Health and metrics: for monitoring.

``/healthz`` needs no login. ``/metrics`` is open by default because a Prometheus scraper
on the site LAN has no session and the figures are counters and sizes, not readings;
``[web] metrics_public = false`` closes it to anyone without a bearer API token.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

import gateway
from gateway.web.access import public, requires
from gateway.web.bodies import json_ok
from gateway.web.keys import GATEWAY, STATE

routes = web.RouteTableDef()


@routes.get("/healthz")
@public(during_setup=True)
async def healthz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    snapshot: Any = gw.health.snapshot()
    if inspect.isawaitable(snapshot):
        snapshot = await snapshot
    # Health.snapshot() gives {"status", "gateway", "version", "uptime_s", "system", "components"}
    raw = snapshot.get("components", {})
    components = {name: (v if isinstance(v, dict) else {"ok": bool(v)}) for name, v in raw.items()}
    ok = all(bool(c.get("ok", False)) for c in components.values())
    body = {
        **snapshot,
        "status": "ok" if ok else "degraded",
        "gateway": gw.settings.gateway.id,
        "version": gateway.__version__,
        # not a fault: the gateway runs and collects data, it only waits for its first admin
        "setup_required": await request.app[STATE].setup_required(),
        "components": components,
    }
    return json_ok(body, status=200 if ok else 503)


@routes.get("/metrics")
@requires("metrics.read", public_if="metrics_public")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
