"""The manager inside a real gateway (real SQLite file, real ingest): nearby list, adoption,
rate shaping, bindkeys, replays, restarts, and what bad input must not do.

Advertisements are handed to the manager exactly as the scanner hands bleak's: this is
the radio edge, the rest is the real thing.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.ble import simulator as sim
from gateway.ble.const import UUID_BTHOME_V2
from gateway.ble.decoders.base import Advert
from gateway.ble.manager import device_id_of
from gateway.models import DeviceState, Source
from gateway.settings import Settings

A = "A4:C1:38:00:00:0A"
B = "A4:C1:38:00:00:0B"
KEY = sim.SIM_BINDKEY


def bthome(address: str = A, *, t: float = 21.0, h: float = 45.0, key: bytes | None = None, counter: int = 0,
           packet_id: int | None = None) -> Advert:
    sd = sim.bthome_v2(address, temperature=t, humidity=h, battery=90, bindkey=key, counter=counter,
                       packet_id=packet_id)
    return Advert(address, "SBHT-003C", -61, {}, sd, list(sd), time=time.monotonic())


@pytest.fixture
def no_bluez(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # no bluetoothd here: BLE must say "unavailable" and the manager still works from the radio edge
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")


@pytest.fixture
def start_gw(make_settings: Callable[..., Settings], no_bluez: None) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def start(**ble: Any) -> AsyncIterator[Any]:
        from gateway.app import Gateway
        from gateway.ble import decoders

        await decoders.prepare()
        async with Gateway(make_settings(ble={"store_interval_s": 3600, **ble})) as gw:
            yield gw

    return start


async def feed(gw: Any, *adverts: Advert) -> None:
    for a in adverts:
        gw.ble.manager.handle(a)
    await gw.ble.manager.drain()


async def stored(gw: Any, address: str, metric: str | None = None) -> list[Any]:
    return await gw.readings.history(device_id_of(address), metric=metric, limit=10_000)


async def test_unavailable_without_bluez_and_gateway_runs(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        h = gw.health.snapshot()["components"]["ble"]
        assert h["state"] == "unavailable" and h["ok"] is True
        assert "BlueZ not reachable" in h["reason"]
        assert gw.broker is not None and gw.web_port


async def test_enabled_on_without_adapter_is_a_fault(start_gw: Callable[..., Any]) -> None:
    async with start_gw(enabled="on") as gw:
        assert gw.health.snapshot()["components"]["ble"]["ok"] is False


async def test_nearby_but_not_stored_until_adopted(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        await feed(gw, bthome(t=21.0))
        [s] = gw.ble.manager.nearby()
        assert (s["address"], s["state"], s["family"], s["rssi"]) == (A, "new", "bthome", -61)
        assert s["values"]["temperature"]["value"] == 21.0 and s["battery"] == 90.0
        assert await stored(gw, A) == []
        assert await gw.registry.get(device_id_of(A)) is None  # not a device until adopted

        await gw.ble.manager.adopt(A, None, actor="test")
        await feed(gw, bthome(t=21.5))
        rows = await stored(gw, A, "temperature")
        assert [r.value for r in rows] == [21.5]
        dev = await gw.registry.get(device_id_of(A))
        assert dev.state == DeviceState.ADOPTED and dev.kind == "ble" and dev.online
        assert dev.attributes["ble_address"] == A
        got = await gw.db.fetchall("SELECT source FROM readings")
        assert {r[0] for r in got} == {2}  # Source.BLE in the store's encoding
        assert Source.BLE.value == "ble"


async def test_rate_shaping_interval_and_threshold(start_gw: Callable[..., Any]) -> None:
    async with start_gw(thresholds={"temperature": 0.5}) as gw:
        await gw.ble.manager.adopt(A, None, actor="test")
        # the same sensor, advertising many times with small wobbles: one row per metric
        await feed(gw, *(bthome(t=21.0 + (i % 3) * 0.1, packet_id=i) for i in range(50)))
        assert [r.value for r in await stored(gw, A, "temperature")] == [21.0]
        # a change beyond the threshold is stored at once
        await feed(gw, bthome(t=22.0, packet_id=51))
        assert sorted(r.value for r in await stored(gw, A, "temperature")) == [21.0, 22.0]
        # the latest value is kept for the live view even when not stored
        await feed(gw, bthome(t=22.2, packet_id=52))
        assert gw.registry.latest(device_id_of(A))["temperature"]["value"] == 22.2
        assert len(await stored(gw, A, "temperature")) == 2


async def test_rate_shaping_interval_elapsed() -> None:
    from gateway.ble.shaping import RateShaper

    shaper = RateShaper(60.0, {"temperature": 1.0})
    v = [("temperature", 20.0, "°C")]
    assert shaper.select("d", v, 1000.0) == v
    assert shaper.select("d", [("temperature", 20.1, "°C")], 1030.0) == []
    assert shaper.select("d", [("temperature", 20.1, "°C")], 1060.0) == [("temperature", 20.1, "°C")]
    # unknown metric: relative threshold (5 %)
    assert shaper.select("d", [("co", 100.0, "ppm")], 0.0) and not shaper.select("d", [("co", 104.0, "ppm")], 1.0)
    assert shaper.select("d", [("co", 106.0, "ppm")], 2.0)


async def test_auto_adopt_policy(start_gw: Callable[..., Any]) -> None:
    async with start_gw(auto_adopt="sensors") as gw:
        beacon = Advert(B, None, -70, sim.ibeacon(bytes(16), 1, 2), {}, [], time=time.monotonic())
        await feed(gw, bthome(t=20.0), beacon)
        assert gw.ble.manager.state_of(A) == "adopted"
        assert gw.ble.manager.state_of(B) == "new"  # beacons only with "all"
        await feed(gw, bthome(t=23.0))
        assert [r.value for r in await stored(gw, A, "temperature")] == [23.0]
        events = await gw.events.query(device=device_id_of(A), kind="ble.adopted")
        assert events and events[0].data["by"] == "policy"


async def test_encrypted_needs_key_then_decodes_wrong_key_reported(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        m = gw.ble.manager
        await feed(gw, bthome(t=20.0, key=KEY, counter=1))
        assert m.get(A)["key_status"] == "needed" and m.get(A)["values"] == {}

        await m.adopt(A, bytes(16), actor="test")  # a wrong key: reported on the sensor, nothing crashes
        await feed(gw, bthome(t=20.0, key=KEY, counter=2), bthome(t=20.1, key=KEY, counter=3))
        assert m.get(A)["key_status"] == "wrong"
        assert await stored(gw, A) == []
        events = await gw.events.query(device=device_id_of(A), kind="ble.bindkey_wrong")
        assert len(events) == 1  # once per episode, not per advertisement

        await m.set_bindkey(A, KEY, actor="test")
        await feed(gw, bthome(t=20.5, key=KEY, counter=4))
        assert m.get(A)["key_status"] == "ok"
        assert [r.value for r in await stored(gw, A, "temperature")] == [20.5]


async def test_replayed_packets_refused_also_after_restart(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        m = gw.ble.manager
        await m.adopt(A, KEY, actor="test")
        old = bthome(t=19.0, key=KEY, counter=10)
        await feed(gw, old, bthome(t=25.0, key=KEY, counter=11))
        assert sorted(r.value for r in await stored(gw, A, "temperature")) == [19.0, 25.0]
        # an attacker (or a confused relay) sends the recorded packet again
        replay = bthome(t=19.0, key=KEY, counter=10)
        await feed(gw, replay)
        assert m.get(A)["replay_refused"] == 1 and m.counts["replay"] == 1
        assert len(await stored(gw, A, "temperature")) == 2
        assert await gw.events.query(device=device_id_of(A), kind="ble.replay")
        await m.flush_counters()
    async with start_gw() as gw:  # same data directory: counters and the sealed key survive
        m = gw.ble.manager
        await feed(gw, bthome(t=19.5, key=KEY, counter=9))
        assert m.get(A)["replay_refused"] == 1
        await feed(gw, bthome(t=26.0, key=KEY, counter=12))
        assert m.get(A)["key_status"] == "ok"
        assert 26.0 in [r.value for r in await stored(gw, A, "temperature")]


async def test_mibeacon_replay_counter(start_gw: Callable[..., Any]) -> None:
    import struct

    def mi(counter: int, value: int) -> Advert:
        sd = sim.mibeacon_v5_encrypted(A, KEY, object_id=0x1004, value=struct.pack("<h", value), counter=counter)
        return Advert(A, "LYWSD03MMC", -60, {}, sd, list(sd), time=time.monotonic())

    async with start_gw() as gw:
        await gw.ble.manager.adopt(A, KEY, actor="test")
        await feed(gw, mi(0x0200, 215), mi(0x0101, 300))  # the extended counter went backwards
        assert [r.value for r in await stored(gw, A, "temperature")] == [21.5]
        assert gw.ble.manager.get(A)["replay_refused"] == 1


async def test_bindkey_is_sealed_on_disk_and_never_logged(start_gw: Callable[..., Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    async with start_gw() as gw:
        await gw.ble.manager.adopt(A, KEY, actor="test")
        path = gw.settings.db_path
        keyfile = gw.settings.data_dir / "ble-bindkeys.key"
        assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
        events = await gw.events.query(device=device_id_of(A), limit=100)
    raw = path.read_bytes() + (path.with_name(path.name + "-wal").read_bytes()
                               if path.with_name(path.name + "-wal").exists() else b"")
    assert KEY not in raw and KEY.hex().encode() not in raw
    with sqlite3.connect(path) as c:
        (sealed,) = c.execute("SELECT bindkey FROM ble_sensors WHERE address = ?", (A,)).fetchone()
    assert sealed and KEY not in sealed
    out = capsys.readouterr()
    assert KEY.hex() not in out.out + out.err
    assert all(KEY.hex() not in str(e.data) for e in events)


async def test_ignore_persists(start_gw: Callable[..., Any]) -> None:
    async with start_gw(auto_adopt="sensors") as gw:
        await gw.ble.manager.ignore(A, actor="test")
        await feed(gw, bthome(t=20.0))
        assert gw.ble.manager.state_of(A) == "ignored"
        assert await stored(gw, A) == []
    async with start_gw(auto_adopt="sensors") as gw:
        await feed(gw, bthome(t=20.0))
        assert gw.ble.manager.state_of(A) == "ignored"
        assert gw.ble.manager.counts["ignored"] == 1


async def test_device_relayed_by_bridge_is_the_same_device(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        # adopted already (e.g. heard through the blegateway MQTT profile): direct adverts count
        await gw.registry.ensure(device_id_of(A), profile="blegateway", state=DeviceState.ADOPTED)
        await feed(gw, bthome(t=20.0))
        assert [r.value for r in await stored(gw, A, "temperature")] == [20.0]


async def test_flood_of_random_addresses_stays_bounded(start_gw: Callable[..., Any]) -> None:
    async with start_gw(nearby_max=200) as gw:
        m = gw.ble.manager
        rng = random.Random(7)
        for i in range(20_000):
            address = sim.random_address(rng)
            if i % 2:
                m.handle(sim.noise_advert(rng, time.monotonic()))
            else:  # plausible sensor adverts from ever-new addresses: the expensive kind
                m.handle(Advert(address, None, -80, {}, sim.bthome_v2(address, temperature=20.0), [UUID_BTHOME_V2],
                                time=time.monotonic()))
        assert len(m) == 200
        assert m.counts["rejected"] == 10_000
        assert len(m.shaper) == 0 and len(m._counters) == 0  # nothing adopted: nothing else grows
        assert m.expire(time.monotonic() + gw.settings.ble.nearby_expiry_s + 1) == 200
        assert len(m) == 0


async def test_truncated_and_oversized_adverts(start_gw: Callable[..., Any]) -> None:
    async with start_gw() as gw:
        m = gw.ble.manager
        await m.adopt(A, KEY, actor="test")
        samples = [
            sim.bthome_v2(A, temperature=20.0, humidity=40.0),
            sim.bthome_v2(A, temperature=20.0, bindkey=KEY, counter=5),
            sim.atc1441(A, 20.0, 40, 90, 3000, 1),
            sim.pvvx(A, 20.0, 40.0, 90, 3000, 1),
            sim.eddystone_tlm(3000, 20.0, 1, 1),
            sim.mibeacon_v5_encrypted(A, KEY, object_id=0x1004, value=b"\x10\x01", counter=3),
        ]
        mfr = [sim.ruuvi_rawv2(A, 20.0, 40.0, 100_000, 3000, 1), sim.govee_h5075(20.0, 40.0, 90),
               sim.ibeacon(bytes(16), 1, 2)]
        for sd in samples:
            (uuid, data), = sd.items()
            for n in range(len(data)):
                m.handle(Advert(A, None, -60, {}, {uuid: data[:n]}, [uuid], time=time.monotonic()))
        for md in mfr:
            (cid, data), = md.items()
            for n in range(len(data)):
                m.handle(Advert(A, "GVH5075_x", -60, {cid: data[:n]}, {}, [], time=time.monotonic()))
        m.handle(Advert(A, None, -60, {}, {UUID_BTHOME_V2: b"\x40" + b"\x02" * 300}, [], time=time.monotonic()))
        assert m.counts["oversized"] == 1
        await m.drain()
        assert gw.supervisor.health()["ble.ingest"]["ok"]
