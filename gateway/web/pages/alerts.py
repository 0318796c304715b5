"""``/alerts``: open alerts (acknowledge), recent history, the alert rules and schedules."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.web.access import requires
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page

routes = web.RouteTableDef()

HISTORY = 50


@routes.get("/alerts")
@requires("rules.read", page=True)
async def alerts_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    rules = gw.rules
    open_alerts = await rules.alerts.query(state="open", limit=200)
    history = await rules.alerts.query(state="cleared", limit=HISTORY)
    rule_list: list[dict[str, Any]] = []
    schedule_list: list[dict[str, Any]] = []
    # the same JSON the API answers with, so the page shows what a script would see
    for handler, key, out in (("list_rules", "rules", rule_list), ("list_schedules", "schedules", schedule_list)):
        out.extend(await _api_list(request, handler, key))
    devices = await gw.registry.list_devices()
    return render_page(request, "alerts.html", title="Alerts", current="/alerts", open_alerts=open_alerts,
                       history=history, rules=rule_list, schedules=schedule_list,
                       device_ids=[d.id for d in devices])


async def _api_list(request: web.Request, handler: str, key: str) -> list[dict[str, Any]]:
    import json

    from gateway.web.views import rules as rules_view

    resp = await getattr(rules_view, handler)(request)
    body = json.loads(resp.text or "{}")
    items = body.get(key, [])
    return items if isinstance(items, list) else []
