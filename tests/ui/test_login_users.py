"""Logging in and out, lock-out, session expiry, and users managed by an admin, in the browser."""

from __future__ import annotations

import time
from typing import Any

from tests.ui.conftest import UiSite
from tests.web.conftest import ADMIN_PASSWORD


def _login(page: Any, ui: UiSite, user: str, password: str) -> None:
    page.goto(f"{ui.base}/login")
    page.fill("#username", user)
    page.fill("#password", password)
    page.keyboard.press("Enter")


def test_login_and_logout(ui: UiSite, browse: Any) -> None:
    page = browse(None)
    resp = page.goto(f"{ui.base}/devices")
    assert resp is not None and page.url == f"{ui.base}/login?next=/devices"
    page.fill("#username", "admin")
    page.fill("#password", "not the password")
    page.keyboard.press("Enter")
    assert "Wrong user name or password" in page.inner_text("[role=alert]")
    page.watch.allowed.append("401")
    page.fill("#username", "admin")
    page.fill("#password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{ui.base}/devices")  # back to where they were going
    assert page.inner_text(".who .user").startswith("admin")
    page.click("text=Log out")
    page.wait_for_url(f"{ui.base}/login")
    page.goto(f"{ui.base}/")
    assert page.url.startswith(f"{ui.base}/login")  # the session is gone on the server


def test_repeated_failures_lock_the_login_out_and_are_audited(ui: UiSite, browse: Any) -> None:
    page = browse(None)
    page.watch.allowed += ["401", "429"]
    for _ in range(5):
        _login(page, ui, "vic", "wrong password!")
        page.wait_for_selector("[role=alert]")
    _login(page, ui, "vic", "wrong password!")
    assert "too many failed attempts" in page.inner_text("[role=alert]")
    # the right password is not even checked while locked out
    _login(page, ui, "vic", "another fine password")
    assert "too many failed attempts" in page.inner_text("[role=alert]")
    entries = ui.run(ui.gw.audit.query(action="login.lockout", limit=10))
    assert any(e.target == "vic" for e in entries)
    # the lock-out is per user name and address: the admin can still log in from here
    ui.gw.settings  # noqa: B018 (keeps the gateway in view for the reader)
    _login(page, ui, "admin", ADMIN_PASSWORD)
    page.wait_for_url(f"{ui.base}/")
    ui.run(_unlock(ui))


async def _unlock(ui: UiSite) -> None:
    from gateway.web.keys import AUTH

    app = ui.gw._runner.app
    app[AUTH].limiter.success("vic", "127.0.0.1")


def test_session_expiry_sends_the_page_to_the_login(ui: UiSite, browse: Any) -> None:
    ui.api("viewer")  # the viewer's other session (made before this one) must outlive it
    opened = time.time()
    page = browse("viewer")
    page.goto(f"{ui.base}/devices")
    page.wait_for_selector('#live-status[data-state="live"]')
    # only this browser's session runs out
    ui.run(ui.gw.db.write(lambda c: c.execute(
        "UPDATE web_sessions SET expires_at = ? WHERE username = 'vic' AND created_at >= ?",
        (time.time() - 1, opened))))
    page.reload()
    assert page.url.startswith(f"{ui.base}/login?next=/devices")
    assert ui.call("GET", "/api/v1/me", role="viewer").status == 200


def test_admin_manages_users_in_the_page(ui: UiSite, browse: Any) -> None:
    page = browse("admin")
    page.goto(f"{ui.base}/users")
    page.fill("#nu-name", "newbie")
    page.select_option("#nu-role", "viewer")
    page.fill("#nu-pw", "short")
    page.click("#add-user button[type=submit]")
    # the browser's own check (minlength) stops it first; the field says why
    assert page.evaluate("() => document.querySelector('#nu-pw').validity.tooShort")
    page.fill("#nu-pw", "a long enough password")
    page.click("#add-user button[type=submit]")
    page.wait_for_selector('tr[data-user="newbie"]')
    row = page.locator('tr[data-user="newbie"]')
    assert row.locator("select").input_value() == "viewer"
    # change the role: the select saves on change
    row.locator("select").select_option("technician")
    page.wait_for_function("() => document.querySelector('tr[data-user=\"newbie\"] select').value === 'technician'")
    page.wait_for_timeout(500)
    assert ui.call("GET", "/api/v1/users/newbie").json["role"] == "technician"
    # disable, with a confirmation
    page.locator('tr[data-user="newbie"] button:text("Disable")').click()
    page.click("#confirm-ok")
    page.wait_for_selector('tr[data-user="newbie"] .badge:text("disabled")')
    # the last admin cannot disable itself: the page shows the server's refusal
    page.locator('tr[data-user="admin"] button:text("Disable")').click()
    page.click("#confirm-ok")
    page.wait_for_selector('.toast.error')
    assert "admin" in page.inner_text("#toast").lower()
    page.watch.allowed.append("409")
    page.locator('tr[data-user="newbie"] button:text("Delete")').click()
    page.click("#confirm-ok")
    page.wait_for_load_state()
    page.wait_for_function("() => !document.querySelector('tr[data-user=\"newbie\"]')")
    assert {"user.create", "user.update", "user.delete"} <= {
        e.action for e in ui.run(ui.gw.audit.query(target="newbie", limit=20))}


def test_own_password_and_tokens_on_the_account_page(ui: UiSite, browse: Any) -> None:
    page = browse("technician")
    page.goto(f"{ui.base}/account")
    page.fill("#tok-name", "boiler script")
    page.click("button:text('Create token')")
    page.wait_for_selector("#new-token:not([hidden])")
    token = page.input_value("#token-value")
    assert token.startswith("swt_")
    page.fill("#cur-pw", "wrong current password")
    page.fill("#new-pw", "a brand new password")
    page.click("button:text('Change password')")
    page.wait_for_selector(".form-status:text('current password is wrong')")
    page.watch.allowed.append("403")
