"""The radio: bleak scanning on BlueZ, and the adapter's power over D-Bus.

Passive scanning (BlueZ's AdvertisementMonitor) is preferred: the gateway never asks
sensors for scan responses, which saves their batteries and the 2.4 GHz band. Where
BlueZ does not offer it (older than 5.56, or bluetoothd without ``--experimental``) the
scanner falls back to active discovery. Each advertisement is wrapped and handed to the
manager synchronously inside bleak's D-Bus callback; that call never awaits.

:meth:`Scanner.run` is the supervised task: it keeps a scan going while the adapter is
there, notices the adapter vanishing (USB dongle pulled, ``btmgmt`` reset) and starts
again when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog
from bleak import BleakScanner
from bleak.args.bluez import OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from gateway.ble.const import (
    ADAPTER_POLL_INTERVAL_S,
    PASSIVE_FLAG_PATTERNS,
    POWER_CYCLE_OFF_S,
    SCAN_START_TIMEOUT_S,
    SCAN_STOP_TIMEOUT_S,
)
from gateway.ble.decoders.base import Advert

log = structlog.get_logger(__name__)

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
MONITOR_MANAGER_IFACE = "org.bluez.AdvertisementMonitorManager1"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

ScanMode = Literal["auto", "passive", "active"]
PASSIVE_PATTERNS = [OrPattern(0, AdvertisementDataType.FLAGS, p) for p in PASSIVE_FLAG_PATTERNS]


class BlueZError(Exception):
    pass


class BlueZ:
    """The few D-Bus calls bleak does not make for us: find adapters, read and set Powered."""

    def __init__(self) -> None:
        self._bus: MessageBus | None = None

    async def _connect(self) -> MessageBus:
        if self._bus is None or not self._bus.connected:
            self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        return self._bus

    async def call(self, path: str, iface: str, member: str, signature: str = "", body: list[Any] | None = None,
                   destination: str = BLUEZ) -> list[Any]:
        bus = await self._connect()
        reply = await bus.call(Message(destination=destination, path=path, interface=iface, member=member,
                                       signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise BlueZError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return list(reply.body)

    async def adapters(self) -> dict[str, dict[str, Any]]:
        """Adapter name (hci0) → its Adapter1 properties, unpacked."""
        objs = (await self.call("/", OBJECT_MANAGER_IFACE, "GetManagedObjects"))[0]
        out: dict[str, dict[str, Any]] = {}
        for path, ifaces in objs.items():
            props = ifaces.get(ADAPTER_IFACE)
            if props is not None:
                out[path.rsplit("/", 1)[-1]] = {k: v.value for k, v in props.items()}
                out[path.rsplit("/", 1)[-1]]["_monitor"] = MONITOR_MANAGER_IFACE in ifaces
        return out

    async def powered(self, adapter: str) -> bool:
        """Powered state; raises :class:`BlueZError` if the adapter is not there."""
        got = await self.call(f"/org/bluez/{adapter}", PROPS_IFACE, "Get", "ss", [ADAPTER_IFACE, "Powered"])
        return bool(got[0].value)

    async def set_powered(self, adapter: str, on: bool) -> None:
        await self.call(f"/org/bluez/{adapter}", PROPS_IFACE, "Set", "ssv",
                        [ADAPTER_IFACE, "Powered", Variant("b", on)])

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None


async def probe(adapter: str = "auto") -> tuple[bool, str]:
    """Is there a BlueZ with a usable adapter? ``(present, reason)``, never raises."""
    bz = BlueZ()
    try:
        found = await asyncio.wait_for(bz.adapters(), 5.0)
    except Exception as exc:  # no system bus, no bluetoothd, access denied: all mean "no BLE"
        return False, f"BlueZ not reachable: {type(exc).__name__}: {exc}"[:200]
    finally:
        bz.close()
    if not found:
        return False, "BlueZ has no Bluetooth adapter"
    if adapter != "auto" and adapter not in found:
        return False, f"adapter {adapter} not found (have: {', '.join(sorted(found))})"
    return True, "ok"


def choose_adapter(found: dict[str, dict[str, Any]], wanted: str) -> str | None:
    if wanted != "auto":
        return wanted if wanted in found else None
    central = [a for a in sorted(found) if "central" in found[a].get("Roles", ["central"])]
    powered = [a for a in central if found[a].get("Powered")]
    return (powered or central or [None])[0]


class Scanner:
    def __init__(self, on_advert: Callable[[Advert], None], *, adapter: str = "auto",
                 mode: ScanMode = "auto", poll_interval_s: float = ADAPTER_POLL_INTERVAL_S) -> None:
        self._on_advert = on_advert
        self.poll_interval_s = poll_interval_s
        self.power_off_s = POWER_CYCLE_OFF_S
        self.wanted_adapter = adapter
        self.wanted_mode = mode
        self.adapter: str | None = None
        self.mode_in_use: str | None = None
        self.state = "stopped"
        self.last_error: str | None = None
        self.starts = 0
        self.callback_errors = 0
        self._bleak: BleakScanner | None = None
        self._bluez = BlueZ()
        self._lock = asyncio.Lock()
        self._passive_refused = False

    # -- bleak's callback: runs inside the D-Bus message handler, must not block ----------------
    def _detected(self, device: BLEDevice, adv: AdvertisementData) -> None:
        try:
            self._on_advert(Advert(device.address, adv.local_name, adv.rssi, adv.manufacturer_data,
                                   adv.service_data, adv.service_uuids, time=time.monotonic(),
                                   source=self.adapter or "", tx_power=adv.tx_power))
        except Exception as exc:  # a bug downstream must not stop bleak's dispatch of later adverts
            self.callback_errors += 1
            if self.callback_errors == 1 or self.callback_errors % 1000 == 0:
                log.error("ble.callback_failed", error=f"{type(exc).__name__}: {exc}", count=self.callback_errors)

    # -- control ------------------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            # a restart or power cycle may have finished while this call waited for the lock
            if self.state != "scanning":
                await self._start()

    async def _start(self) -> None:
        found = await self._bluez.adapters()
        adapter = choose_adapter(found, self.wanted_adapter)
        if adapter is None:
            raise BlueZError(f"no adapter {self.wanted_adapter!r}")
        if not found[adapter].get("Powered"):
            log.warning("ble.adapter_powering_on", adapter=adapter)
            await self._bluez.set_powered(adapter, True)
        self.adapter = adapter
        modes: list[Literal["passive", "active"]] = []
        if self.wanted_mode in ("auto", "passive") and found[adapter].get("_monitor") and not self._passive_refused:
            modes.append("passive")
        if self.wanted_mode in ("auto", "active"):
            modes.append("active")
        if not modes:
            raise BlueZError(f"adapter {adapter} offers no AdvertisementMonitor; passive scanning impossible")
        last: Exception | None = None
        for mode in modes:
            bluez: dict[str, Any] = {"adapter": adapter}
            if mode == "passive":
                bluez["or_patterns"] = PASSIVE_PATTERNS
            scanner = BleakScanner(self._detected, scanning_mode=mode, bluez=bluez)  # type: ignore[arg-type]
            try:
                await asyncio.wait_for(scanner.start(), SCAN_START_TIMEOUT_S)
            except (BleakError, TimeoutError) as exc:
                last = exc
                if mode == "passive":
                    # remembered: retrying a refused monitor on every restart only adds delay
                    self._passive_refused = True
                    log.warning("ble.passive_unavailable", adapter=adapter, error=str(exc)[:200],
                                fallback="active" if "active" in modes else None)
                continue
            self._bleak = scanner
            self.mode_in_use = mode
            self.state = "scanning"
            self.last_error = None
            self.starts += 1
            log.info("ble.scanning", adapter=adapter, mode=mode)
            return
        raise BlueZError(f"cannot scan on {adapter}: {last}")

    async def stop(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        scanner, self._bleak = self._bleak, None
        self.state = "stopped"
        if scanner is None:
            return
        try:
            await asyncio.wait_for(scanner.stop(), SCAN_STOP_TIMEOUT_S)
        except Exception as exc:  # adapter gone or powered off: BlueZ refuses, nothing to stop
            log.info("ble.stop_refused", error=f"{type(exc).__name__}: {exc}"[:200])

    async def restart(self) -> None:
        """Watchdog stage 1: stop and start the scan (clears BlueZ's stuck discovery state)."""
        async with self._lock:
            await self._stop()
            await self._start()

    async def power_cycle(self) -> None:
        """Watchdog stage 2: Powered off and on over D-Bus, then scan again."""
        async with self._lock:
            await self._stop()
            adapter = self.adapter or choose_adapter(await self._bluez.adapters(), self.wanted_adapter)
            if adapter is None:
                raise BlueZError("no adapter to power-cycle")
            log.warning("ble.power_cycle", adapter=adapter)
            await self._bluez.set_powered(adapter, False)
            await asyncio.sleep(self.power_off_s)
            await self._bluez.set_powered(adapter, True)
            await self._start()

    async def adapter_present(self) -> bool:
        adapter = self.adapter or self.wanted_adapter
        if adapter == "auto":
            return bool(choose_adapter(await self._bluez.adapters(), "auto"))
        try:
            await self._bluez.powered(adapter)
        except BlueZError:
            return False
        return True

    # -- the supervised task ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                present = await self.adapter_present()
                if self.state == "scanning" and not present:
                    log.error("ble.adapter_vanished", adapter=self.adapter)
                    await self.stop()
                    self.state = "adapter_missing"
                elif self.state != "scanning" and present:
                    try:
                        await self.start()
                    except (BlueZError, BleakError) as exc:
                        self.state = "error"
                        self.last_error = str(exc)[:200]
                        log.error("ble.scan_start_failed", error=self.last_error)
                elif not present:
                    self.state = "adapter_missing"
                await asyncio.sleep(self.poll_interval_s)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop())
            self._bluez.close()
