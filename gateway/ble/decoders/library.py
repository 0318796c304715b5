"""Adapters from the Bluetooth-Devices parser family to our :class:`Decoder` interface.

Each sensor gets its own parser instance: the parsers keep per-device state (encryption
scheme, bindkey, the last manufacturer data they saw, so that BlueZ's merged per-device
data is read as "what changed"). Their licences were checked: bthome-ble, ruuvitag-ble,
thermopro-ble, qingping-ble, sensorpush-ble, inkbird-ble, ibeacon-ble are MIT; xiaomi-ble,
govee-ble, bluetooth-sensor-state-data, sensor-state-data, bluetooth-data-tools are
Apache-2.0 (see docs/ble.md for the whole dependency list).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from habluetooth.models import BluetoothServiceInfoBleak

from gateway.ble.const import (
    COMPANY_APPLE,
    NOISY_LIBRARY_LOGGERS,
    UUID_BTHOME_V1_ENCRYPTED,
    UUID_BTHOME_V2,
    UUID_XIAOMI_MIBEACON,
)
from gateway.ble.decoders.base import Advert, Decoded, KeyStatus, metric_name

for _name in NOISY_LIBRARY_LOGGERS:
    # they log per advertisement (a wrong bindkey: several lines a second, forever); the
    # manager reports such problems once, on the sensor and in the event log
    logging.getLogger(_name).setLevel(logging.CRITICAL)

# the RSSI is tracked on the sensor itself; a packet id is bookkeeping, not a measurement
_SKIP_KEYS = frozenset({"signal_strength", "rssi", "packet_id"})


def _service_info(adv: Advert) -> BluetoothServiceInfoBleak:
    return BluetoothServiceInfoBleak(
        name=adv.name or "", address=adv.address, rssi=adv.rssi, manufacturer_data=adv.manufacturer_data,
        service_data=adv.service_data, service_uuids=adv.service_uuids, source=adv.source,
        device=None, advertisement=None, connectable=False, time=adv.time, tx_power=adv.tx_power,
    )


def _unit(desc: Any) -> str:
    unit = getattr(desc, "native_unit_of_measurement", None) if desc is not None else None
    if unit is None:
        return ""
    return str(getattr(unit, "value", unit))[:16]


def bthome_counter(adv: Advert) -> int | None:
    """BTHome encryption counter (bthome.io: 4 bytes little-endian before the 4-byte MIC)."""
    data = adv.service_data.get(UUID_BTHOME_V2)
    if data is not None:
        if len(data) >= 10 and data[0] & 0x01:
            return int.from_bytes(data[-8:-4], "little")
        return None
    data = adv.service_data.get(UUID_BTHOME_V1_ENCRYPTED)
    if data is not None and len(data) >= 9:
        return int.from_bytes(data[-8:-4], "little")
    return None


def mibeacon_counter(adv: Advert) -> int | None:
    """MiBeacon counter of an encrypted frame: the 1-byte frame counter plus, for v4/v5,
    the 3-byte extended counter before the MIC (together the varying part of the nonce)."""
    data = adv.service_data.get(UUID_XIAOMI_MIBEACON)
    if data is None or len(data) < 5:
        return None
    fc = int.from_bytes(data[0:2], "little")
    if not fc & 0x0008:
        return None
    version = (fc >> 12) & 0x0F
    if version >= 4:
        if len(data) < 12:
            return None
        return data[4] | (int.from_bytes(data[-7:-4], "little") << 8)
    if len(data) < 9:
        return None
    return data[4] | (int.from_bytes(data[-4:-1], "little") << 8)


class LibraryDecoder:
    """A Bluetooth-Devices ``BluetoothData`` parser behind our interface."""

    def __init__(self, family: str, factory: Callable[[], Any],
                 counter: Callable[[Advert], int | None] | None = None) -> None:
        self.family = family
        self._parser = factory()
        self._counter = counter

    def set_bindkey(self, key: bytes | None) -> None:
        setter = getattr(self._parser, "set_bindkey", None)
        if setter is not None:
            setter(key)

    def counter(self, adv: Advert) -> int | None:
        return self._counter(adv) if self._counter is not None else None

    def _key_status(self) -> KeyStatus:
        p = self._parser
        scheme = getattr(p, "encryption_scheme", None)
        if scheme is None or getattr(scheme, "name", "NONE") == "NONE":
            return KeyStatus.PLAIN
        if not getattr(p, "bindkey", None):
            return KeyStatus.NEEDED
        return KeyStatus.WRONG if getattr(p, "decryption_failed", False) else KeyStatus.OK

    def update(self, adv: Advert) -> Decoded | None:
        upd = self._parser.update(_service_info(adv))
        values: list[tuple[str, float, str]] = []
        descs = upd.entity_descriptions
        for dk, sv in upd.entity_values.items():
            if dk.key in _SKIP_KEYS:
                continue
            v = sv.native_value
            if isinstance(v, bool):
                v = float(v)
            elif not isinstance(v, int | float):
                continue
            name = metric_name(dk.key, dk.device_id)
            if name is not None:
                values.append((name, float(v), _unit(descs.get(dk))))
        for dk, bv in upd.binary_entity_values.items():
            if isinstance(bv.native_value, bool):
                name = metric_name(dk.key, dk.device_id)
                if name is not None:
                    values.append((name, 1.0 if bv.native_value else 0.0, ""))
        model = None
        for info in upd.devices.values():
            model = info.model or info.name
            break
        status = self._key_status()
        if not values and status is KeyStatus.PLAIN and model is None:
            return None
        return Decoded(self.family, model, values, key_status=status)


class IBeaconDecoder:
    """ibeacon-ble's parser: presence of an iBeacon (UUID, major, minor, calibrated power)."""

    family = "ibeacon"

    def __init__(self) -> None:
        from ibeacon_ble import iBeaconParser

        self._parser = iBeaconParser()

    def set_bindkey(self, key: bytes | None) -> None:
        return None

    def update(self, adv: Advert) -> Decoded | None:
        if COMPANY_APPLE not in adv.manufacturer_data:
            return None
        got = self._parser.parse(_service_info(adv))
        if got is None:
            return None
        presence: dict[str, str | int | float] = {"uuid": str(got.uuid), "major": got.major, "minor": got.minor,
                                                  "power": got.power}
        if got.distance is not None:
            presence["distance_m"] = got.distance
        return Decoded(self.family, "iBeacon", presence=presence)
