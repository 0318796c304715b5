"""API tokens: technicians and admins make their own; admins also for others
(e.g. a read-only token for a viewer account used by a dashboard script)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth.principal import Principal
from gateway.auth.tokens import TokenInfo
from gateway.web.access import principal_of, requires
from gateway.web.bodies import json_ok, parse_body
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import AUTH
from gateway.web.permissions import authorise

routes = web.RouteTableDef()


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    # whose token; default: the caller. Someone else's needs users.admin.
    username: str | None = Field(default=None, max_length=256)


def _may_manage(principal: Principal, owner: str) -> bool:
    return owner == principal.username or authorise(principal, "users.admin")


@routes.get("/api/v1/tokens")
@requires("tokens.own")
async def list_tokens(request: web.Request) -> web.Response:
    principal = principal_of(request)
    wanted = request.query.get("username")
    everyone = request.query.get("all") in ("1", "true")
    if (everyone or (wanted and wanted != principal.username)) and not authorise(principal, "users.admin"):
        raise ApiError(403, "forbidden", "only an admin may list other users' tokens")
    owner = None if everyone else (wanted or principal.username)
    tokens = await request.app[AUTH].tokens.list_tokens(
        owner, include_revoked=request.query.get("revoked") in ("1", "true")
    )
    return json_ok({"tokens": [t.model_dump(mode="json") for t in tokens]})


@routes.post("/api/v1/tokens")
@requires("tokens.own")
async def create_token(request: web.Request) -> web.Response:
    principal = principal_of(request)
    body = await parse_body(request, NewToken)
    owner = (body.username or principal.username).strip().lower()
    if not _may_manage(principal, owner):
        raise ApiError(403, "forbidden", "only an admin may make tokens for other users")
    new = await request.app[AUTH].tokens.create(owner, body.name, actor=principal.username)
    # the only time the secret is ever shown
    return json_ok({**new.info.model_dump(mode="json"), "token": new.token}, status=201)


@routes.delete("/api/v1/tokens/{token_id}")
@requires("tokens.own")
async def revoke_token(request: web.Request) -> web.Response:
    principal = principal_of(request)
    tokens = request.app[AUTH].tokens
    info: TokenInfo | None = await tokens.get(request.match_info["token_id"])
    if info is None or not _may_manage(principal, info.username):
        # someone else's token id is not confirmed to exist
        raise not_found("no such token")
    await tokens.revoke(info.id, actor=principal.username)
    return web.Response(status=204)
