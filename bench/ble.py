"""BLE hot path: advertisements per second through decode and rate shaping.

    python -m bench.ble [--seconds S] [--json-only]

Everything is driven through bleak's own BlueZ callback code
(``BleakScannerBlueZDBus._handle_advertising_data``, fed D-Bus-shaped property dicts as
BlueZ sends them), so the figures include what bleak costs per advertisement:

* ``baseline_per_s``: that bleak loop with a callback that does nothing (the reference,
  measured in the same run);
* ``adv_per_s``: Siteward's manager (router, decoders, nearby list, rate shaping, hand-off
  to the ingest queue) on a realistic mix: 80 % phones/laptops/trackers, 20 % sensors of
  nine formats (two of them encrypted), each sensor repeating every packet three times
  as such firmwares do;
* ``adv_with_bleak_per_s``: the two together, bleak's callback code calling Siteward's
  scanner callback, i.e. what one core does per advertisement end to end (less D-Bus
  message parsing, which happens before either);
* ``reject_per_s``: non-sensor advertisements alone, through the manager only (no bleak);
* ``rss_mb_10k_addresses``: process RSS after 10,000 distinct sensor-like addresses were
  heard (the nearby list is capped, so this must stay flat).

One core: everything runs in this one thread. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import struct
import sys
import time
from typing import Any

from bleak.backends.bluezdbus.scanner import BleakScannerBlueZDBus

from gateway.ble import simulator as sim
from gateway.ble.decoders import prepare
from gateway.ble.decoders.base import Advert
from gateway.ble.manager import BleManager
from gateway.ble.shaping import RateShaper
from gateway.ble.store import SensorRecord
from gateway.metrics import Metrics

SENSORS = 200
REPEATS = 3  # sensors repeat each packet; pvvx and BTHome firmwares send each measurement several times
NOISE_FRACTION = 0.8


class _Registry:
    def get_cached(self, _: str) -> None:
        return None

    def note_values(self, *_: object) -> None:
        return None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _props(a: Advert) -> tuple[str, dict[str, Any]]:
    path = "/org/bluez/hci0/dev_" + a.address.replace(":", "_")
    props: dict[str, Any] = {"Address": a.address, "Alias": a.name or a.address, "Adapter": "/org/bluez/hci0",
                             "RSSI": a.rssi, "ManufacturerData": a.manufacturer_data, "ServiceData": a.service_data,
                             "UUIDs": a.service_uuids}
    if a.name:
        props["Name"] = a.name
    return path, props


def _sensor_advert(i: int, step: int, rng: random.Random) -> Advert:
    a = f"A4:C1:38:{i // 65536:02X}:{i // 256 % 256:02X}:{i % 256:02X}"
    t = 20.0 + (step % 50) * 0.05
    h = 40.0 + (step % 30) * 0.1
    kind = i % 9
    md: dict[int, bytes] = {}
    sd: dict[str, bytes] = {}
    name = None
    if kind == 0:
        sd = sim.bthome_v2(a, temperature=t, humidity=h, battery=90, packet_id=step)
    elif kind == 1:
        sd = sim.bthome_v2(a, temperature=t, humidity=h, battery=90, bindkey=sim.SIM_BINDKEY, counter=step)
    elif kind == 2:
        sd = sim.atc1441(a, t, round(h), 90, 2950, step)
    elif kind == 3:
        sd = sim.pvvx(a, t, h, 90, 2950, step)
    elif kind == 4:
        md = sim.ruuvi_rawv2(a, t, h, 100_500, 2950, step)
    elif kind == 5:
        md, name = sim.govee_h5075(t, h, 90), "GVH5075_" + a[-5:].replace(":", "")
    elif kind == 6:
        sd = sim.mibeacon_v5_encrypted(a, sim.SIM_BINDKEY, object_id=0x1004, value=struct.pack("<h", round(t * 10)),
                                       counter=step)
    elif kind == 7:
        sd = sim.eddystone_tlm(2950, t, step * 10, step * 2.0)
    else:
        md = sim.ibeacon(bytes(range(16)), 1, i)
    return Advert(a, name, rng.randrange(-90, -50), md, sd, list(sd), time=0.0)


def build_mix(n: int, rng: random.Random) -> list[Advert]:
    out: list[Advert] = []
    step = 0
    while len(out) < n:
        if rng.random() < NOISE_FRACTION:
            out.append(sim.noise_advert(rng, 0.0))
        else:
            i = rng.randrange(SENSORS)
            step += 1
            adv = _sensor_advert(i, step // (SENSORS * REPEATS), rng)
            out.append(adv)
    return out


def make_manager(nearby_max: int = 1000) -> BleManager:
    r = _Registry()
    m = BleManager(ingest=None, registry=r, events=None, store=None, metrics=Metrics(),  # type: ignore[arg-type]
                   shaper=RateShaper(60.0), nearby_max=nearby_max, nearby_expiry_s=600.0)
    for i in range(SENSORS):
        a = f"A4:C1:38:{i // 65536:02X}:{i // 256 % 256:02X}:{i % 256:02X}"
        m._records[a] = SensorRecord(a, "adopted", bindkey=sim.SIM_BINDKEY)
    return m


def _next_pass(m: BleManager) -> None:
    """Between two passes over the same recorded mix: hand queued readings on (as the
    ingest task would) and forget accepted counters, or the second pass would be a replay
    of the first and be refused (cheaply) rather than decoded."""
    q = m._queue
    while not q.empty():
        q.get_nowait()
    m._counters.clear()
    for s in m._nearby.values():
        s.reported.clear()


def run_bleak(adverts: list[tuple[str, dict[str, Any]]], callback: Any, seconds: float,
              between: Any = None) -> float:
    scanner = BleakScannerBlueZDBus(callback, None, "active", bluez={})
    scanner.seen_devices = {}
    handle = scanner._handle_advertising_data
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for path, props in adverts:
            handle(path, props)
        n += len(adverts)
        if between is not None:
            between()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json_only else (lambda *a: print(*a, file=sys.stderr, flush=True))

    asyncio.run(prepare())
    rng = random.Random(2026)
    mix = build_mix(20_000, rng)
    as_props = [_props(a) for a in mix]
    noise = [a for a in mix if a.address[:8] != "A4:C1:38"]
    sensor_share = 1 - len(noise) / len(mix)

    # reference: bleak's callback machinery with a callback that does nothing
    baseline = run_bleak(as_props, lambda d, a: None, args.seconds)
    say(f"baseline (bare bleak callback loop): {baseline:,.0f} adv/s")

    m = make_manager()

    def ours(device: Any, adv: Any) -> None:  # what gateway.ble.scanner.Scanner._detected does
        m.handle(Advert(device.address, adv.local_name, adv.rssi, adv.manufacturer_data, adv.service_data,
                        adv.service_uuids, time=time.monotonic(), source="hci0", tx_power=adv.tx_power))

    # warm-up: creates the per-sensor decoders once, as a running gateway would have
    for a in mix:
        m.handle(a)
    _next_pass(m)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    while time.perf_counter() < deadline:
        for a in mix:
            m.handle(a)
        n += len(mix)
        _next_pass(m)
    adv_per_s = n / (time.perf_counter() - t0)
    say(f"siteward decode + shaping ({sensor_share:.0%} sensors): {adv_per_s:,.0f} adv/s")
    counts = dict(m.counts)
    with_bleak = run_bleak(as_props, ours, args.seconds, lambda: _next_pass(m))
    say(f"bleak callback + siteward, end to end: {with_bleak:,.0f} adv/s  [{with_bleak / baseline:.0%} of baseline]")

    # rejection alone, through the manager
    mr = make_manager()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    while time.perf_counter() < deadline:
        for a in noise:
            mr.handle(a)
        n += len(noise)
    reject_per_s = n / (time.perf_counter() - t0)
    say(f"rejection of non-sensor traffic (manager only): {reject_per_s:,.0f} adv/s")

    # memory with 10,000 distinct sensor-like addresses
    gc.collect()
    rss_before = _rss_mb()
    mm = make_manager()
    r2 = random.Random(7)
    for _ in range(10):
        for _ in range(1000):
            addr = sim.random_address(r2)
            mm.handle(Advert(addr, None, -80, {}, sim.bthome_v2(addr, temperature=20.0, humidity=40.0),
                             [], time=time.monotonic()))
    for _ in range(2):  # and then 10,000 more: the list is capped, RSS must not follow
        for _ in range(5000):
            addr = sim.random_address(r2)
            mm.handle(Advert(addr, None, -80, {}, sim.bthome_v2(addr, temperature=20.0, humidity=40.0),
                             [], time=time.monotonic()))
    gc.collect()
    rss = _rss_mb()
    say(f"RSS after 10,000 (+10,000) distinct addresses: {rss:.1f} MB (was {rss_before:.1f} MB before; "
        f"nearby list {len(mm)} of cap {mm.nearby_max})")

    result = {
        "adv_per_s": round(adv_per_s),
        "reject_per_s": round(reject_per_s),
        "baseline_per_s": round(baseline),
        "adv_with_bleak_per_s": round(with_bleak),
        "with_bleak_vs_baseline": round(with_bleak / baseline, 3),
        "rss_mb_10k_addresses": round(rss, 1),
        "rss_mb_before": round(rss_before, 1),
        "nearby_after_flood": len(mm),
        "sensor_share": round(sensor_share, 3),
        "counts": counts,
        "seconds": args.seconds,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
