"""Every page on a 360 px phone and on a laptop, light and dark: no sideways scrolling, every form
field labelled, readable contrast (WCAG AA), keyboard operable. Screenshots of each page at both
widths go to test-artifacts/ui/ (git-ignored); two of them are in the README."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Reading
from tests.ui.conftest import UiSite, publish, screenshot
from tests.ui.harness import LAPTOP, PHONE

PAGES = ["/", "/devices", "/devices/pump-1", "/ble", "/alerts", "/firmware", "/export", "/audit", "/users",
         "/account"]

# what the page shows must be readable: WCAG 2.1 AA contrast, computed in the page
_JS = (Path(__file__).parent / "contrast.js").read_text(encoding="utf-8")
CONTRAST_JS = "\n".join(line for line in _JS.splitlines() if not line.startswith("//"))

UNLABELLED_JS = """() => Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(el => el.type !== 'hidden' && !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby'))
  .map(el => el.outerHTML.slice(0, 80))"""


@pytest.fixture(scope="module")
def site_data(ui: UiSite) -> None:
    """Something on every page: a pump with a relay and a week of history, a BLE sensor, an alert."""
    import paho.mqtt.client as mqtt

    pw = ui.mint("pump-1")
    ui.call("PATCH", "/api/v1/devices/pump-1", {"name": "Well pump", "location": "Pump house"})
    now = time.time()
    rows = [Reading(device="pump-1", metric=m, value=v(i), unit=u, ts=now - 7 * 86400 + i * 120)
            for i in range(7 * 720)
            for m, u, v in (("temperature", "°C", lambda i: 18 + 6 * ((i % 720) / 720)),
                            ("power", "W", lambda i: 400 + (i % 50)))]
    ui.run(ui.gw.db.add_readings(rows), timeout=120)
    publish(ui, "pump-1", pw, "telemetry", {"temperature": 21.4, "power": 432, "battery": 96})
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pump-1")
    c.username_pw_set("pump-1", pw)
    c.connect("127.0.0.1", ui.gw.broker.port)
    c.loop_start()
    c.publish("devices/pump-1/status", json.dumps({"relay": "on"}), qos=1).wait_for_publish(10)
    c.publish("devices/pump-1/health", json.dumps({"fw": "1.4.2", "rssi": -61, "uptime": 3600}),
              qos=1).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()
    from tests.ui.test_pages import _advert

    _advert(ui, "A4:C1:38:00:22:01", 22.0)
    ui.call("POST", "/api/v1/rules", {"id": "pump-hot", "kind": "threshold", "target": {"device": "pump-1"},
                                      "metric": "temperature", "above": 30, "severity": "warning"})


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_fits_a_phone_and_a_laptop(ui: UiSite, browse: Any, site_data: None, scheme: str) -> None:
    problems: list[str] = []
    # contrast depends on the scheme, not the width: dark is checked on the phone, where it is used most
    sizes = (("phone", PHONE), ("laptop", LAPTOP)) if scheme == "light" else (("phone", PHONE),)
    for name, viewport in sizes:
        page = browse("admin", viewport=viewport, color_scheme=scheme)
        for path in PAGES:
            page.goto(ui.base + path)
            page.wait_for_load_state("networkidle")
            if path.startswith("/devices/"):
                page.wait_for_selector('#chart[data-state="drawn"]')
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            if wide > viewport["width"]:
                problems.append(f"{scheme} {name} {path}: {wide} px wide, scrolls sideways")
            unlabelled = page.evaluate(UNLABELLED_JS)
            if unlabelled:
                problems.append(f"{path}: fields without a label: {unlabelled}")
            low = page.evaluate(CONTRAST_JS)
            if low:
                problems.append(f"{scheme} {name} {path}: low contrast: {low[:5]}")
            if scheme == "light":
                slug = path.strip("/").replace("/", "-") or "overview"
                screenshot(page, f"{slug}-{name}")
    # the pages anonymous visitors see
    anon = browse(None, viewport=PHONE, color_scheme=scheme)
    anon.goto(ui.base + "/login")
    if anon.evaluate(UNLABELLED_JS) or anon.evaluate(CONTRAST_JS):
        problems.append("login page: unlabelled fields or low contrast")
    if scheme == "light":
        screenshot(anon, "login-phone")
    assert not problems, "\n".join(problems)


def test_keyboard_only(ui: UiSite, browse: Any, site_data: None) -> None:
    page = browse("technician")
    page.goto(f"{ui.base}/devices/pump-1")
    page.wait_for_selector('#chart[data-state="drawn"]')
    # the first Tab reaches the skip link, which jumps over the navigation
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("() => location.hash") == "#main"
    # every control is reachable with Tab: none is taken out of the order or made of a bare div
    assert page.evaluate("""() => Array.from(document.querySelectorAll('a, button, input, select, summary'))
        .filter(e => e.tabIndex < 0 && !e.closest('dialog')).length""") == 0
    assert page.evaluate("() => document.querySelectorAll('[onclick], div[role=button]').length") == 0
    # a focused control shows it
    page.focus('button.range[value="7d"]')
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") != "none"
    with page.expect_response(lambda r: "/series?" in r.url):
        page.keyboard.press("Enter")
    page.wait_for_selector('button.range[value="7d"][aria-pressed="true"]')
    # a command's confirmation: Escape cancels, and focus starts on the confirm button
    page.focus("text=Relay off")
    page.keyboard.press("Enter")
    assert page.is_visible("#confirm")
    assert page.evaluate("() => document.activeElement.id") == "confirm-ok"
    page.keyboard.press("Escape")
    assert not page.is_visible("#confirm")
    assert ui.run(ui.gw.commander.list_for("pump-1", limit=5)) == []


def test_readme_screenshots(ui: UiSite, browse: Any, site_data: None) -> None:
    """The two pictures in the README (copied from test-artifacts/ui/ to docs/img/ by hand)."""
    from tests.ui.harness import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    phone = browse("technician", viewport={"width": 360, "height": 1100})
    phone.goto(f"{ui.base}/devices/pump-1?metric=temperature&range=7d")
    phone.wait_for_selector('#chart[data-state="drawn"]')
    phone.screenshot(path=str(ARTIFACTS / "readme-device-phone.png"))
    laptop = browse("technician")
    laptop.goto(f"{ui.base}/")
    laptop.wait_for_selector('#live-status[data-state="live"]')
    laptop.screenshot(path=str(ARTIFACTS / "readme-overview-laptop.png"))
    assert (ARTIFACTS / "readme-device-phone.png").stat().st_size > 10_000
