"""Simulated beacons for the development run: real advertisement bytes, fed at the radio edge.

The encoders build each format byte by byte from its published description (BTHome v2
incl. AES-CCM encryption, Xiaomi MiBeacon v5 encrypted, ATC1441, pvvx, RuuviTag RAWv2,
Govee H5075, iBeacon, Eddystone UID/TLM) plus the phone and headset chatter a real
site hears. :class:`BeaconSimulator` hands them to :meth:`BleManager.handle` exactly as
the scanner hands bleak's, so the development run exercises the same decode path; the
tests and the benchmark use the same encoders.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from gateway.ble.const import (
    COMPANY_APPLE,
    COMPANY_GOVEE,
    COMPANY_RUUVI,
    UUID_BTHOME_V2,
    UUID_EDDYSTONE,
    UUID_ENVIRONMENTAL_SENSING,
    UUID_XIAOMI_MIBEACON,
    uuid16,
)
from gateway.ble.decoders.base import Advert

# Well-known development key of the simulated encrypted sensors (not a secret: it is
# printed in docs/ble.md so that the bindkey flow can be tried without hardware).
SIM_BINDKEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
LYWSD03MMC_PRODUCT_ID = 0x055B


def mac_bytes(address: str) -> bytes:
    return bytes.fromhex(address.replace(":", ""))


# -- encoders, one per format ------------------------------------------------------------------
def bthome_v2(address: str, *, temperature: float | None = None, humidity: float | None = None,
              battery: int | None = None, voltage: float | None = None, packet_id: int | None = None,
              bindkey: bytes | None = None, counter: int = 0) -> dict[str, bytes]:
    """BTHome v2 service data (bthome.io/format): objects sorted by id, optionally encrypted."""
    payload = b""
    if packet_id is not None:
        payload += bytes([0x00, packet_id & 0xFF])
    if battery is not None:
        payload += bytes([0x01, battery])
    if temperature is not None:
        payload += b"\x02" + struct.pack("<h", round(temperature * 100))
    if humidity is not None:
        payload += b"\x03" + struct.pack("<H", round(humidity * 100))
    if voltage is not None:
        payload += b"\x0c" + struct.pack("<H", round(voltage * 1000))
    if bindkey is None:
        return {UUID_BTHOME_V2: bytes([0x40]) + payload}
    info = 0x41  # version 2, encrypted
    count = struct.pack("<I", counter)
    nonce = mac_bytes(address) + b"\xd2\xfc" + bytes([info]) + count
    sealed = AESCCM(bindkey, tag_length=4).encrypt(nonce, payload, None)
    return {UUID_BTHOME_V2: bytes([info]) + sealed[:-4] + count + sealed[-4:]}


def mibeacon_v5_encrypted(address: str, bindkey: bytes, *, object_id: int, value: bytes, counter: int,
                          product_id: int = LYWSD03MMC_PRODUCT_ID) -> dict[str, bytes]:
    """Xiaomi MiBeacon v5 with one encrypted object, as LYWSD03MMC stock firmware sends."""
    fc = 0x5000 | 0x0040 | 0x0010 | 0x0008  # version 5, object included, MAC included, encrypted
    frame_cnt = counter & 0xFF
    ext = (counter >> 8) & 0xFFFFFF
    mac_le = mac_bytes(address)[::-1]
    head = struct.pack("<HH", fc, product_id) + bytes([frame_cnt]) + mac_le
    obj = struct.pack("<HB", object_id, len(value)) + value
    ext_b = ext.to_bytes(3, "little")
    nonce = mac_le + struct.pack("<H", product_id) + bytes([frame_cnt]) + ext_b
    sealed = AESCCM(bindkey, tag_length=4).encrypt(nonce, obj, b"\x11")
    return {UUID_XIAOMI_MIBEACON: head + sealed[:-4] + ext_b + sealed[-4:]}


def atc1441(address: str, temperature: float, humidity: int, battery: int, millivolts: int,
            counter: int) -> dict[str, bytes]:
    return {UUID_ENVIRONMENTAL_SENSING: mac_bytes(address) + struct.pack(
        ">hBBHB", round(temperature * 10), humidity, battery, millivolts, counter & 0xFF)}


def pvvx(address: str, temperature: float, humidity: float, battery: int, millivolts: int,
         counter: int, flags: int = 0) -> dict[str, bytes]:
    return {UUID_ENVIRONMENTAL_SENSING: mac_bytes(address)[::-1] + struct.pack(
        "<hHHBBB", round(temperature * 100), round(humidity * 100), millivolts, battery, counter & 0xFF, flags)}


def ruuvi_rawv2(address: str, temperature: float, humidity: float, pressure_pa: int, millivolts: int,
                seq: int, movement: int = 0, tx_power: int = 4) -> dict[int, bytes]:
    power = ((millivolts - 1600) << 5) | ((tx_power + 40) // 2)
    return {COMPANY_RUUVI: struct.pack(">BhHHhhhHBH", 5, round(temperature / 0.005), round(humidity / 0.0025),
                                       pressure_pa - 50000, 4, -4, 1036, power, movement & 0xFF,
                                       seq & 0xFFFF) + mac_bytes(address)}


def govee_h5075(temperature: float, humidity: float, battery: int) -> dict[int, bytes]:
    packed = round(abs(temperature) * 10) * 1000 + round(humidity * 10)
    if temperature < 0:
        packed |= 0x800000
    return {COMPANY_GOVEE: b"\x00" + packed.to_bytes(3, "big") + bytes([battery, 0])}


def ibeacon(uuid: bytes, major: int, minor: int, power: int = -59) -> dict[int, bytes]:
    return {COMPANY_APPLE: b"\x02\x15" + uuid + struct.pack(">HHb", major, minor, power)}


def eddystone_uid(namespace: bytes, instance: bytes, tx_power: int = -20) -> dict[str, bytes]:
    return {UUID_EDDYSTONE: b"\x00" + struct.pack(">b", tx_power) + namespace + instance + b"\x00\x00"}


def eddystone_tlm(millivolts: int, temperature: float, adv_count: int, uptime_s: float) -> dict[str, bytes]:
    return {UUID_EDDYSTONE: b"\x20\x00" + struct.pack(">HhII", millivolts, round(temperature * 256), adv_count,
                                                      round(uptime_s * 10))}


# -- what else a site's radio hears ---------------------------------------------------------------
def random_address(rng: random.Random) -> str:
    # resolvable private addresses: phones rotate them every ~15 minutes
    first = (rng.randrange(256) & 0x3F) | 0x40
    return ":".join(f"{b:02X}" for b in [first, *(rng.randrange(256) for _ in range(5))])


def noise_advert(rng: random.Random, now: float) -> Advert:
    """A phone, laptop, headset or tracker: nothing Siteward decodes."""
    kind = rng.randrange(5)
    md: dict[int, bytes] = {}
    sd: dict[str, bytes] = {}
    uuids: list[str] = []
    if kind == 0:  # iPhone "nearby info"
        md = {COMPANY_APPLE: bytes([0x10, 0x05, rng.randrange(256), 0x18]) + rng.randbytes(3)}
    elif kind == 1:  # Windows "swift pair / CDP"
        md = {0x0006: bytes([0x01, 0x09, 0x20, 0x02]) + rng.randbytes(23)}
    elif kind == 2:  # Android fast pair
        sd = {uuid16(0xFE2C): rng.randbytes(3)}
        uuids = [uuid16(0xFE2C)]
    elif kind == 3:  # Samsung phone / watch
        md = {0x0075: bytes([0x42, 0x04, 0x01]) + rng.randbytes(20)}
    else:  # Find My network accessory
        md = {COMPANY_APPLE: bytes([0x12, 0x19]) + rng.randbytes(25)}
    return Advert(random_address(rng), None, rng.randrange(-100, -40), md, sd, uuids, time=now)


# -- the development simulator ---------------------------------------------------------------------
class SimSensor:
    def __init__(self, index: int, rng: random.Random) -> None:
        self.kind = index % 7
        self.address = f"A4:C1:38:{0x50 + index // 65536 % 16:02X}:{index // 256 % 256:02X}:{index % 256:02X}"
        self.temperature = rng.uniform(18.0, 24.0)
        self.humidity = rng.uniform(35.0, 55.0)
        self.battery = rng.randrange(60, 100)
        self.counter = rng.randrange(1000)
        self.phase = rng.uniform(0, 2 * math.pi)
        self.rng = rng

    def step(self) -> None:
        t = time.time() / 600.0 + self.phase
        self.temperature += 0.05 * (21.0 + 2.0 * math.sin(t) - self.temperature) + self.rng.gauss(0, 0.03)
        self.humidity += 0.05 * (45.0 + 8.0 * math.cos(t) - self.humidity) + self.rng.gauss(0, 0.1)
        self.counter += 1

    def advert(self, now: float) -> Advert:
        a, t, h, c = self.address, round(self.temperature, 2), round(self.humidity, 1), self.counter
        md: dict[int, bytes] = {}
        sd: dict[str, bytes] = {}
        name: str | None = None
        k = self.kind
        if k == 0:
            sd, name = bthome_v2(a, temperature=t, humidity=h, battery=self.battery, packet_id=c), "SBHT-003C"
        elif k == 1:
            sd, name = bthome_v2(a, temperature=t, humidity=h, battery=self.battery, bindkey=SIM_BINDKEY,
                                 counter=c), "BTHome-enc"
        elif k == 2:
            sd, name = atc1441(a, t, round(h), self.battery, 2950, c), "ATC_" + a[-8:].replace(":", "")
        elif k == 3:
            sd, name = pvvx(a, t, h, self.battery, 2950, c), "ATC_" + a[-8:].replace(":", "")
        elif k == 4:
            md, name = ruuvi_rawv2(a, t, h, 100_800, 2950, c), "Ruuvi " + a[-5:].replace(":", "")
        elif k == 5:
            md, name = govee_h5075(t, h, self.battery), "GVH5075_" + a[-5:].replace(":", "")
        else:
            sd = eddystone_tlm(2950, t, c * 10, c * 2.0)
        return Advert(a, name, self.rng.randrange(-90, -50), md, sd, list(sd), time=now)


class BeaconSimulator:
    """``count`` simulated sensors advertising every ``interval_s``, amid phone chatter."""

    def __init__(self, count: int, handle: Callable[[Advert], None], *, interval_s: float = 2.0,
                 noise_per_sensor: int = 4, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self.sensors = [SimSensor(i, self._rng) for i in range(count)]
        self._handle = handle
        self.interval_s = interval_s
        self.noise_per_sensor = noise_per_sensor

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for s in self.sensors:
                s.step()
                self._handle(s.advert(now))
                for _ in range(self.noise_per_sensor):
                    self._handle(noise_advert(self._rng, now))
            await asyncio.sleep(self.interval_s)
