"""``/account``: one's own password and API tokens."""

from __future__ import annotations

from aiohttp import web

from gateway.auth.passwords import MIN_LENGTH
from gateway.web.access import principal_of, requires
from gateway.web.keys import AUTH
from gateway.web.permissions import authorise
from gateway.web.render import render_page

routes = web.RouteTableDef()


@routes.get("/account")
@requires("session.self", page=True)
async def account_page(request: web.Request) -> web.Response:
    principal = principal_of(request)
    tokens = []
    if authorise(principal, "tokens.own"):
        tokens = await request.app[AUTH].tokens.list_tokens(principal.username, include_revoked=False)
    return render_page(request, "account.html", title="Account", current="/account", tokens=tokens,
                       min_length=MIN_LENGTH)
