"""Authorisation per role per endpoint, checked server-side on every call."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from gateway.web.access import access_of
from gateway.web.permissions import ACTIONS, ROLE_ACTIONS
from tests.web.conftest import Client, Site

ROLES = ("viewer", "technician", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}

# (method, path, JSON body, least role allowed). Allowed calls may still answer 404/409
# (a missing or protected target): what matters here is that the decision was not 401/403.
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("GET", "/", None, "viewer"),
    ("GET", "/api/v1/me", None, "viewer"),
    ("GET", "/api/v1/devices", None, "viewer"),
    ("GET", "/api/v1/devices/d1", None, "viewer"),
    ("GET", "/api/v1/devices/d1/readings?limit=5", None, "viewer"),
    ("GET", "/api/v1/devices/d1/commands", None, "viewer"),
    ("GET", "/api/v1/commands/nosuch", None, "viewer"),
    ("GET", "/api/v1/audit", None, "technician"),
    ("GET", "/api/v1/tokens", None, "technician"),
    ("GET", "/api/v1/users", None, "admin"),
    ("GET", "/api/v1/users/admin", None, "admin"),
    # state-changing
    ("PATCH", "/api/v1/devices/d1", {"location": "hall"}, "technician"),
    ("POST", "/api/v1/devices/d1/adopt", None, "technician"),
    ("POST", "/api/v1/devices/d1/ignore", None, "technician"),
    ("DELETE", "/api/v1/devices/nosuch", None, "technician"),
    ("POST", "/api/v1/devices", {"id": "minted-1"}, "technician"),
    ("POST", "/api/v1/devices/nosuch/credentials/revoke", None, "technician"),
    ("POST", "/api/v1/devices/d1/commands", {"command": "relay", "args": {"state": "on"}}, "technician"),
    ("POST", "/api/v1/tokens", {"name": "mine"}, "technician"),
    ("DELETE", "/api/v1/tokens/nosuch", None, "technician"),
    ("POST", "/api/v1/users", {"username": "new-user", "password": "long enough pw", "role": "viewer"}, "admin"),
    ("PATCH", "/api/v1/users/nosuch", {"role": "viewer"}, "admin"),
    ("DELETE", "/api/v1/users/nosuch", None, "admin"),
]
STATE_CHANGING = [e for e in ENDPOINTS if e[0] != "GET"]


async def _clients(site: Site, method: str) -> dict[str, Client]:
    out: dict[str, Client] = {}
    for role in ROLES:
        if role == "admin":
            out[role] = await site.admin() if method == "session" else await site.script("admin")
            continue
        browser = await site.user(f"{role}1", role)
        out[role] = browser if method == "session" else await site.script(f"{role}1")
    return out


@pytest.mark.parametrize("method", ["session", "token"])
async def test_role_matrix(site: Site, method: str) -> None:
    admin = await site.admin()
    assert (await admin.post("/api/v1/devices", {"id": "d1"})).status == 201
    clients = await _clients(site, method)
    problems = []
    for role in ROLES:  # least privileged first: a refused call must change nothing
        for verb, path, body, least in ENDPOINTS:
            r = await clients[role].call(verb, path, json_body=body)
            allowed = RANK[role] >= RANK[least]
            if allowed and (r.status in (401, 403) or r.status >= 500):
                problems.append(f"{role} {verb} {path}: expected allowed, got {r}")
            if not allowed and r.status != 403:
                problems.append(f"{role} {verb} {path}: expected 403, got {r}")
    assert not problems, "\n".join(problems)


async def test_refused_changes_leave_no_trace(site: Site) -> None:
    admin = await site.admin()
    assert (await admin.post("/api/v1/devices", {"id": "d1"})).status == 201
    viewer = await site.user("vera", "viewer")
    before_audit = len(await site.audit())
    before_users = (await admin.get("/api/v1/users")).json["users"]
    before_dev = (await admin.get("/api/v1/devices/d1")).json
    for verb, path, body, _ in STATE_CHANGING:
        r = await viewer.call(verb, path, json_body=body)
        assert r.status == 403, (verb, path, r)
        assert r.json["error"] == "forbidden"
    assert len(await site.audit()) == before_audit
    after_dev = (await admin.get("/api/v1/devices/d1")).json
    assert after_dev["state"] == before_dev["state"] and after_dev["location"] == before_dev["location"]
    assert (await admin.get("/api/v1/users")).json["users"] == before_users
    assert await site.gw.db.fetchone("SELECT 1 FROM commands") is None


async def test_anonymous_gets_401_everywhere_but_public_routes(site: Site) -> None:
    anon = site.client()
    for verb, path, body, _ in ENDPOINTS:
        r = await anon.call(verb, path, json_body=body)
        if path == "/":
            assert r.status == 303 and r.headers["Location"] == "/login?next=/"
        else:
            assert r.status == 401, (verb, path, r)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_every_route_declares_its_access_rule(site: Site) -> None:
    app: web.Application = site.gw._runner.app
    seen = 0
    for route in app.router.routes():
        if isinstance(route.resource, web.StaticResource):
            continue
        access = access_of(route.handler)
        assert access is not None, f"{route.method} {route.resource.canonical} declares no access rule"
        assert access.action is None or access.action in ACTIONS
        seen += 1
    assert seen > 20


def test_roles_nest_and_viewer_changes_nothing() -> None:
    viewer, tech, admin = (ROLE_ACTIONS[r] for r in ROLE_ACTIONS)
    assert viewer < tech < admin
    assert not {"devices.write", "commands.send", "ingest.write", "users.admin", "tokens.own"} & viewer
