"""The whole gateway on the fake BlueZ: scanning, nearby over the web API, adoption with
a bindkey, readings in the store, /healthz and /metrics, the watchdog's escalation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.ble import simulator as sim
from gateway.ble.manager import device_id_of
from gateway.ble.watchdog import Watchdog
from gateway.settings import Settings
from tests.ble.conftest import FakeBlueZ, until
from tests.web.conftest import Site

A = "A4:C1:38:00:00:21"
KEY = sim.SIM_BINDKEY


@contextlib.asynccontextmanager
async def radio_site(make_settings: Callable[..., Settings], **ble: Any) -> AsyncIterator[Site]:
    from gateway.app import Gateway

    settings = make_settings(ble={"adapter_poll_s": 0.05, "store_interval_s": 3600, **ble})
    async with Gateway(settings) as gw:
        site = Site(gw)
        try:
            await until(lambda: gw.ble.scanner is not None and gw.ble.scanner.state == "scanning", what="scanning")
            yield site
        finally:
            await site.close()


async def test_scan_adopt_with_bindkey_store(fake_bluez: FakeBlueZ, make_settings: Callable[..., Settings]) -> None:
    await fake_bluez.add_adapter("hci0")
    async with radio_site(make_settings) as site:
        gw = site.gw
        assert gw.ble.state == "radio" and gw.ble.scanner.mode_in_use == "passive"
        await fake_bluez.advertise(A, name="BTHome-enc", service_data=sim.bthome_v2(
            A, temperature=20.0, humidity=40.0, bindkey=KEY, counter=1))
        admin = await site.admin()
        viewer = await site.user("viewer1", "viewer")

        r = await until(lambda: _nearby(viewer), what="sensor in nearby")
        [s] = r
        assert (s["address"], s["state"], s["key_status"], s["name"]) == (A, "new", "needed", "BTHome-enc")

        r2 = await viewer.post(f"/api/v1/ble/{A}/adopt", {})
        assert r2.status == 403  # viewers look, they do not change the site
        r2 = await admin.post(f"/api/v1/ble/{A.lower()}/adopt", {"bindkey": "00"})
        assert r2.status == 400 and "00" not in r2.text.replace("400", "")
        r2 = await admin.post(f"/api/v1/ble/{A.lower()}/adopt", {"bindkey": KEY.hex()})
        assert r2.status == 200, r2
        assert r2.json["state"] == "adopted" and r2.json["has_bindkey"] and KEY.hex() not in r2.text

        await fake_bluez.advertise(A, name="BTHome-enc", service_data=sim.bthome_v2(
            A, temperature=20.5, humidity=40.0, bindkey=KEY, counter=2))

        async def have_reading() -> bool:
            return bool(await gw.readings.history(device_id_of(A), metric="temperature"))

        await until(have_reading, what="stored reading")
        [row] = await gw.readings.history(device_id_of(A), metric="temperature")
        assert row.value == 20.5

        r3 = await admin.call("PUT", f"/api/v1/ble/{A}/bindkey", json_body={"bindkey": KEY.hex().upper()})
        assert r3.status == 200
        r3 = await admin.call("PUT", "/api/v1/ble/AA:BB:CC:DD:EE:FF/bindkey", json_body={"bindkey": KEY.hex()})
        assert r3.status == 404
        assert (await admin.post("/api/v1/ble/nonsense/ignore")).status == 400

        audit = await site.audit("ble.*")
        assert {e["action"] for e in audit} >= {"ble.adopt", "ble.bindkey_set"}
        assert all(KEY.hex() not in str(e["detail"]).lower() for e in audit)

        health = (await viewer.get("/healthz")).json["components"]["ble"]
        assert health["ok"] and health["adapter"] == "hci0" and health["scan_mode"] == "passive"
        metrics = gw.metrics.render().decode()
        assert "siteward_ble_seconds_since_advert" in metrics


async def _nearby(client: Any) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/ble/nearby")
    assert r.status == 200, r
    return r.json["sensors"]  # type: ignore[no-any-return]


async def test_adapter_vanishing_shows_in_health(fake_bluez: FakeBlueZ, make_settings: Callable[..., Settings]) -> None:
    await fake_bluez.add_adapter("hci0", monitor=False)
    async with radio_site(make_settings) as site:
        gw = site.gw
        assert gw.ble.scanner.mode_in_use == "active"
        await fake_bluez.remove_adapter("hci0")
        await until(lambda: not gw.health.snapshot()["components"]["ble"]["ok"], what="unhealthy")
        assert gw.health.snapshot()["components"]["ble"]["scanner"] == "adapter_missing"
        await fake_bluez.add_adapter("hci0", monitor=False)
        await until(lambda: gw.health.snapshot()["components"]["ble"]["ok"], what="healthy again")
        assert await fake_bluez.advertise(A, service_data=sim.bthome_v2(A, temperature=20.0))
        await until(lambda: gw.ble.manager.get(A) is not None, what="heard after return")


async def test_watchdog_escalates_restart_power_cycle_unhealthy(fake_bluez: FakeBlueZ,
                                                               make_settings: Callable[..., Settings]) -> None:
    await fake_bluez.add_adapter("hci0", monitor=False)
    async with radio_site(make_settings) as site:
        gw = site.gw
        m, scanner = gw.ble.manager, gw.ble.scanner
        scanner.power_off_s = 0.01
        await m.adopt(A, None, actor="test")
        await fake_bluez.advertise(A, service_data=sim.bthome_v2(A, temperature=20.0))
        await until(lambda: m.last_advert_mono is not None, what="first advert")
        # the test drives the clock: the watchdog under test gets explicit "now" values
        wd = Watchdog(m, scanner, gw.metrics, silence_s=60.0, check_interval_s=1.0)
        t0 = m.last_advert_mono
        await fake_bluez.wedge("hci0", "power")  # scanning silently stops, only a power cycle helps

        await wd.check(t0 + 30)
        assert wd.stage == 0
        await wd.check(t0 + 61)
        assert wd.stage == 1  # scan restarted
        calls = (await fake_bluez.state())["calls"]
        assert calls[-1] == "StartDiscovery" and "StopDiscovery" in calls[-4:]
        assert not await fake_bluez.advertise(A, service_data=sim.bthome_v2(A, temperature=20.1))
        await wd.check(t0 + 100)
        assert wd.stage == 1  # the restart gets its own silence period
        await wd.check(t0 + 122)
        assert wd.stage == 2
        st = await fake_bluez.state()
        assert (st["power_offs"], st["power_ons"]) == (1, 1) and st["discovery"]
        # the power cycle cured it; but pretend the cure did not take: the radio stays quiet
        await fake_bluez.wedge("hci0", "power")
        await wd.check(t0 + 183)
        assert wd.stage == 3 and not wd.healthy
        gw.ble.watchdog = wd
        assert gw.health.snapshot()["components"]["ble"]["ok"] is False
        assert 'siteward_ble_watchdog_escalations_total{stage="unhealthy"} 1.0' in gw.metrics.render().decode()
        # it keeps trying; once adverts flow again it is healthy
        await wd.check(t0 + 244)
        assert await fake_bluez.advertise(A, service_data=sim.bthome_v2(A, temperature=20.2))
        await until(lambda: m.last_advert_mono > t0, what="advert after recovery")
        await wd.check(m.last_advert_mono + 1)
        assert wd.stage == 0 and gw.health.snapshot()["components"]["ble"]["ok"]
