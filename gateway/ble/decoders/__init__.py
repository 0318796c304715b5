"""Decoding: which decoder an advertisement belongs to, and the decoders themselves.

The :class:`Router` looks only at dictionary keys (service-data UUIDs, company ids) and,
for the few makers that put no fixed id in their adverts, at the local name. Phones,
headphones and laptops miss every table and are refused without a parser ever running:
most of what a site's radio hears is that traffic.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.ble.const import (
    COMPANY_APPLE,
    COMPANY_GOVEE,
    COMPANY_RUUVI,
    IBEACON_PREFIX,
    UUID_BTHOME_V1,
    UUID_BTHOME_V1_ENCRYPTED,
    UUID_BTHOME_V2,
    UUID_EDDYSTONE,
    UUID_ENVIRONMENTAL_SENSING,
    UUID_GOVEE,
    UUID_QINGPING,
    UUID_SENSORPUSH_HT1,
    UUID_SENSORPUSH_V2,
    UUID_XIAOMI_MIBEACON,
)
from gateway.ble.decoders.base import Advert, Decoded, Decoder, KeyStatus
from gateway.ble.decoders.custom import CustomThermometerDecoder, EddystoneDecoder

__all__ = ["ENCRYPTED_FAMILIES", "FAMILIES", "Advert", "Decoded", "Decoder", "KeyStatus", "Router",
           "make_decoder", "prepare"]

_SERVICE_DATA_ROUTES: dict[str, str] = {
    UUID_BTHOME_V2: "bthome",
    UUID_BTHOME_V1: "bthome",
    UUID_BTHOME_V1_ENCRYPTED: "bthome",
    UUID_XIAOMI_MIBEACON: "xiaomi",
    UUID_ENVIRONMENTAL_SENSING: "atc",
    UUID_QINGPING: "qingping",
    UUID_EDDYSTONE: "eddystone",
}
_COMPANY_ROUTES: dict[int, str] = {COMPANY_RUUVI: "ruuvi", COMPANY_GOVEE: "govee"}
_SERVICE_UUID_ROUTES: dict[str, str] = {
    UUID_SENSORPUSH_V2: "sensorpush",
    UUID_SENSORPUSH_HT1: "sensorpush",
    UUID_GOVEE: "govee",
}
# makers whose adverts carry data in the company-id field itself: only the name says who
_NAME_PREFIX_ROUTES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("TP35", "TP39", "TP96", "TP97"), "thermopro"),
    (("GVH", "Govee", "GV5", "H5", "B5", "ihoment"), "govee"),
    (("SensorPush", "HTP.xw", "HT.w", "TC"), "sensorpush"),
)
_INKBIRD_NAMES = frozenset({"sps", "tps", "ibs-p02b", "ith-11-b", "ith-13-b", "ith-21-b", "int-11p-b",
                            "int-11i-b", "idt-34c-b"})
_INKBIRD_PREFIXES = ("ink@", "ibbq", "xbbq")

ENCRYPTED_FAMILIES = frozenset({"bthome", "xiaomi"})


def _library(family: str) -> Decoder:
    # imported on first use: the parser family costs about a second of start-up
    from gateway.ble.decoders.library import IBeaconDecoder, LibraryDecoder, bthome_counter, mibeacon_counter

    if family == "ibeacon":
        return IBeaconDecoder()
    if family == "bthome":
        from bthome_ble import BTHomeBluetoothDeviceData

        return LibraryDecoder(family, BTHomeBluetoothDeviceData, bthome_counter)
    if family == "xiaomi":
        from xiaomi_ble import XiaomiBluetoothDeviceData

        return LibraryDecoder(family, XiaomiBluetoothDeviceData, mibeacon_counter)
    if family == "ruuvi":
        from ruuvitag_ble import RuuvitagBluetoothDeviceData

        return LibraryDecoder(family, RuuvitagBluetoothDeviceData)
    if family == "govee":
        from govee_ble import GoveeBluetoothDeviceData

        return LibraryDecoder(family, GoveeBluetoothDeviceData)
    if family == "inkbird":
        from inkbird_ble import INKBIRDBluetoothDeviceData

        return LibraryDecoder(family, INKBIRDBluetoothDeviceData)
    if family == "thermopro":
        from thermopro_ble import ThermoProBluetoothDeviceData

        return LibraryDecoder(family, ThermoProBluetoothDeviceData)
    if family == "qingping":
        from qingping_ble import QingpingBluetoothDeviceData

        return LibraryDecoder(family, QingpingBluetoothDeviceData)
    if family == "sensorpush":
        from sensorpush_ble import SensorPushBluetoothDeviceData

        return LibraryDecoder(family, SensorPushBluetoothDeviceData)
    raise KeyError(family)


FAMILIES: dict[str, Callable[[], Decoder]] = {
    "eddystone": EddystoneDecoder,
    "atc": CustomThermometerDecoder,
    **{f: (lambda f=f: _library(f)) for f in ("bthome", "xiaomi", "ruuvi", "govee", "inkbird", "thermopro",
                                               "qingping", "sensorpush", "ibeacon")},
}


def make_decoder(family: str) -> Decoder:
    return FAMILIES[family]()


async def prepare() -> None:
    """Load what the parsers need before the first advertisement (off the hot path)."""
    import aiooui

    from gateway.ble.decoders import library  # noqa: F401  (import cost paid here, not on the first advert)

    if not aiooui.is_loaded():
        await aiooui.async_load()  # vendor table ibeacon-ble consults; read with aiofiles


class Router:
    """Which decoder families an advertisement belongs to; ``None`` for everything else."""

    __slots__ = ()

    def route(self, adv: Advert) -> tuple[str, ...] | None:
        found: tuple[str, ...] | None = None
        sd = adv.service_data
        if sd:
            for uuid in sd:
                fam = _SERVICE_DATA_ROUTES.get(uuid)
                if fam is not None and (found is None or fam not in found):
                    found = (fam,) if found is None else (*found, fam)
        md = adv.manufacturer_data
        if md:
            for cid, data in md.items():
                fam = _COMPANY_ROUTES.get(cid)
                if fam is None and cid == COMPANY_APPLE and len(data) >= 23 and data[:2] == IBEACON_PREFIX:
                    fam = "ibeacon"
                if fam is not None and (found is None or fam not in found):
                    found = (fam,) if found is None else (*found, fam)
        if found is not None:
            return found
        if md:
            name = adv.name
            if name:
                if name.lower() in _INKBIRD_NAMES or name.lower().startswith(_INKBIRD_PREFIXES):
                    return ("inkbird",)
                for prefixes, fam in _NAME_PREFIX_ROUTES:
                    if name.startswith(prefixes):
                        return (fam,)
            for uuid in adv.service_uuids:
                fam = _SERVICE_UUID_ROUTES.get(uuid)
                if fam is not None:
                    return (fam,)
        return None
