"""User management (admins only)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth.passwords import PasswordPolicyError, check_policy
from gateway.auth.principal import Role
from gateway.web.access import principal_of, requires
from gateway.web.bodies import json_ok, parse_body
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import AUTH

routes = web.RouteTableDef()


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=256)
    password: str = Field(max_length=1024)
    role: Role


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None
    password: str | None = Field(default=None, max_length=1024)


@routes.get("/api/v1/users")
@requires("users.admin")
async def list_users(request: web.Request) -> web.Response:
    users = await request.app[AUTH].users.list_users()
    return json_ok({"users": [u.model_dump(mode="json") for u in users]})


@routes.post("/api/v1/users")
@requires("users.admin")
async def create_user(request: web.Request) -> web.Response:
    body = await parse_body(request, NewUser)
    user = await request.app[AUTH].users.create(
        body.username, body.password, body.role, actor=principal_of(request).username
    )
    return json_ok(user, status=201)


@routes.get("/api/v1/users/{username}")
@requires("users.admin")
async def get_user(request: web.Request) -> web.Response:
    user = await request.app[AUTH].users.get(request.match_info["username"])
    if user is None:
        raise not_found("no such user")
    return json_ok(user)


@routes.patch("/api/v1/users/{username}")
@requires("users.admin")
async def update_user(request: web.Request) -> web.Response:
    body = await parse_body(request, UserChange)
    users = request.app[AUTH].users
    principal = principal_of(request)
    name = request.match_info["username"]
    if await users.get(name) is None:
        raise not_found("no such user")
    if body.password is not None:
        # refuse a weak password before changing anything else
        try:
            check_policy(body.password, username=name.strip().lower())
        except PasswordPolicyError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
    user = await users.update(name, actor=principal.username, role=body.role, disabled=body.disabled)
    if body.password is not None:
        # an admin resetting their own password keeps this session; everyone else's end
        keep = principal.session_id_hash if user.username == principal.username else None
        await users.set_password(name, body.password, actor=principal.username, keep_session=keep)
    return json_ok(user)


@routes.delete("/api/v1/users/{username}")
@requires("users.admin")
async def delete_user(request: web.Request) -> web.Response:
    await request.app[AUTH].users.delete(request.match_info["username"], actor=principal_of(request).username)
    return web.Response(status=204)
