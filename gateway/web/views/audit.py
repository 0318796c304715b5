"""The audit trail, for admins and technicians."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.web.access import requires
from gateway.web.bodies import json_ok, paged, parse_query
from gateway.web.keys import GATEWAY
from gateway.web.timeparams import Timestamp

routes = web.RouteTableDef()


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str | None = Field(default=None, max_length=256)
    # exact, or a family with a trailing ".*" (user.*)
    action: str | None = Field(default=None, max_length=64)
    target: str | None = Field(default=None, max_length=256)
    since: Timestamp | None = None
    until: Timestamp | None = None
    before_id: int | None = Field(default=None, ge=1)
    limit: int = Field(default=200, ge=1, le=1000)


@routes.get("/api/v1/audit")
@requires("audit.read")
async def audit_trail(request: web.Request) -> web.Response:
    q = parse_query(request, AuditQuery)
    entries = await request.app[GATEWAY].audit.query(
        actor=q.actor,
        action=q.action,
        since=q.since,
        limit=q.limit,
        target=q.target,
        until=q.until,
        before_id=q.before_id,
    )
    return json_ok(paged("entries", entries, q.limit))
