"""Decoder vectors: bytes from the formats' published specifications and examples, with
the values those documents give for them, through the router and the decoder Siteward
uses (library or our own)."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from gateway.ble import simulator as sim
from gateway.ble.const import (
    UUID_BTHOME_V2,
    UUID_EDDYSTONE,
    UUID_ENVIRONMENTAL_SENSING,
    UUID_QINGPING,
    UUID_SENSORPUSH_V2,
    UUID_XIAOMI_MIBEACON,
)
from gateway.ble.decoders import Router, make_decoder, prepare
from gateway.ble.decoders.base import Advert, KeyStatus

ADDR = "A4:C1:38:8D:18:B2"


@pytest.fixture(scope="module", autouse=True)
def _prepared() -> None:
    asyncio.run(prepare())


def adv(md: dict[int, bytes] | None = None, sd: dict[str, bytes] | None = None, name: str | None = None,
        address: str = ADDR, uuids: list[str] | None = None) -> Advert:
    sd = sd or {}
    return Advert(address, name, -60, md or {}, sd, uuids if uuids is not None else list(sd), time=time.monotonic())


def decode(a: Advert, bindkey: bytes | None = None) -> tuple[str, dict[str, tuple[float, str]], object]:
    fams = Router().route(a)
    assert fams is not None and len(fams) == 1, fams
    dec = make_decoder(fams[0])
    if bindkey is not None:
        dec.set_bindkey(bindkey)
    d = dec.update(a)
    assert d is not None
    return fams[0], {m: (v, u) for m, v, u in d.values}, d


# (id, advertisement, family, expected values (metric -> (value, unit)), where the vector comes from)
VECTORS = [
    ("bthome-v2-temp-hum", adv(sd={UUID_BTHOME_V2: bytes.fromhex("4002c40903bf13")}), "bthome",
     {"temperature": (25.0, "°C"), "humidity": (50.55, "%")}, "bthome.io/format example"),
    ("bthome-v2-battery-temp", adv(sd={UUID_BTHOME_V2: bytes.fromhex("4001610233fe")}), "bthome",
     {"battery": (97.0, "%"), "temperature": (-4.61, "°C")}, "bthome.io/format: 0x01 uint8 %, 0x02 sint16 0.01"),
    ("ruuvi-rawv2-valid", adv(md={0x0499: bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")}),
     "ruuvi", {"temperature": (24.3, "°C"), "humidity": (53.49, "%"), "pressure": (1000.44, "hPa"),
               "voltage": (2977.0, "mV"), "movement_counter": (66.0, "")},
     "docs.ruuvi.com data format 5, 'valid data' test vector"),
    ("atc1441", adv(sd={UUID_ENVIRONMENTAL_SENSING: bytes.fromhex("a4c1388d18b200e52f5a0b8d1c")}), "atc",
     {"temperature": (22.9, "°C"), "humidity": (47.0, "%"), "battery": (90.0, "%"), "voltage": (2.957, "V")},
     "atc1441/ATC_MiThermometer README: MAC, int16 BE 0.1 °C, %RH, %bat, mV BE, counter"),
    ("pvvx", adv(sd={UUID_ENVIRONMENTAL_SENSING: bytes.fromhex("b2188d38c1a4fc0888138d0b5a1c04")}), "atc",
     {"temperature": (23.0, "°C"), "humidity": (50.0, "%"), "battery": (90.0, "%"), "voltage": (2.957, "V")},
     "pvvx/ATC_MiThermometer README custom format: MAC LE, int16 0.01 °C, uint16 0.01 %, mV, %bat, cnt, flags"),
    ("mibeacon-v2-temp-hum", adv(sd={UUID_XIAOMI_MIBEACON: bytes.fromhex("5020aa01da217634 38c1a40d1004fe004802"
                                                                         .replace(" ", ""))},
                                 address="A4:C1:38:34:76:21"), "xiaomi",
     {"temperature": (25.4, "°C"), "humidity": (58.4, "%")},
     "MiBeacon object 0x100D (temperature+humidity, int16 0.1 each), unencrypted v2 frame"),
    ("govee-h5075", adv(md={0xEC88: bytes.fromhex("0003a4e56400")}, name="GVH5075_1234"), "govee",
     {"temperature": (23.8, "°C"), "humidity": (82.1, "%"), "battery": (100.0, "%")},
     "H5075 packed 24-bit value: temp = v // 1000 / 10, humidity = v % 1000 / 10"),
    ("inkbird-ibs-th", adv(md={2044: b"\xc7\x12\x00\xc8=V\x06"}, name="sps"), "inkbird",
     {"temperature": (20.44, "°C"), "humidity": (48.07, "%"), "battery": (86.0, "%")},
     "IBS-TH example published with inkbird-ble"),
    ("qingping-cgd1", adv(sd={UUID_QINGPING: b"\x08\x0c4MV4-X\x01\x04 \x01\xb2\x01\x02\x01d"}), "qingping",
     {"temperature": (28.8, "°C"), "humidity": (43.4, "%"), "battery": (100.0, "%")},
     "Qingping CGD1 example published with qingping-ble"),
    ("thermopro-tp357", adv(md={0xE7C2: b"\x00\x2c\x22\x02"}, name="TP357 (2142)"), "thermopro",
     {"temperature": (23.1, "°C"), "humidity": (44.0, "%")},
     "TP35x: bytes 1-2 int16 LE 0.1 °C, byte 3 %RH (company-id field carries data)"),
    ("eddystone-tlm", adv(sd={UUID_EDDYSTONE: bytes.fromhex("20000bb81980000003e800000e10")}), "eddystone",
     {"voltage": (3.0, "V"), "temperature": (25.5, "°C"), "advertisement_count": (1000.0, ""),
      "uptime": (360.0, "s")},
     "Eddystone-TLM spec: VBATT mV BE, TEMP 8.8 fixed, ADV_CNT, SEC_CNT (0.1 s)"),
]


@pytest.mark.parametrize(("name", "advert", "family", "expected", "source"), VECTORS, ids=[v[0] for v in VECTORS])
def test_vector(name: str, advert: Advert, family: str, expected: dict[str, tuple[float, str]], source: str) -> None:
    fam, values, _ = decode(advert)
    assert fam == family
    for metric, (value, unit) in expected.items():
        assert metric in values, f"{name}: {metric} missing from {values}"
        assert values[metric][0] == pytest.approx(value, abs=1e-6), f"{name}/{metric} ({source})"
        assert values[metric][1] == unit


def test_eddystone_uid_and_url_presence() -> None:
    _, _, d = decode(adv(sd={UUID_EDDYSTONE: bytes.fromhex("00e8" + "0102030405060708090a" + "aabbccddeeff" + "0000")}))
    assert d.presence == {"namespace": "0102030405060708090a", "instance": "aabbccddeeff", "tx_power_0m": -24}
    _, _, d = decode(adv(sd={UUID_EDDYSTONE: b"\x10\xeb\x03goo.gl/abc"}))
    assert d.presence == {"url": "https://goo.gl/abc"}
    _, _, d = decode(adv(sd={UUID_EDDYSTONE: b"\x10\xeb\x00example\x07"}))
    assert d.presence == {"url": "http://www.example.com"}


def test_ibeacon_presence() -> None:
    uuid = bytes.fromhex("e2c56db5dffb48d2b060d0f5a71096e0")
    _, _, d = decode(adv(md={0x004C: bytes.fromhex("0215") + uuid + struct.pack(">HHb", 1, 2, -59)}))
    assert d.presence is not None
    assert (d.presence["uuid"], d.presence["major"], d.presence["minor"], d.presence["power"]) == (
        "e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2, -59)


def test_sensorpush_routed_by_service_uuid_and_decoded_by_library() -> None:
    fam, values, _ = decode(adv(md={28932: b"\x03\xe0G"}, uuids=[UUID_SENSORPUSH_V2], address="AA:BB:CC:DD:EE:FF"))
    assert fam == "sensorpush"
    assert {"temperature", "humidity"} <= set(values)


def test_bthome_v2_encrypted_roundtrip_and_key_status() -> None:
    a = adv(sd=sim.bthome_v2(ADDR, temperature=21.37, humidity=44.5, bindkey=sim.SIM_BINDKEY, counter=7))
    _, values, d = decode(a, sim.SIM_BINDKEY)
    assert values["temperature"] == (21.37, "°C") and values["humidity"] == (44.5, "%")
    assert d.key_status is KeyStatus.OK  # type: ignore[attr-defined]
    _, values, d = decode(a)
    assert values == {} and d.key_status is KeyStatus.NEEDED  # type: ignore[attr-defined]
    _, values, d = decode(a, bytes(16))
    assert values == {} and d.key_status is KeyStatus.WRONG  # type: ignore[attr-defined]


def test_mibeacon_v5_encrypted_lywsd03mmc() -> None:
    a = adv(sd=sim.mibeacon_v5_encrypted(ADDR, sim.SIM_BINDKEY, object_id=0x1006, value=struct.pack("<H", 510),
                                         counter=0x0102))
    fam, values, d = decode(a, sim.SIM_BINDKEY)
    assert fam == "xiaomi" and values["humidity"] == (51.0, "%")
    assert d.model == "LYWSD03MMC"  # type: ignore[attr-defined]
    from gateway.ble.decoders.library import mibeacon_counter

    assert mibeacon_counter(a) == 0x0102


def test_router_refuses_phones_and_headsets() -> None:
    import random

    rng = random.Random(1)
    for _ in range(500):
        assert Router().route(sim.noise_advert(rng, 0.0)) is None
    # Apple, but not iBeacon; 0x181A with a foreign MAC is not ATC
    assert Router().route(adv(md={0x004C: bytes.fromhex("1005011800aabb")})) is None
    assert make_decoder("atc").update(adv(sd=sim.atc1441("11:22:33:44:55:66", 20.0, 40, 90, 3000, 1))) is None
