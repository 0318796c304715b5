"""What the browser must not be able to be made to do: forged cross-site changes, a readable
session cookie, inline script, plain HTTP where HTTPS is configured."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.ui.conftest import UiSite, wait_until

ATTACK = """<!doctype html><html><body>
<form id="f" method="post" action="{target}/api/v1/devices/{device}/ignore"
      enctype="application/x-www-form-urlencoded"><input name="csrf" value="guessed"></form>
<script>
  // 1. a credentialed fetch (an attacker cannot read the answer, but the request itself would do harm)
  fetch("{target}/api/v1/devices/{device}/credentials/revoke", {{method: "POST", credentials: "include",
         mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}})
    .finally(() => {{ document.title = "fetched"; document.getElementById("f").submit(); }});
</script></body></html>"""


@pytest.fixture
def attacker(ui: UiSite) -> Iterator[dict[str, Any]]:
    """A page on another site (and on another port of the same host) that tries to act on the gateway."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            device = self.path.strip("/").split("?")[0]
            body = ATTACK.format(target=ui.base, device=device).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            seen.append(self.path)

        def log_message(self, *_a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"port": server.server_address[1], "seen": seen}
    finally:
        server.shutdown()


@pytest.mark.parametrize("origin", ["evil.test", "127.0.0.1"], ids=["cross-site", "same-site-other-port"])
def test_forged_cross_site_post_is_refused(ui: UiSite, browse: Any, attacker: dict[str, Any], origin: str) -> None:
    device = f"victim-{origin.split('.')[0]}"
    ui.mint(device)
    before = ui.call("GET", f"/api/v1/devices/{device}").json
    audit_before = len(ui.run(ui.gw.audit.query(target=device, limit=100)))
    page = browse("admin")  # the technician is logged in, in this browser
    page.goto(f"{ui.base}/devices/{device}")
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/ignore") else None)
    page.watch.allowed += ["401", "403", "404", "Failed to fetch", "ERR_BLOCKED_BY_RESPONSE"]
    page.watch.expected.append(f"http://{origin}:{attacker['port']}/")
    page.goto(f"http://{origin}:{attacker['port']}/{device}")
    sent = lambda: [u for u in page.watch.requests if u.startswith(ui.base) and u.endswith(("/revoke", "/ignore"))]  # noqa: E731
    wait_until(lambda: len(sent()) == 2 and statuses, within=10, page=page)
    # both forged requests reached the gateway: the fetch (whose answer the browser then hides) and the
    # form post, which arrives without the cookie (SameSite=Strict, other site) or is refused by the
    # Origin check (same site, other origin)
    assert len(sent()) == 2, page.watch.requests
    assert statuses and all(s in (401, 403) for s in statuses), statuses
    after = ui.call("GET", f"/api/v1/devices/{device}").json
    assert after["state"] == before["state"] == "adopted" and after["credentials"] is True
    assert len(ui.run(ui.gw.audit.query(target=device, limit=100))) == audit_before
    assert attacker["seen"], "the attacker page was served"


def test_session_cookie_is_httponly_and_samesite_strict(ui: UiSite, browse: Any) -> None:
    page = browse(None)
    page.goto(f"{ui.base}/login")
    page.fill("#username", "admin")
    page.fill("#password", "correct horse battery")
    page.click("button[type=submit]")
    page.wait_for_url(f"{ui.base}/")
    cookie = next(c for c in page.context.cookies() if c["name"] == "siteward_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
    assert page.evaluate("() => document.cookie") == ""  # scripts cannot read it


def test_content_security_policy_blocks_injected_inline_script(ui: UiSite, browse: Any) -> None:
    ui.mint("csp-1")
    ui.call("PATCH", "/api/v1/devices/csp-1", {"name": "<img src=x onerror=alert(1)><script>alert(2)</script>"})
    page = browse("viewer")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    resp = page.goto(f"{ui.base}/devices/csp-1")
    assert resp is not None
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.inner_text("#device-name").startswith("<img src=x")  # shown as text
    # even script a page could be tricked into inserting does not run
    page.evaluate("""() => { const s = document.createElement('div');
        s.innerHTML = '<img src=x onerror="document.title=\\'owned\\'">'; document.body.appendChild(s); }""")
    page.wait_for_timeout(300)
    assert page.title() != "owned" and not dialogs
    page.watch.allowed += ["Content Security Policy", "Failed to load resource"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_https_with_the_gateway_certificate(browser: Any, tmp_path: Any) -> None:
    from gateway.settings import load_settings
    from tests.ui.harness import GatewayThread
    from tests.web.conftest import ADMIN_PASSWORD

    settings = load_settings(
        None, gateway={"data_dir": str(tmp_path / "tls"), "id": "gw-tls"}, broker={"port": 0, "host": "127.0.0.1"},
        web={"port": _free_port(), "host": "127.0.0.1", "admin_password": ADMIN_PASSWORD, "tls": True},
        time={"source": "assume_synced"}, logging={"level": "warning", "format": "console"})
    gt = GatewayThread(settings).start()
    try:
        port = gt.gw.web_port
        # the certificate is the gateway's own: it verifies against the gateway's CA
        ca = tmp_path / "tls" / "tls" / "ca.pem"
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # a browser that was told to accept it (a technician accepts it once, or installs the CA)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        page.goto(f"https://127.0.0.1:{port}/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"https://127.0.0.1:{port}/")
        cookie = next(c for c in context.cookies() if c["name"] == "siteward_session")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.wait_for_selector('#live-status')  # the page's script ran over HTTPS (wss for the feed)
        context.close()
    finally:
        gt.stop()
