"""The device page: live values over MQTT, the history chart, events, commands with their
confirmation, rename/locate, adopt/ignore, remove."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from gateway.models import Reading
from tests.ui.conftest import UiSite, publish, wait_until
from tests.ui.harness import PHONE


def _history(ui: UiSite, device: str, metric: str = "temperature", hours: float = 30, step_s: float = 60) -> None:
    now = time.time()
    n = int(hours * 3600 / step_s)
    start = now - hours * 3600
    rows = [Reading(device=device, metric=metric, value=20 + (i % 60) / 10, unit="°C", ts=start + i * step_s)
            for i in range(n)]
    ui.run(ui.gw.db.add_readings(rows))


def test_reading_published_over_mqtt_appears_on_the_open_page_within_2_s(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("live-1")
    publish(ui, "live-1", pw, "telemetry", {"temperature": 20.0})
    page = browse("viewer")
    page.goto(f"{ui.base}/devices/live-1")
    page.wait_for_selector('#live-status[data-state="live"]')
    value = page.locator('#values div[data-metric="temperature"] .v')
    assert value.inner_text() == "20"
    t0 = time.monotonic()
    publish(ui, "live-1", pw, "telemetry", {"temperature": 23.456, "humidity": 41})
    page.wait_for_function(
        "() => document.querySelector('#values div[data-metric=\"temperature\"] .v').textContent === '23.456'",
        timeout=2000)
    assert time.monotonic() - t0 < 2.0
    # a metric the page did not have yet is added in name order
    page.wait_for_selector('#values div[data-metric="humidity"]', timeout=2000)
    assert page.locator("#values div[data-metric]").evaluate_all("els => els.map(e => e.dataset.metric)") == [
        "humidity", "temperature"]


def test_chart_draws_downsampled_history_and_switches_ranges(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("chart-1")
    publish(ui, "chart-1", pw, "telemetry", {"temperature": 21.0})
    _history(ui, "chart-1", hours=8 * 24, step_s=30)  # 23,040 readings over 8 days
    page = browse("viewer")
    page.goto(f"{ui.base}/devices/chart-1?range=24h")
    page.wait_for_selector('#chart[data-state="drawn"]')
    points = int(page.get_attribute("#chart", "data-points") or 0)
    assert 10 < points <= 2000
    # drawn means pixels: the canvas is not blank
    assert page.evaluate("""() => {
        const c = document.querySelector('#chart canvas'); const d = c.getContext('2d')
          .getImageData(0, 0, c.width, c.height).data;
        let ink = 0; for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) ink++; } return ink; }""") > 500
    assert "readings" in page.inner_text("#chart-status")

    def series_request(click: str) -> dict[str, Any]:
        with page.expect_response(lambda r: "/series?" in r.url) as info:
            page.click(click)
        resp = info.value
        assert resp.status == 200
        page.wait_for_selector('#chart[data-state="drawn"]')
        return resp.json()  # type: ignore[no-any-return]

    week = series_request('button.range[value="7d"]')
    assert week["readings"] > 20_000 and len(week["t"]) <= 2000  # downsampled on the server
    assert "range=7d" in page.url
    hour = series_request('button.range[value="1h"]')
    assert hour["until"] - hour["since"] == 3600 or abs(hour["until"] - hour["since"] - 3600) < 1
    # custom range: two local times, keyboard only
    page.click("#range-custom")
    assert page.is_visible("#custom-range")
    page.fill("#since", time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - 3 * 86400)))
    page.fill("#until", time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - 2 * 86400)))
    with page.expect_response(lambda r: "/series?" in r.url) as info:
        page.focus("#apply-range")
        page.keyboard.press("Enter")
    custom = info.value.json()
    assert 86000 < custom["until"] - custom["since"] < 86800
    assert custom["readings"] > 2000
    page.wait_for_selector('#chart[data-state="drawn"]')
    assert "range=custom" in page.url
    # a wrong custom range is refused in the page, not sent
    page.fill("#since", time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time())))
    page.click("#apply-range")
    assert "start before the end" in page.inner_text("#chart-status")


def test_live_reading_extends_the_chart(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("chart-2")
    publish(ui, "chart-2", pw, "telemetry", {"temperature": 20.0})
    page = browse("technician", viewport=PHONE)
    page.goto(f"{ui.base}/devices/chart-2?range=1h")
    page.wait_for_selector('#chart[data-state="drawn"]')
    page.wait_for_selector('#live-status[data-state="live"]')
    before = int(page.get_attribute("#chart", "data-points") or 0)
    publish(ui, "chart-2", pw, "telemetry", {"temperature": 25.0})
    assert page.wait_for_function(f"() => +document.querySelector('#chart').dataset.points > {before}", timeout=3000)


class Relay:
    """A node's command handler: answers every command on devices/{id}/command with a status that
    echoes its id, like Siteward nodes do, unless told to stay silent."""

    def __init__(self, ui: UiSite, device: str, password: str) -> None:
        import paho.mqtt.client as mqtt

        self.silent = False
        self.received: list[dict[str, Any]] = []
        self.ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
        c.username_pw_set(device, password)

        def on_connect(client: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
            client.subscribe(f"devices/{device}/command", qos=1)
            client.publish(f"devices/{device}/status", json.dumps({"relay": "off"}), qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.ready.set()

        def on_message(client: Any, _u: Any, msg: Any) -> None:
            cmd = json.loads(msg.payload)
            self.received.append(cmd)
            if not self.silent:
                state = cmd.get("args", {}).get("state")
                client.publish(f"devices/{device}/status", json.dumps({"relay": state, "cmd_id": cmd["id"]}), qos=1)

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect("127.0.0.1", ui.gw.broker.port, keepalive=30)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_relay_command_needs_confirmation_and_shows_the_device_confirmed(ui: UiSite, browse: Any) -> None:
    pw = ui.mint("relay-1")
    relay = Relay(ui, "relay-1", pw)
    try:
        wait_until(lambda: ui.gw.registry._devices["relay-1"].attributes.get("status"))
        page = browse("technician")
        page.goto(f"{ui.base}/devices/relay-1")
        page.wait_for_selector('#live-status[data-state="live"]')
        assert page.inner_text("#relay-state") == "off"
        # cancelling the confirmation sends nothing
        page.click("text=Relay on")
        assert page.is_visible("#confirm")
        assert "ON?" in page.inner_text("#confirm-text")
        page.keyboard.press("Escape")
        time.sleep(0.3)
        assert relay.received == []
        # confirming sends it; the device's status confirms it
        page.click("text=Relay on")
        page.click("#confirm-ok")
        page.wait_for_function("() => document.querySelector('#command-status').dataset.state === 'confirmed'",
                               timeout=5000)
        assert "confirmed by the device" in page.inner_text("#command-status")
        assert relay.received[-1]["args"] == {"state": "on"}
        page.wait_for_function("() => document.querySelector('#relay-state').textContent === 'on'", timeout=3000)
        assert page.locator("#commands li").first.locator('[data-role="cmd-state"]').inner_text() == "confirmed"
        assert page.locator('#events li[data-kind="command.confirmed"]').count() >= 1
        # a device that does not answer: the page says so when the command times out
        relay.silent = True
        ui.call("POST", "/api/v1/devices/relay-1/commands", {"command": "relay", "args": {"state": "off"},
                                                              "timeout_s": 0.5}, role="technician")
        page.wait_for_selector('#commands li [data-role="cmd-state"]:text("timed_out")', timeout=5000)
    finally:
        relay.close()


def test_rename_locate_ignore_adopt_and_remove(ui: UiSite, browse: Any) -> None:
    ui.mint("manage-1")
    page = browse("technician")
    page.goto(f"{ui.base}/devices/manage-1")
    page.fill("#dev-name", "Boiler room <b>")
    page.fill("#dev-location", "Basement")
    page.click("#rename-form button[type=submit]")
    page.wait_for_selector("#device-location")
    assert page.inner_text("#device-name") == "Boiler room <b>"  # text, not markup
    assert page.inner_text("#device-location") == "Basement"
    page.click("button:text('Ignore')")
    page.click("#confirm-ok")
    page.wait_for_selector('.meta [data-role="state"]:text("ignored")')
    assert page.locator("#h-control").count() == 0  # no commands to an ignored device
    page.click("button:text('Adopt')")
    page.wait_for_selector('.meta [data-role="state"]:text("adopted")')
    page.click("button:text('Remove')")
    assert "stored readings stay" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")
    page.wait_for_url(f"{ui.base}/devices")
    assert page.locator('tr[data-device="manage-1"]').count() == 0
    actions = [e.action for e in ui.run(ui.gw.audit.query(target="manage-1", limit=20))]
    assert {"device.update", "device.ignore", "device.adopt", "device.remove"} <= set(actions)
    # the page of a removed device is a 404 page, not a JSON error
    resp = page.goto(f"{ui.base}/devices/manage-1")
    assert resp is not None and resp.status == 404
    assert page.inner_text("h1") == "Not found"
    page.watch.allowed.append("404")
