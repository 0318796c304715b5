"""CSRF, Origin checks, security headers and cookie flags."""

from __future__ import annotations

from typing import Any

import pytest

from tests.web.conftest import ADMIN, ADMIN_PASSWORD, Site


async def test_cookie_post_without_csrf_token_is_403_with_it_ok(site: Site) -> None:
    c = await site.admin()
    body = {"username": "vic", "password": "viewer password", "role": "viewer"}
    r = await c.post("/api/v1/users", body, csrf=False)
    assert r.status == 403 and r.json["error"] == "csrf"
    r = await c.post("/api/v1/users", body, csrf=False, headers={"X-CSRF-Token": "forged"})
    assert r.status == 403 and r.json["error"] == "csrf"
    assert await site.gw.db.fetchone("SELECT 1 FROM users WHERE username = 'vic'") is None
    r = await c.post("/api/v1/users", body)
    assert r.status == 201


async def test_another_sessions_csrf_token_does_not_work(site: Site) -> None:
    a = await site.admin()
    b = site.client()
    await b.login(ADMIN, ADMIN_PASSWORD)
    r = await a.post("/api/v1/tokens", {"name": "x"}, csrf=False, headers={"X-CSRF-Token": b.csrf or ""})
    assert r.status == 403


@pytest.mark.parametrize(
    "method, path",
    [
        ("PATCH", "/api/v1/users/admin"),
        ("DELETE", "/api/v1/users/admin"),
        ("POST", "/api/v1/logout"),
        ("DELETE", "/api/v1/tokens/abc"),
        ("POST", "/api/v1/devices/dev1/adopt"),
    ],
)
async def test_every_state_changing_method_needs_the_token(site: Site, method: str, path: str) -> None:
    c = await site.admin()
    r = await c.call(method, path, json_body={}, csrf=False)
    assert r.status == 403 and r.json["error"] == "csrf"


async def test_form_posts_carry_the_token_as_a_field(site: Site) -> None:
    c = await site.admin()
    r = await c.call("POST", "/api/v1/logout", data={"csrf": "wrong"}, csrf=False)
    assert r.status == 403
    r = await c.call("POST", "/api/v1/logout", data={"csrf": c.csrf}, csrf=False)
    assert r.status == 303


async def test_foreign_origin_is_refused_even_with_the_token(site: Site) -> None:
    c = await site.admin()
    r = await c.post("/api/v1/tokens", {"name": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status == 403 and r.json["error"] == "cross_origin"
    r = await c.get("/api/v1/me", headers={"Origin": "null"})
    assert r.status == 403
    r = await c.post("/api/v1/tokens", {"name": "x"}, headers={"Origin": site.base})
    assert r.status == 201


async def test_login_from_a_foreign_origin_is_refused(site: Site) -> None:
    # login CSRF: a foreign page must not log the browser into some account
    c = site.client(origin="http://evil.example")
    r = await c.login(ADMIN, ADMIN_PASSWORD)
    assert r.status == 403 and c.cookie() is None


async def test_bearer_requests_need_no_csrf_token(site: Site) -> None:
    script = await site.script()
    r = await script.post("/api/v1/users", {"username": "sam", "password": "script made me", "role": "viewer"})
    assert r.status == 201


async def test_a_bad_bearer_header_does_not_fall_back_to_the_cookie(site: Site) -> None:
    c = await site.admin()
    r = await c.get("/api/v1/me", headers={"Authorization": "Bearer nonsense"})
    assert r.status == 401 and r.json["error"] == "invalid_token"
    r = await c.get("/api/v1/me", headers={"Authorization": "Basic YWRtaW46eA=="})
    assert r.status == 401


def _check_security_headers(headers: Any) -> None:
    csp = headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["object-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "http:" not in csp and "https:" not in csp and "*" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert "aiohttp" not in headers.get("Server", "") and "Python" not in headers.get("Server", "")


async def test_security_headers_on_every_kind_of_response(site: Site) -> None:
    anon = site.client()
    admin = await site.admin()
    responses = [
        await anon.get("/login", headers={"Accept": "text/html"}),
        await admin.get("/", headers={"Accept": "text/html"}),
        await admin.get("/api/v1/devices"),
        await anon.get("/api/v1/devices"),  # 401
        await anon.get("/api/v1/nowhere"),  # 404
        await anon.get("/healthz"),
        await anon.get("/metrics"),
        await anon.get("/static/app.css"),
        await anon.get("/static/js/ui.js"),
    ]
    for r in responses:
        _check_security_headers(r.headers)
    api = responses[2]
    assert api.headers["Cache-Control"] == "no-store"
    assert responses[3].status == 401 and responses[4].status == 404
    assert responses[4].json["error"] == "not_found"


async def test_pages_have_no_inline_script_and_no_external_resources(site: Site) -> None:
    admin = await site.admin()
    for path in ("/", "/login"):
        html = (await admin.get(path, headers={"Accept": "text/html"})).text
        assert "<script>" not in html and "onclick" not in html.lower() and " style=" not in html
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert '<script src="/static/js/ui.js" defer></script>' in (await admin.get("/")).text


async def test_secure_cookie_over_tls(start_site: Any) -> None:
    async with start_site(web={"tls": True}) as site:
        import ssl

        import aiohttp

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as http:
            url = f"https://127.0.0.1:{site.gw.web_port}/api/v1/login"
            async with http.post(url, json={"username": ADMIN, "password": ADMIN_PASSWORD}, ssl=ctx) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


async def test_same_origin_form_login_as_a_browser_sends_it(site: Site) -> None:
    # browsers send Origin on form posts; with Referrer-Policy no-referrer it would be "null"
    c = site.client(origin=site.base)
    r = await c.call("POST", "/api/v1/login", data={"username": ADMIN, "password": ADMIN_PASSWORD, "next": "/"})
    assert r.status == 303 and c.cookie() is not None
