"""First start: no default password; configured admin or a one-time setup code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from gateway.auth.errors import SetupError
from gateway.auth.setup import META_KEY
from gateway.settings import load_settings
from tests.web.conftest import ADMIN, ADMIN_PASSWORD, Site

NO_ADMIN = {"admin_password": None}


async def test_without_configured_admin_everything_but_health_and_setup_is_503(start_site: Any) -> None:
    async with start_site(web=NO_ADMIN) as site:
        code = site.gw.setup_code
        assert code and len(code) == 14
        anon = site.client()
        for path in ("/api/v1/devices", "/api/v1/me", "/metrics", "/api/v1/users", "/api/v1/live"):
            r = await anon.get(path)
            assert r.status == 503 and r.json["error"] == "setup_required", path
        r = await anon.post("/api/v1/login", {"username": ADMIN, "password": "anything at all"})
        assert r.status == 503
        for path in ("/", "/login"):
            r = await anon.get(path, headers={"Accept": "text/html"})
            assert r.status == 303 and r.headers["Location"] == "/setup"
        page = await anon.get("/setup", headers={"Accept": "text/html"})
        assert page.status == 200 and 'name="code"' in page.text
        health = await anon.get("/healthz")
        assert health.json["setup_required"] is True
        assert (await anon.get("/static/app.css")).status == 200
        # the code is kept only as a hash
        row = await site.gw.db.fetchone("SELECT value FROM meta WHERE key = ?", (META_KEY,))
        assert row is not None and code not in row[0] and code.replace("-", "") not in row[0]
        assert await site.gw.db.fetchone("SELECT 1 FROM users") is None


async def test_wrong_code_refused_right_code_creates_admin_once(start_site: Any) -> None:
    async with start_site(web=NO_ADMIN) as site:
        code = site.gw.setup_code
        anon = site.client()
        r = await anon.post("/setup", {"code": "AAAA-BBBB-CCCC", "username": "boss", "password": "chosen password"})
        assert r.status == 403 and r.json["error"] == "wrong_setup_code"
        r = await anon.post("/setup", {"code": code, "username": "boss", "password": "short"})
        assert r.status == 400
        assert await site.gw.db.fetchone("SELECT 1 FROM users") is None
        # typed lower case, without dashes: still the code
        r = await anon.post(
            "/setup", {"code": code.lower().replace("-", " "), "username": "boss", "password": "chosen password"}
        )
        assert r.status == 201 and r.json["role"] == "admin" and r.json["username"] == "boss"
        assert anon.cookie() is not None  # logged in straight away
        anon.csrf = r.json["csrf_token"]
        assert (await anon.get("/api/v1/me")).json["username"] == "boss"
        assert (await anon.get("/api/v1/devices")).status == 200
        # used up: neither the code nor setup works again
        r = await site.client().post("/setup", {"code": code, "username": "evil", "password": "chosen password"})
        assert r.status == 409
        assert await site.gw.db.fetchone("SELECT 1 FROM meta WHERE key = ?", (META_KEY,)) is None
        assert (await site.client().get("/setup")).status == 303
        actions = [e["action"] for e in await site.audit()]
        assert "setup.complete" in actions and "login" in actions


async def test_setup_form_flow(start_site: Any) -> None:
    async with start_site(web=NO_ADMIN) as site:
        anon = site.client()
        r = await anon.call(
            "POST",
            "/setup",
            data={
                "code": site.gw.setup_code,
                "username": "admin",
                "password": "chosen password",
                "password_repeat": "different password",
            },
        )
        assert r.status == 400 and "differ" in r.text and r.headers["Content-Type"].startswith("text/html")
        r = await anon.call(
            "POST",
            "/setup",
            data={
                "code": site.gw.setup_code,
                "username": "admin",
                "password": "chosen password",
                "password_repeat": "chosen password",
            },
        )
        assert r.status == 303 and r.headers["Location"] == "/"
        page = await anon.get("/", headers={"Accept": "text/html"})
        assert page.status == 200 and "Devices" in page.text


async def test_setup_code_guessing_is_rate_limited(start_site: Any) -> None:
    async with start_site(web={**NO_ADMIN, "login_attempts_per_minute": 2}) as site:
        anon = site.client()
        for _ in range(2):
            r = await anon.post("/setup", {"code": "AAAA-BBBB-CCCC", "password": "chosen password"})
            assert r.status == 403
        r = await anon.post("/setup", {"code": site.gw.setup_code, "password": "chosen password"})
        assert r.status == 429 and "Retry-After" in r.headers
        assert len(await site.audit("setup.lockout")) == 1


async def test_restart_before_setup_replaces_the_code(make_settings: Any) -> None:
    from gateway.app import Gateway

    settings = make_settings(web=NO_ADMIN)
    async with Gateway(settings) as gw:
        first = gw.setup_code
    async with Gateway(settings) as gw:
        second = gw.setup_code
        site = Site(gw)
        try:
            r = await site.client().post("/setup", {"code": first, "password": "chosen password"})
            assert r.status == 403
            r = await site.client().post("/setup", {"code": second, "password": "chosen password"})
            assert r.status == 201
        finally:
            await site.close()
    assert first != second


async def test_configured_password_creates_admin_and_no_code(site: Site) -> None:
    assert site.gw.setup_code is None
    entries = await site.audit("user.create")
    assert entries[0]["actor"] == "system" and entries[0]["detail"]["source"] == "config_password"
    assert ADMIN_PASSWORD not in str(entries)
    row = await site.gw.db.fetchone("SELECT password_hash FROM users WHERE username = 'admin'")
    assert row[0].startswith("$argon2id$") and ADMIN_PASSWORD not in row[0]
    assert (await site.client().login(ADMIN, ADMIN_PASSWORD)).status == 200


async def test_admin_password_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import Gateway

    # the environment alone: no admin password passed in code or a file
    monkeypatch.setenv("SITEWARD_WEB__ADMIN_PASSWORD", "from the environment")
    monkeypatch.setenv("SITEWARD_WEB__PORT", "0")
    monkeypatch.setenv("SITEWARD_WEB__HOST", "127.0.0.1")
    settings = load_settings(
        None,
        gateway={"data_dir": str(tmp_path / "data")},
        broker={"port": 0, "host": "127.0.0.1"},
        time={"source": "assume_synced"},
    )
    assert settings.web.admin_password is not None
    async with Gateway(settings) as gw:
        assert gw.setup_code is None
        site = Site(gw)
        try:
            assert (await site.client().login("admin", "from the environment")).status == 200
        finally:
            await site.close()


async def test_configured_hash_creates_admin(start_site: Any) -> None:
    h = PasswordHasher().hash("hashed on a laptop")
    async with start_site(web={"admin_password": None, "admin_password_hash": h}) as site:
        assert site.gw.setup_code is None
        assert (await site.client().login("admin", "hashed on a laptop")).status == 200


@pytest.mark.parametrize("web, message", [
    ({"admin_password": None, "admin_password_hash": "plaintext!"}, "admin_password_hash is not an argon2 hash"),
    ({"admin_password": "admin"}, "admin_password: password must be at least"),
])
async def test_a_bad_configured_hash_or_weak_password_stops_the_start(
    make_settings: Any, web: dict[str, Any], message: str
) -> None:
    from gateway.app import Gateway

    gw = Gateway(make_settings(web=web))
    try:
        with pytest.raises(SetupError, match=message):
            await gw.start()
    finally:
        await gw.stop()


async def test_configured_password_is_ignored_once_users_exist(make_settings: Any) -> None:
    from gateway.app import Gateway

    async with Gateway(make_settings()) as gw:
        site = Site(gw)
        admin = await site.admin()
        r = await admin.post(
            "/api/v1/me/password", {"current_password": ADMIN_PASSWORD, "new_password": "changed by the admin"}
        )
        assert r.status == 204
        await site.close()
    async with Gateway(make_settings()) as gw:  # same data dir, same configured password
        site = Site(gw)
        try:
            assert (await site.client().login(ADMIN, ADMIN_PASSWORD)).status == 401
            assert (await site.client().login(ADMIN, "changed by the admin")).status == 200
        finally:
            await site.close()
