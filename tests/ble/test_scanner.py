"""The scanner on real bleak against the fake BlueZ: active and passive scans, devices
appearing, merging and disappearing, the adapter vanishing and returning."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.ble import simulator as sim
from gateway.ble.decoders.base import Advert
from gateway.ble.scanner import Scanner, probe
from tests.ble.conftest import FakeBlueZ, until

A1 = "A4:C1:38:00:00:01"
A2 = "A4:C1:38:00:00:02"


@contextlib.asynccontextmanager
async def running(scanner: Scanner) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scanner.run())
    try:
        await until(lambda: scanner.state == "scanning" or task.done(), what="scanning")
        if task.done():
            task.result()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def collector() -> tuple[list[Advert], Scanner]:
    got: list[Advert] = []
    return got, Scanner(got.append, poll_interval_s=0.05)


async def test_probe_without_bluez(system_bus: str) -> None:
    present, reason = await probe()
    assert not present
    assert "BlueZ not reachable" in reason


async def test_probe_without_adapter(fake_bluez: FakeBlueZ) -> None:
    present, reason = await probe()
    assert (present, reason) == (False, "BlueZ has no Bluetooth adapter")
    await fake_bluez.add_adapter("hci0")
    assert await probe() == (True, "ok")
    assert (await probe("hci1"))[0] is False


async def test_passive_scan_uses_advertisement_monitor(fake_bluez: FakeBlueZ) -> None:
    await fake_bluez.add_adapter("hci0", monitor=True)
    got, scanner = collector()
    async with running(scanner):
        assert scanner.mode_in_use == "passive"
        st = await fake_bluez.state()
        assert len(st["monitors"]) == 1 and not st["discovery"]
        assert await fake_bluez.advertise(A1, name="ATC_000001", service_data=sim.atc1441(A1, 21.5, 45, 90, 2950, 1))
        await until(lambda: got, what="advert")
    adv = got[0]
    assert adv.address == A1 and adv.name == "ATC_000001" and adv.rssi == -60
    assert adv.service_data == sim.atc1441(A1, 21.5, 45, 90, 2950, 1)
    assert (await fake_bluez.state())["monitors"] == []  # unregistered on stop


async def test_active_fallback_when_bluez_has_no_monitor(fake_bluez: FakeBlueZ) -> None:
    await fake_bluez.add_adapter("hci0", monitor=False)
    got, scanner = collector()
    async with running(scanner):
        assert scanner.mode_in_use == "active"
        st = await fake_bluez.state()
        assert st["discovery"] and st["filter"]["Transport"] == "le"
        await fake_bluez.advertise(A1, manufacturer_data=sim.ruuvi_rawv2(A1, 20.0, 40.0, 100_000, 3000, 1))
        await until(lambda: got, what="advert")
    assert got[0].manufacturer_data == sim.ruuvi_rawv2(A1, 20.0, 40.0, 100_000, 3000, 1)
    assert not (await fake_bluez.state())["discovery"]


@pytest.mark.parametrize("mode", ["active", "passive"])
async def test_bluez_merges_data_per_device(fake_bluez: FakeBlueZ, mode: str) -> None:
    """BlueZ keeps every key it has heard from a device: the callback sees the union."""
    await fake_bluez.add_adapter("hci0")
    got: list[Advert] = []
    scanner = Scanner(got.append, mode=mode, poll_interval_s=0.05)  # type: ignore[arg-type]
    async with running(scanner):
        assert scanner.mode_in_use == mode
        await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await until(lambda: len(got) == 1, what="first advert")
        await fake_bluez.advertise(A1, service_data=sim.eddystone_tlm(3000, 20.0, 1, 1))
        await until(lambda: len(got) == 2, what="second advert")
        await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=21.0))
        await until(lambda: len(got) == 3, what="third advert")
    assert set(got[1].service_data) == {*sim.bthome_v2(A1), *sim.eddystone_tlm(3000, 20.0, 1, 1)}
    assert got[2].service_data[next(iter(sim.bthome_v2(A1)))] == next(iter(
        sim.bthome_v2(A1, temperature=21.0).values()))


async def test_devices_appear_and_disappear(fake_bluez: FakeBlueZ) -> None:
    await fake_bluez.add_adapter("hci0")
    got, scanner = collector()
    async with running(scanner):
        await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await fake_bluez.advertise(A2, service_data=sim.bthome_v2(A2, temperature=20.0))
        await until(lambda: {a.address for a in got} == {A1, A2}, what="two devices")
        await fake_bluez.expire(A1)
        got.clear()
        # gone from BlueZ, heard again: InterfacesAdded anew, with only what it sends now
        await fake_bluez.advertise(A1, service_data=sim.eddystone_tlm(3000, 20.0, 1, 1))
        await until(lambda: got, what="re-appearance")
    assert set(got[0].service_data) == set(sim.eddystone_tlm(3000, 20.0, 1, 1))


async def test_adapter_vanishes_and_returns(fake_bluez: FakeBlueZ) -> None:
    await fake_bluez.add_adapter("hci0")
    got, scanner = collector()
    async with running(scanner):
        await fake_bluez.remove_adapter("hci0")
        await until(lambda: scanner.state == "adapter_missing", what="adapter missing")
        assert not await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await fake_bluez.add_adapter("hci0")
        await until(lambda: scanner.state == "scanning", what="scanning again")
        assert scanner.starts == 2
        assert await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await until(lambda: got, what="advert after return")


async def test_restart_and_power_cycle_over_dbus(fake_bluez: FakeBlueZ) -> None:
    await fake_bluez.add_adapter("hci0", monitor=False)
    got, scanner = collector()
    scanner.power_off_s = 0.01
    async with running(scanner):
        await fake_bluez.wedge("hci0", "scan")
        assert not await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await scanner.restart()
        assert await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=20.0))
        await fake_bluez.wedge("hci0", "power")
        await scanner.restart()
        assert not await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=21.0))
        await scanner.power_cycle()
        st = await fake_bluez.state()
        assert (st["power_offs"], st["power_ons"]) == (1, 1) and st["discovery"]
        assert await fake_bluez.advertise(A1, service_data=sim.bthome_v2(A1, temperature=21.0))
        await until(lambda: len(got) == 2, what="adverts after recovery")
