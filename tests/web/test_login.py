"""Browser sessions: login, failures and lock-out, expiry, logout, own password."""

from __future__ import annotations

import time
from typing import Any

from tests.web.conftest import ADMIN, ADMIN_PASSWORD, USER_PASSWORD, Site


async def test_login_sets_a_strict_httponly_cookie_and_me_answers(site: Site) -> None:
    c = site.client()
    r = await c.login(ADMIN, ADMIN_PASSWORD)
    assert r.status == 200
    body = r.json
    assert body["username"] == ADMIN and body["role"] == "admin" and body["auth"] == "session"
    assert len(body["csrf_token"]) >= 40
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("siteward_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP in this test; see test_secure_cookie_over_tls
    me = await c.get("/api/v1/me")
    assert me.status == 200
    assert me.json["username"] == ADMIN and me.json["csrf_token"] == body["csrf_token"]
    assert "users.admin" in me.json["actions"]
    # only a hash of the session id is stored
    rows = await site.gw.db.fetchall("SELECT id_hash FROM web_sessions")
    assert c.cookie() not in {r[0] for r in rows}
    assert [e["action"] for e in await site.audit("login")] == ["login"]


async def test_user_names_are_case_insensitive(site: Site) -> None:
    r = await site.client().login("ADMIN", ADMIN_PASSWORD)
    assert r.status == 200 and r.json["username"] == "admin"


async def test_wrong_password_and_unknown_user_are_the_same_401(site: Site) -> None:
    c = site.client()
    wrong = await c.login(ADMIN, "not the password")
    unknown = await c.login("nobody", "not the password")
    assert wrong.status == unknown.status == 401
    assert wrong.json == unknown.json == {"error": "invalid_credentials", "detail": "wrong user name or password"}
    assert c.cookie() is None
    assert (await c.get("/api/v1/me")).status == 401


async def test_login_body_errors_are_400_and_never_echo_the_password(site: Site) -> None:
    c = site.client()
    r = await c.post("/api/v1/login", {"username": ADMIN})
    assert r.status == 400 and r.json["error"] == "invalid_request"
    r = await c.post("/api/v1/login", {"username": ADMIN, "password": 12345678901})
    assert r.status == 400 and "12345678901" not in r.text
    r = await c.call("POST", "/api/v1/login", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json["error"] == "invalid_json"


async def test_lockout_after_n_failures_is_429_with_retry_after_and_audited(start_site: Any) -> None:
    async with start_site(web={"login_attempts_per_minute": 3}) as site:
        c = site.client()
        statuses = [(await c.login(ADMIN, f"wrong {i}")).status for i in range(3)]
        assert statuses == [401, 401, 401]
        locked = await c.login(ADMIN, ADMIN_PASSWORD)  # even the right password is refused now
        assert locked.status == 429
        assert locked.json["error"] == "too_many_attempts"
        assert 1 <= int(locked.headers["Retry-After"]) <= 60
        entries = await site.audit("login.lockout")
        assert len(entries) == 1
        e = entries[0]
        assert e["actor"] == "anonymous" and e["target"] == ADMIN
        assert e["detail"]["address"] == "127.0.0.1" and e["detail"]["failures"] == 3
        assert "wrong" not in str(e)  # no attempted password in the trail
        # another user (or the same user from elsewhere) is not locked out by this
        r = await site.client().login("someone", "x" * 10)
        assert r.status == 401


async def test_form_login_redirects_to_next_and_refuses_open_redirects(site: Site) -> None:
    c = site.client()
    r = await c.call("POST", "/api/v1/login", data={"username": ADMIN, "password": ADMIN_PASSWORD, "next": "/?x=1"})
    assert r.status == 303 and r.headers["Location"] == "/?x=1"
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        c2 = site.client()
        r = await c2.call("POST", "/api/v1/login", data={"username": ADMIN, "password": ADMIN_PASSWORD, "next": evil})
        assert r.status == 303 and r.headers["Location"] == "/", evil
    bad = await site.client().call("POST", "/api/v1/login", data={"username": ADMIN, "password": "nope"})
    assert bad.status == 401 and "Wrong user name or password" in bad.text
    assert bad.headers["Content-Type"].startswith("text/html")


async def test_session_expiry(site: Site) -> None:
    c = site.client()
    await c.login(ADMIN, ADMIN_PASSWORD)
    assert (await c.get("/api/v1/me")).status == 200
    await site.gw.db.write(lambda conn: conn.execute("UPDATE web_sessions SET expires_at = ?", (time.time() - 1,)))
    r = await c.get("/api/v1/me")
    assert r.status == 401 and r.json["error"] == "unauthorised"
    page = await c.get("/", headers={"Accept": "text/html"})
    assert page.status == 303 and page.headers["Location"].startswith("/login?next=/")


async def test_session_lifetime_is_session_ttl(start_site: Any) -> None:
    async with start_site(web={"session_ttl_s": 120}) as site:
        c = site.client()
        r = await c.login(ADMIN, ADMIN_PASSWORD)
        assert abs(r.json["expires_at"] - (time.time() + 120)) < 5
        assert "Max-Age=1" in r.headers["Set-Cookie"]  # 119 or 120


async def test_logout_ends_the_session_server_side(site: Site) -> None:
    c = site.client()
    await c.login(ADMIN, ADMIN_PASSWORD)
    stolen = c.cookie()
    r = await c.post("/api/v1/logout")
    assert r.status == 204
    assert "siteward_session=" in r.headers["Set-Cookie"] and "Max-Age=0" in r.headers["Set-Cookie"]
    assert (await c.get("/api/v1/me")).status == 401
    # replaying the old cookie does not work either
    replay = site.client()
    r = await replay.get("/api/v1/me", headers={"Cookie": f"siteward_session={stolen}"})
    assert r.status == 401
    assert [e["action"] for e in await site.audit("logout")] == ["logout"]


async def test_form_logout_from_the_page(site: Site) -> None:
    c = site.client()
    await c.login(ADMIN, ADMIN_PASSWORD)
    r = await c.call("POST", "/api/v1/logout", data={"csrf": c.csrf}, csrf=False)
    assert r.status == 303 and r.headers["Location"] == "/login"
    assert (await c.get("/api/v1/me")).status == 401


async def test_change_own_password_keeps_this_session_ends_others(site: Site) -> None:
    tech = await site.user("tina", "technician")
    other = site.client()
    assert (await other.login("tina", USER_PASSWORD)).status == 200
    r = await tech.post("/api/v1/me/password", {"current_password": "wrong", "new_password": "a new password"})
    assert r.status == 403 and r.json["error"] == "wrong_password"
    r = await tech.post("/api/v1/me/password", {"current_password": USER_PASSWORD, "new_password": "short"})
    assert r.status == 400 and "at least" in r.json["detail"]
    r = await tech.post("/api/v1/me/password", {"current_password": USER_PASSWORD, "new_password": "a new password"})
    assert r.status == 204
    assert (await tech.get("/api/v1/me")).status == 200
    assert (await other.get("/api/v1/me")).status == 401
    assert (await site.client().login("tina", USER_PASSWORD)).status == 401
    assert (await site.client().login("tina", "a new password")).status == 200
    entries = await site.audit("user.password")
    assert len(entries) == 1 and "a new password" not in str(entries)


async def test_password_change_needs_a_session_not_a_token(site: Site) -> None:
    script = await site.script()
    r = await script.post("/api/v1/me/password", {"current_password": ADMIN_PASSWORD, "new_password": "taken over!!"})
    assert r.status == 403


async def test_login_page_renders_and_redirects_when_logged_in(site: Site) -> None:
    c = site.client()
    r = await c.get("/login?next=/x", headers={"Accept": "text/html"})
    assert r.status == 200 and 'name="next" value="/x"' in r.text
    assert '<label for="username">' in r.text and '<label for="password">' in r.text
    await c.login(ADMIN, ADMIN_PASSWORD)
    r = await c.get("/login?next=/x")
    assert r.status == 303 and r.headers["Location"] == "/x"


async def test_sessions_per_user_are_bounded(site: Site) -> None:
    from gateway.auth.sessions import MAX_SESSIONS_PER_USER

    browsers = []
    for _ in range(MAX_SESSIONS_PER_USER + 3):
        c = site.client()
        assert (await c.login(ADMIN, ADMIN_PASSWORD)).status == 200
        browsers.append(c)
    row = await site.gw.db.fetchone("SELECT count(*) FROM web_sessions WHERE username = 'admin'")
    assert row[0] == MAX_SESSIONS_PER_USER
    assert (await browsers[0].get("/api/v1/me")).status == 401  # the oldest went first
    assert (await browsers[-1].get("/api/v1/me")).status == 200
