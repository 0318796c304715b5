"""Authorisation is decided on the server for every route, per role, per way of logging in.

The route list is read from the running application, so an endpoint added later (by any
page family) is covered without editing this file: each route is called by a viewer, a
technician and an admin, with a browser session and with a bearer token, and must be
refused (403) exactly when ``permissions.authorise`` says so.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from gateway.auth.principal import AuthMethod, Principal, Role
from gateway.web.access import access_of
from gateway.web.permissions import authorise
from tests.ui.conftest import ROLES, UiSite
from tests.web.conftest import ADMIN_PASSWORD, USER_PASSWORD, Client

# state the matrix must not destroy for the rest of the session (logout is tested on its own)
SKIP = {("POST", "/api/v1/logout")}


def _routes(ui: UiSite) -> list[tuple[str, str, Any]]:
    app: web.Application = ui.gw._runner.app
    out = []
    for route in app.router.routes():
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource) or route.resource is None:
            continue
        access = access_of(route.handler)
        if access is None or access.action is None:
            continue
        path = re.sub(r"\{[^}]+\}", "nosuch-0", route.resource.canonical)
        if (route.method, route.resource.canonical) in SKIP:
            continue
        out.append((route.method, path, access))
    return out


def _token_client(ui: UiSite, role: str) -> Client:
    r = ui.call("POST", "/api/v1/tokens", {"name": f"matrix-{role}", "username": ROLES[role]})
    assert r.status == 201, r
    return ui.new_client(token=r.json["token"])


def _session_client(ui: UiSite, role: str) -> Client:
    # a login of its own: other tests end or expire sessions of these users
    c = ui.new_client()
    r = ui.run(c.login(ROLES[role], ADMIN_PASSWORD if role == "admin" else USER_PASSWORD))
    assert r.status == 200, r
    return c


def test_every_route_refuses_exactly_the_roles_it_should(ui: UiSite) -> None:
    routes = _routes(ui)
    assert len(routes) > 60
    problems: list[str] = []
    for method_name, auth in (("session", AuthMethod.SESSION), ("token", AuthMethod.TOKEN)):
        for role in ("viewer", "technician", "admin"):
            client = _session_client(ui, role) if auth is AuthMethod.SESSION else _token_client(ui, role)
            who = Principal(username=ROLES[role], role=Role(role), method=auth)
            for verb, path, access in routes:
                body = None if verb in ("GET", "DELETE") else {}
                headers = {"Accept": "text/html"} if access.page else {}
                r = ui.run(client.call(verb, path, json_body=body, headers=headers))
                if access.bearer_only and auth is AuthMethod.SESSION:
                    ok = r.status == 401
                elif authorise(who, access.action):
                    ok = r.status not in (401, 403) and r.status < 500
                else:
                    ok = r.status == 403
                if not ok:
                    problems.append(f"{method_name} {role} {verb} {path} ({access.action}): {r.status} {r.text[:120]}")
            ui.run(client.close())
    assert not problems, "\n".join(problems)


def test_refused_page_is_a_page(ui: UiSite, browse: Any) -> None:
    page = browse("viewer")
    resp = page.goto(f"{ui.base}/users")
    assert resp is not None and resp.status == 403
    assert page.inner_text("h1") == "Not allowed"
    page.watch.allowed.append("403")
    nav = page.locator("nav.nav a").all_inner_texts()
    assert "Users" not in nav and "Audit" not in nav and "Devices" in nav


def test_viewer_sees_no_controls_and_a_change_is_refused(ui: UiSite, browse: Any) -> None:
    ui.mint("ro-1")
    ui.call("PATCH", "/api/v1/devices/ro-1", {"name": "Freezer"})
    page = browse("viewer")
    page.goto(f"{ui.base}/devices/ro-1")
    assert page.locator("#h-manage").count() == 0 and page.locator("#h-control").count() == 0
    assert page.locator("button[data-api]").count() == 0
    # the page's own script, as the viewer, with the viewer's valid CSRF token: the server refuses
    result = page.evaluate("""() => Siteward.api('PATCH', '/api/v1/devices/ro-1', {name: 'hacked'})
        .then(() => 'accepted', e => e.status + ' ' + e.message)""")
    assert result == "403 Not allowed for your role."
    page.watch.allowed.append("403")
    for path, body in (("/api/v1/devices/ro-1/commands", {"command": "relay", "args": {"state": "on"}}),
                       ("/api/v1/devices/ro-1/ignore", None)):
        status = page.evaluate("([p, b]) => Siteward.api('POST', p, b).then(() => 200, e => e.status)", [path, body])
        assert status == 403
    dev = ui.call("GET", "/api/v1/devices/ro-1").json
    assert dev["name"] == "Freezer" and dev["state"] == "adopted"
    assert ui.run(ui.gw.commander.list_for("ro-1", limit=5)) == []
