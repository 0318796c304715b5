"""``/users`` (admins): add users, change roles, disable, reset passwords, delete."""

from __future__ import annotations

from aiohttp import web

from gateway.auth.passwords import MIN_LENGTH
from gateway.auth.principal import Role
from gateway.web.access import requires
from gateway.web.keys import AUTH
from gateway.web.render import render_page

routes = web.RouteTableDef()


@routes.get("/users")
@requires("users.admin", page=True)
async def users_page(request: web.Request) -> web.Response:
    users = await request.app[AUTH].users.list_users()
    return render_page(request, "users.html", title="Users", current="/users", users=users,
                       roles=[r.value for r in Role], min_length=MIN_LENGTH)
