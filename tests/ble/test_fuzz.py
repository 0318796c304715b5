"""No byte string crashes the BLE pipeline: random bytes under every routed key, through
the router, every decoder, and the manager's whole hot path."""

from __future__ import annotations

import asyncio
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ble.const import (
    COMPANY_APPLE,
    COMPANY_GOVEE,
    COMPANY_RUUVI,
    UUID_BTHOME_V1,
    UUID_BTHOME_V1_ENCRYPTED,
    UUID_BTHOME_V2,
    UUID_EDDYSTONE,
    UUID_ENVIRONMENTAL_SENSING,
    UUID_QINGPING,
    UUID_SENSORPUSH_V2,
    UUID_XIAOMI_MIBEACON,
)
from gateway.ble.decoders import FAMILIES, make_decoder, prepare
from gateway.ble.decoders.base import Advert
from gateway.ble.manager import BleManager
from gateway.ble.shaping import RateShaper

asyncio.run(prepare())

UUIDS = [UUID_BTHOME_V1, UUID_BTHOME_V1_ENCRYPTED, UUID_BTHOME_V2, UUID_EDDYSTONE, UUID_ENVIRONMENTAL_SENSING,
         UUID_QINGPING, UUID_XIAOMI_MIBEACON, "0000fe2c-0000-1000-8000-00805f9b34fb"]
COMPANIES = [COMPANY_APPLE, COMPANY_GOVEE, COMPANY_RUUVI, 0x0006, 0x0075, 2044, 0xE7C2]
NAMES = [None, "", "sps", "TP357 (1234)", "GVH5075_1234", "SensorPush HT.w 1A2", "s", "ink@IHT-2PB#1", "\x00\xff"]
ADDRESSES = ["A4:C1:38:00:00:01", "AA:BB:CC:DD:EE:FF", "not-an-address", ""]

adverts = st.builds(
    lambda address, name, md, sd, uuids: Advert(address, name, -60, md, sd, uuids, time=time.monotonic()),
    st.sampled_from(ADDRESSES),
    st.sampled_from(NAMES),
    st.dictionaries(st.sampled_from(COMPANIES) | st.integers(0, 0xFFFF), st.binary(max_size=40), max_size=3),
    st.dictionaries(st.sampled_from(UUIDS), st.binary(max_size=40), max_size=3),
    st.lists(st.sampled_from([UUID_SENSORPUSH_V2, UUID_BTHOME_V2]), max_size=2),
)


class _Nothing:
    """Stand-ins for ingest/registry/events/store: this test is about bytes, not storage."""

    def get_cached(self, _: str) -> None:
        return None

    def note_values(self, *_: object) -> None:
        return None


def make_manager() -> BleManager:
    from gateway.metrics import Metrics

    n = _Nothing()
    return BleManager(ingest=n, registry=n, events=n, store=n, metrics=Metrics(),  # type: ignore[arg-type]
                      shaper=RateShaper(60.0), nearby_max=100, nearby_expiry_s=600.0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adverts)
def test_manager_survives_any_advert(adv: Advert) -> None:
    m = make_manager()
    m.handle(adv)
    m.handle(adv)  # the repeated-bytes path too
    assert m.counts["received"] == 2


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(FAMILIES)), adverts, st.binary(min_size=16, max_size=16) | st.none())
def test_every_decoder_survives_any_advert(family: str, adv: Advert, key: bytes | None) -> None:
    dec = make_decoder(family)
    dec.set_bindkey(key)
    try:
        dec.update(adv)
    except Exception as exc:  # the manager would survive it, but a decoder should not raise at all
        # library parsers may still raise on hostile input; record which, so it is a known, guarded case
        assert family not in ("atc", "eddystone"), f"our own decoder {family} raised {exc!r}"


def test_random_bytes_flood_without_hypothesis() -> None:
    import random

    rng = random.Random(42)
    m = make_manager()
    for _ in range(10_000):
        sd = {rng.choice(UUIDS): rng.randbytes(rng.randrange(0, 60))} if rng.random() < 0.7 else {}
        md = {rng.choice(COMPANIES): rng.randbytes(rng.randrange(0, 60))} if rng.random() < 0.5 else {}
        m.handle(Advert(rng.choice(ADDRESSES[:2]), rng.choice(NAMES), -60, md, sd, [], time=time.monotonic()))
    assert m.counts["received"] == 10_000
