"""The narrow interface every decoder has: bytes of one advertisement in, typed values out.

Shaped like the Bluetooth-Devices parsers (``update(info)`` → values with units) so the
router treats a library parser and one of our own alike, and the manager never knows
which produced a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

_METRIC_BAD = re.compile(r"[^A-Za-z0-9_.]")


class KeyStatus(StrEnum):
    """What the technician needs to know about a sensor's encryption."""

    PLAIN = "plain"  # not encrypted
    NEEDED = "needed"  # encrypted, no bindkey given yet
    OK = "ok"  # bindkey decrypts
    WRONG = "wrong"  # bindkey given but does not decrypt


class Advert:
    """One advertisement as bleak (or the simulator) reports it.

    A plain slotted class: tens of thousands are made per second, so no validation here;
    the router and decoders treat every field as hostile.
    """

    __slots__ = ("address", "manufacturer_data", "name", "rssi", "service_data", "service_uuids", "source",
                 "time", "tx_power")

    def __init__(self, address: str, name: str | None, rssi: int, manufacturer_data: dict[int, bytes],
                 service_data: dict[str, bytes], service_uuids: list[str], *, time: float,
                 source: str = "hci0", tx_power: int | None = None) -> None:
        self.address = address
        self.name = name
        self.rssi = rssi
        self.manufacturer_data = manufacturer_data
        self.service_data = service_data
        self.service_uuids = service_uuids
        self.time = time
        self.source = source
        self.tx_power = tx_power


@dataclass(slots=True)
class Decoded:
    """What one decoder made of one advertisement."""

    family: str
    model: str | None = None
    values: list[tuple[str, float, str]] = field(default_factory=list)
    key_status: KeyStatus = KeyStatus.PLAIN
    # encrypted formats: the advertisement's counter, checked against replays
    counter: int | None = None
    # beacons (iBeacon, Eddystone UID/URL) say "I am here" rather than measure anything
    presence: dict[str, str | int | float] | None = None


class Decoder(Protocol):
    family: str

    def update(self, adv: Advert) -> Decoded | None:
        """Decode ``adv``; ``None`` when it carries nothing this decoder understands.

        Must not raise for any input: the caller still guards, but a decoder that raises
        on junk is a bug here.
        """
        ...

    def set_bindkey(self, key: bytes | None) -> None: ...


def metric_name(key: str, sub: str | None = None) -> str | None:
    """A storable metric name (``gateway.models.METRIC_PATTERN``) from a library's key."""
    name = _METRIC_BAD.sub("_", f"{key}_{sub}" if sub else key)[:64]
    if not name or not name[0].isalpha():
        return None
    return name
