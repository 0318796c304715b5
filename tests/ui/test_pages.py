"""Overview, device list, nearby BLE, alerts, firmware and audit pages, as a technician uses them."""

from __future__ import annotations

import time
from typing import Any

from tests.ui.conftest import UiSite, publish, wait_until


def test_overview_counts_health_and_cloud_link(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("ov-1")
    page = browse("viewer")
    page.goto(f"{ui.base}/")
    o = ui.call("GET", "/api/v1/overview").json
    assert page.inner_text('[data-o="nodes.online"]') == str(o["nodes"]["online"])
    assert page.inner_text('[data-o="sync.state"]') == "not configured"  # [cloud] is off in these tests
    assert page.inner_text('[data-o="health.clock_synchronised"]') == "synchronised"
    for label in ("Version", "Uptime", "Disk free", "Memory available", "CPU temperature"):
        assert page.locator(f"dt:text('{label}')").count() == 1
    assert page.inner_text('[data-o="health.memory_available_bytes"]').endswith("B")
    # a node coming online updates the page without a reload (the device event on the live feed)
    page.wait_for_selector('#live-status[data-state="live"]')
    before = int(page.inner_text('[data-o="nodes.online"]'))
    publish(ui, "ov-1", pw, "telemetry", {"temperature": 1.0})
    page.wait_for_function(f"() => +document.querySelector('[data-o=\"nodes.online\"]').textContent > {before}",
                           timeout=5000)


def test_device_list_search_filter_and_live_rows(ui: UiSite, browse: Any) -> None:
    pw = {d: ui.mint(d) for d in ("list-a", "list-b")}
    ui.call("PATCH", "/api/v1/devices/list-a", {"name": "Kitchen fridge", "location": "Kitchen"})
    ui.call("POST", "/api/v1/devices/list-b/ignore")
    publish(ui, "list-a", pw["list-a"], "telemetry", {"temperature": 4.5, "battery": 88})
    page = browse("viewer")
    page.goto(f"{ui.base}/devices")
    page.wait_for_selector('#live-status[data-state="live"]')
    row = page.locator('tr[data-device="list-a"]')
    assert row.locator('[data-metric-cell="battery"]').inner_text().startswith("88")
    page.fill("#q", "kitchen")
    assert page.is_visible('tr[data-device="list-a"]') and page.is_hidden('tr[data-device="list-b"]')
    assert "q=kitchen" in page.url  # the filtered list can be bookmarked
    page.fill("#q", "")
    page.select_option("#state", "ignored")
    assert page.is_hidden('tr[data-device="list-a"]') and page.is_visible('tr[data-device="list-b"]')
    page.select_option("#state", "")
    # the server applies the same filter to a bookmarked address (and without JavaScript)
    page.goto(f"{ui.base}/devices?q=fridge")
    assert page.is_visible('tr[data-device="list-a"]') and page.is_hidden('tr[data-device="list-b"]')
    page.goto(f"{ui.base}/devices")
    page.wait_for_selector('#live-status[data-state="live"]')
    # live: a new value, and a device never seen before, without reloading
    publish(ui, "list-a", pw["list-a"], "telemetry", {"temperature": 5.25})
    page.wait_for_selector('tr[data-device="list-a"] div[data-metric="temperature"] .v:text("5.25")', timeout=3000)
    new_pw = ui.mint("list-new")
    publish(ui, "list-new", new_pw, "telemetry", {"humidity": 50})
    page.wait_for_selector('tr[data-device="list-new"] div[data-metric="humidity"] .v:text("50")', timeout=3000)
    # its status badge follows the registry (the test's client has already disconnected again)
    want = "online" if ui.gw.registry._devices["list-new"].online else "offline"
    page.wait_for_selector(f'tr[data-device="list-new"] .badge:text-is("{want}")', timeout=3000)


def _advert(ui: UiSite, address: str, t: float) -> None:
    from gateway.ble import simulator as sim
    from gateway.ble.decoders.base import Advert

    sd = sim.bthome_v2(address, temperature=t, humidity=40.0, battery=90)
    adv = Advert(address, "SBHT-003C", -58, {}, sd, list(sd), time=time.monotonic())

    async def hand_over() -> None:
        # the radio edge: what the scanner would hand the manager
        ui.gw.ble.manager.handle(adv)

    ui.run(hand_over())


def test_nearby_ble_adopt_ignore_and_bindkey(ui: UiSite, browse: Any) -> None:
    a, b = "A4:C1:38:00:11:01", "A4:C1:38:00:11:02"
    _advert(ui, a, 21.5)
    _advert(ui, b, 19.0)
    wait_until(lambda: len([s for s in ui.gw.ble.manager.nearby() if s["address"] in (a, b)]) == 2)
    page = browse("technician")
    page.goto(f"{ui.base}/ble")
    row_a = page.locator(f'tr[data-address="{a}"]')
    assert row_a.locator(".badge").first.inner_text() in ("new", "discovered")
    row_a.locator("button:text-is('Adopt')").click()
    page.wait_for_selector(f'tr[data-address="{a}"] .badge:text("adopted")')
    page.locator(f'tr[data-address="{b}"] button:text("Ignore")').click()
    page.click("#confirm-ok")
    page.wait_for_selector(f'tr[data-address="{b}"] .badge:text("ignored")')
    # a bindkey: a wrong one is refused by the browser's pattern, a right one is saved (and never shown)
    row_a = page.locator(f'tr[data-address="{a}"]')
    row_a.locator("summary").click()
    key_input = row_a.locator("input[name=bindkey]")
    key_input.fill("not-a-key")
    assert not key_input.evaluate("el => el.checkValidity()")
    key_input.fill("231d39c1d7cc1ab1aee224cd096db932")
    row_a.locator("button:text('Save key')").click()
    page.wait_for_load_state()
    page.wait_for_selector(f'tr[data-address="{a}"] summary:text("Change bindkey")')
    assert "231d39c1" not in page.content()
    actions = {e.action for e in ui.run(ui.gw.audit.query(action="ble.*", limit=50))}
    assert {"ble.adopt", "ble.ignore", "ble.bindkey_set"} <= actions


def test_alerts_page_rule_alert_and_acknowledgement(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("alert-1")
    publish(ui, "alert-1", pw, "telemetry", {"temperature": 4.0})
    page = browse("technician")
    page.goto(f"{ui.base}/alerts")
    page.click("summary:text('Add a threshold rule')")
    page.fill("#rule-id", "fridge-warm")
    page.select_option("#rule-device", "alert-1")
    page.fill("#rule-metric", "temperature")
    page.fill("#rule-above", "8")
    page.select_option("#rule-sev", "critical")
    page.click("button:text('Add rule')")
    page.wait_for_selector('tr[data-rule="fridge-warm"]')
    publish(ui, "alert-1", pw, "telemetry", {"temperature": 12.5})
    wait_until(lambda: ui.call("GET", "/api/v1/alerts?state=open").json["alerts"], within=10)
    page.reload()
    row = page.locator("tr[data-alert]").first
    assert "critical" in row.inner_text()
    row.locator("button:text('Acknowledge')").click()
    page.wait_for_selector("tr[data-alert] td:text('acknowledged by tess')")
    page.goto(f"{ui.base}/")
    assert int(page.inner_text('[data-o="alerts.critical"]')) >= 1


def test_firmware_page_refuses_a_bad_image_and_shows_why(ui: UiSite, browse: Any, tmp_path: Any) -> None:
    bad = tmp_path / "not-firmware.bin"
    bad.write_bytes(b"\x00" * 4096)
    page = browse("technician")
    page.goto(f"{ui.base}/firmware")
    assert "No firmware uploaded yet." in page.inner_text("#main")
    page.click("summary:text('Upload an image')")
    page.set_input_files("#fw-file", str(bad))
    page.click("button:text('Upload')")
    page.wait_for_selector(".form-status:not(:empty)")
    assert page.inner_text(".form-status")  # the refusal, in words, next to the form
    page.watch.allowed += ["400", "422"]
    assert any(e.action == "ota.firmware_refused" for e in ui.run(ui.gw.audit.query(limit=20)))
    # a viewer sees the page but no upload or flash controls
    viewer = browse("viewer")
    viewer.goto(f"{ui.base}/firmware")
    assert viewer.locator("summary:text('Upload an image')").count() == 0 and viewer.locator("#h-flash").count() == 0


def test_audit_page_filters(ui: UiSite, browse: Any) -> None:
    ui.mint("aud-1")
    ui.call("PATCH", "/api/v1/devices/aud-1", {"location": "roof"}, role="technician")
    page = browse("technician")
    page.goto(f"{ui.base}/audit")
    assert page.locator("#audit tbody tr").count() > 1
    page.fill("#a-actor", "tess")
    page.fill("#a-action", "device.*")
    page.click("button:text('Filter')")
    rows = page.locator("#audit tbody tr")
    assert rows.count() >= 1
    for text in rows.all_inner_texts():
        assert "tess" in text and "device." in text
    assert "location" in rows.first.inner_text() and "roof" in rows.first.inner_text()
    page.fill("#a-since", "not a time")
    page.click("button:text('Filter')")
    assert "since" in page.inner_text(".error")


def test_mangled_page_query_strings_fall_back_to_defaults(ui: UiSite) -> None:
    ui.mint("qs-1")
    html = {"Accept": "text/html"}
    r = ui.call("GET", "/devices?status=bogus&q=" + "x" * 500, role="viewer", headers=html)
    assert r.status == 200 and 'data-device="qs-1"' in r.text
    row_tag = r.text.split('data-device="qs-1"')[1].split(">")[0]
    assert "hidden" not in row_tag
    r = ui.call("GET", "/devices/qs-1?range=year&metric=nosuch", role="viewer", headers=html)
    assert r.status == 200 and 'data-range="24h"' in r.text


def test_overview_says_when_the_sync_process_is_not_running(tmp_path: Any) -> None:
    """Cloud sync configured but its process not reporting: the overview says so, with the backlog."""
    from gateway.settings import load_settings
    from tests.ui.harness import GatewayThread
    from tests.web.conftest import ADMIN_PASSWORD, Client

    settings = load_settings(
        None, gateway={"data_dir": str(tmp_path / "gw"), "id": "gw-sync"}, broker={"port": 0, "host": "127.0.0.1"},
        web={"port": 0, "host": "127.0.0.1", "admin_password": ADMIN_PASSWORD}, cloud={"enabled": True},
        time={"source": "assume_synced"}, logging={"level": "warning", "format": "console"})
    gt = GatewayThread(settings).start()
    try:
        from gateway.models import Reading

        gt.run(gt.gw.db.add_readings([Reading(device="s-1", metric="t", value=1.0, ts=time.time() - 60)]))

        async def overview() -> Any:
            c = Client(gt.base)
            try:
                assert (await c.login("admin", ADMIN_PASSWORD)).status == 200
                page = await c.get("/", headers={"Accept": "text/html"})
                assert "sync not running" in page.text
                return (await c.get("/api/v1/overview")).json
            finally:
                await c.close()

        o = gt.run(overview())
        assert o["sync"]["enabled"] and o["sync"]["state"] == "down"
        assert o["sync"]["backlog"] >= 1 and o["sync"]["backlog_oldest_age_s"] >= 50
    finally:
        gt.stop()
