"""``/audit``: who changed what and when, filtered by a plain GET form (no script needed),
paged with ``before_id`` like the API."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from gateway.web.access import requires
from gateway.web.keys import GATEWAY
from gateway.web.render import render_page
from gateway.web.views.audit import AuditQuery

routes = web.RouteTableDef()

PAGE = 100


@routes.get("/audit")
@requires("audit.read", page=True)
async def audit_page(request: web.Request) -> web.Response:
    raw = {k: v for k, v in request.query.items() if v.strip()}
    raw.setdefault("limit", str(PAGE))
    error = None
    try:
        q = AuditQuery.model_validate(raw)
    except ValidationError as exc:
        error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        q = AuditQuery(limit=PAGE)
    entries = await request.app[GATEWAY].audit.query(actor=q.actor, action=q.action, target=q.target, since=q.since,
                                                     until=q.until, before_id=q.before_id, limit=q.limit)
    older = None
    if len(entries) == q.limit:
        older = {**{k: v for k, v in raw.items() if k not in ("before_id", "limit")}, "before_id": entries[-1].id}
    return render_page(request, "audit.html", title="Audit log", current="/audit", entries=entries,
                       filters={k: request.query.get(k, "") for k in ("actor", "action", "target", "since", "until")},
                       error=error, older=older)
