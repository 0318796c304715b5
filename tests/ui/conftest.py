"""UI tests: one real gateway and one headless Chromium for the whole package (they are the
slow parts); a fresh browser context per test, logged in as the role the test asks for.

Every page a test opens is watched: a request to any host but the gateway, a JavaScript
error, or a Content-Security-Policy violation fails the test that caused it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import load_settings
from tests.ui.harness import ARTIFACTS, LAPTOP, GatewayThread, launch_chromium
from tests.web.conftest import ADMIN, ADMIN_PASSWORD, USER_PASSWORD, Client

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "gateway" / "web" / "static" / "vendor" / "uPlot.iife.min.js"
ROLES = {"admin": ADMIN, "technician": "tess", "viewer": "vic"}


def _frontend() -> None:
    # scripts/test.sh runs the front-end step; a bare `pytest` gets it here (npm ci, from the lock file)
    if not VENDOR.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "frontend.sh")], check=True, timeout=600)


class UiSite:
    """The running gateway, API clients per role (aiohttp, on the gateway's loop) and helpers."""

    def __init__(self, gt: GatewayThread) -> None:
        self.gt = gt
        self.gw = gt.gw
        self.base = gt.base
        self._clients: dict[str, Client] = {}
        self.passwords: dict[str, str] = {}

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.gt.run(coro, timeout)

    def new_client(self, **kw: Any) -> Client:
        async def make() -> Client:
            return Client(self.base, **kw)

        return self.run(make())  # type: ignore[no-any-return]

    def api(self, role: str = "admin") -> Client:
        """A logged-in API client for ``role`` (its session is separate from the browser's)."""
        if role not in self._clients:
            c = self.new_client()
            r = self.run(c.login(ROLES[role], ADMIN_PASSWORD if role == "admin" else USER_PASSWORD))
            assert r.status == 200, r
            self._clients[role] = c
        return self._clients[role]

    def call(self, method: str, path: str, body: Any = None, role: str = "admin", **kw: Any) -> Any:
        return self.run(self.api(role).call(method, path, json_body=body, **kw))

    def mint(self, device_id: str, profiles: list[str] | None = None) -> str:
        r = self.call("POST", "/api/v1/devices", {"id": device_id, "profiles": profiles or ["native"]})
        assert r.status == 201, r
        return str(r.json["mqtt"]["password"])

    def session_cookie(self, role: str) -> str:
        """A fresh browser session for ``role`` (a login of its own, like a second device)."""
        c = self.new_client()
        r = self.run(c.login(ROLES[role], ADMIN_PASSWORD if role == "admin" else USER_PASSWORD))
        assert r.status == 200, r
        value = c.cookie()
        self.run(c.close())
        assert value
        return value

    def readings_of(self, device: str, metric: str) -> list[Any]:
        return self.run(self.gw.readings.history(device, metric=metric, limit=10))  # type: ignore[no-any-return]

    def close(self) -> None:
        for c in self._clients.values():
            self.run(c.close())


@pytest.fixture(scope="package")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiSite]:
    _frontend()
    data = tmp_path_factory.mktemp("ui-gateway")
    settings = load_settings(
        None,
        gateway={"data_dir": str(data), "id": "gw-ui", "name": "Test site"},
        broker={"port": 0, "host": "127.0.0.1"},
        web={"port": 0, "host": "127.0.0.1", "admin_password": ADMIN_PASSWORD},
        store={"commit_interval_ms": 2, "maintenance_interval_s": 3600},
        time={"source": "assume_synced"},
        logging={"level": "warning", "format": "console"},
    )
    gt = GatewayThread(settings).start()
    site = UiSite(gt)
    for role in ("technician", "viewer"):
        r = site.call("POST", "/api/v1/users", {"username": ROLES[role], "password": USER_PASSWORD, "role": role})
        assert r.status == 201, r
    try:
        yield site
    finally:
        site.close()
        gt.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # evil.test: a second *site* for the cross-site request forgery test, resolved to this machine
        b = launch_chromium(p, "--host-resolver-rules=MAP evil.test 127.0.0.1")
        try:
            yield b
        finally:
            b.close()


class Watch:
    """What one browser context did: every request, console error and uncaught exception."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.requests: list[str] = []
        self.errors: list[str] = []
        # error messages a test provoked on purpose (a refused call shows as a failed resource)
        self.allowed: list[str] = []
        # origins a test opened on purpose (the attacker's page)
        self.expected: list[str] = []

    def foreign(self) -> list[str]:
        ok = (self.base + "/", "data:", "blob:", "about:", *self.expected)
        return [u for u in self.requests if not u.startswith(ok) and u != self.base]

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def browse(ui: UiSite, browser: Any) -> Iterator[Callable[..., Any]]:
    """``page = browse("viewer", viewport=PHONE)``: a new context logged in as that role."""
    contexts: list[tuple[Any, Watch]] = []

    def open_page(role: str | None = "admin", *, viewport: dict[str, int] | None = None, **ctx: Any) -> Any:
        context = browser.new_context(viewport=viewport or LAPTOP, **ctx)
        watch = Watch(ui.base)
        context.on("request", lambda req: watch.requests.append(req.url))
        if role is not None:
            context.add_cookies([{"name": "siteward_session", "value": ui.session_cookie(role), "url": ui.base,
                                  "httpOnly": True, "sameSite": "Strict"}])
        page = context.new_page()
        page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: watch.errors.append(f"uncaught: {e}"))
        page.watch = watch  # type: ignore[attr-defined]
        page.set_default_timeout(10_000)
        contexts.append((context, watch))
        return page

    yield open_page
    problems = []
    for context, watch in contexts:
        foreign = watch.foreign()
        if foreign:
            problems.append(f"requests to other hosts: {foreign}")
        if watch.unexpected_errors():
            problems.append(f"browser errors: {watch.unexpected_errors()}")
        context.close()
    assert not problems, "\n".join(problems)


def wait_until(fn: Callable[[], Any], within: float = 5.0, interval: float = 0.05, page: Any = None) -> Any:
    """Poll ``fn``; with ``page``, wait through Playwright so that its events keep being delivered
    (the sync API only dispatches them while the test thread is inside a Playwright call)."""
    deadline = time.monotonic() + within
    while True:
        res = fn()
        if res or time.monotonic() > deadline:
            return res
        if page is not None:
            page.wait_for_timeout(interval * 1000)
        else:
            time.sleep(interval)


def publish(ui: UiSite, device: str, password: str, topic_suffix: str, payload: Any, qos: int = 1) -> None:
    """Publish like a node: its own credentials, QoS 1, wait for the PUBACK (stored by then)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
    c.username_pw_set(device, password)
    c.connect("127.0.0.1", ui.gw.broker.port, keepalive=30)
    c.loop_start()
    try:
        body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        info = c.publish(f"devices/{device}/{topic_suffix}", body, qos=qos)
        info.wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
