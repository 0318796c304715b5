"""Bookkeeping: which sensors have been heard, what they said, and which ones are ours.

The scanner (or the simulator) calls :meth:`BleManager.handle` for every advertisement.
That call never awaits and never blocks: it refuses non-sensor traffic by dictionary
look-ups, decodes the rest, updates the bounded "nearby" list, and hands what is worth
storing to a bounded queue that :meth:`BleManager.run` drains into ingest (the same path
MQTT readings take). Everything that can wait (adoption by policy, events, counter
persistence) goes through that queue or the housekeeping loop, never a bare task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from gateway.ble.const import (
    ENCRYPTED_BINDKEY_BYTES,
    MAX_AD_KEYS,
    MAX_ADVERT_BYTES,
    MAX_METRICS_PER_SENSOR,
    MAX_NAME_CHARS,
    MAX_PENDING_WRITES,
    REPLAY_FLUSH_INTERVAL_S,
)
from gateway.ble.decoders import ENCRYPTED_FAMILIES, Advert, Decoded, Decoder, KeyStatus, Router, make_decoder
from gateway.ble.shaping import RateShaper
from gateway.ble.store import BleStore, SensorRecord
from gateway.ingest.errors import Rejected
from gateway.logs import BurstLogger
from gateway.models import DeviceState, Source

if TYPE_CHECKING:
    from gateway.devices.registry import DeviceRegistry
    from gateway.ingest.pipeline import Ingest
    from gateway.metrics import Metrics
    from gateway.store.events import EventLog

log = structlog.get_logger(__name__)

ADDRESS_RE = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
AutoAdopt = Literal["off", "sensors", "all"]
OUTCOMES = ("received", "rejected", "oversized", "decoded", "undecoded", "replay", "decode_error",
            "ignored", "queue_dropped")


class UnknownSensor(LookupError):
    pass


class NotAdopted(LookupError):
    pass


def device_id_of(address: str) -> str:
    """``ble-<mac without colons, lowercase>``: the form the ``blegateway`` profile uses too,
    so a sensor relayed by a bridge and heard directly is one device."""
    return "ble-" + address.replace(":", "").lower()


def normalise_address(address: str) -> str | None:
    a = address.strip().upper().replace("-", ":")
    return a if ADDRESS_RE.match(a) else None


def parse_bindkey(text: str) -> bytes:
    """A bindkey as technicians copy it: 32 hex digits (BTHome, MiBeacon v4/v5) or 24 (legacy)."""
    raw = bytes.fromhex(text.strip())
    if len(raw) not in ENCRYPTED_BINDKEY_BYTES:
        raise ValueError("a bindkey is 32 hexadecimal digits (24 for old MiBeacon sensors)")
    return raw


@dataclass(slots=True)
class Sensor:
    address: str
    device_id: str
    first_seen: float
    last_seen: float
    seen_mono: float
    name: str | None = None
    rssi: int = -127
    family: str | None = None
    model: str | None = None
    adverts: int = 0
    key_status: KeyStatus = KeyStatus.PLAIN
    values: dict[str, tuple[float, str, float]] = field(default_factory=dict)
    presence: dict[str, Any] | None = None
    decoders: dict[str, Decoder] = field(default_factory=dict)
    last_md: dict[int, bytes] | None = None
    last_sd: dict[str, bytes] | None = None
    last_decoded: list[Decoded] = field(default_factory=list)
    replay_refused: int = 0
    decode_errors: int = 0
    reported: set[str] = field(default_factory=set)  # problems already turned into an event


class BleManager:
    def __init__(self, *, ingest: Ingest, registry: DeviceRegistry, events: EventLog, store: BleStore,
                 metrics: Metrics, shaper: RateShaper, nearby_max: int, nearby_expiry_s: float,
                 auto_adopt: AutoAdopt = "off") -> None:
        self._ingest = ingest
        self._registry = registry
        self._events = events
        self._store = store
        self._metrics = metrics
        self.shaper = shaper
        self.nearby_max = nearby_max
        self.nearby_expiry_s = nearby_expiry_s
        self.auto_adopt = auto_adopt
        self.router = Router()
        self._nearby: OrderedDict[str, Sensor] = OrderedDict()
        self._records: dict[str, SensorRecord] = {}
        self._counters: dict[tuple[str, str], int] = {}
        self._dirty_counters: dict[tuple[str, str], int] = {}
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(MAX_PENDING_WRITES)
        self._pending_adopt: set[str] = set()
        self._burst = BurstLogger(log)
        # plain integers on the hot path; exported to Prometheus by housekeeping
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._exported: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.last_advert_mono: float | None = None

    # -- start-up ------------------------------------------------------------------------------
    async def load(self) -> None:
        self._records, self._counters = await self._store.load()
        log.info("ble.loaded", adopted=sum(r.state == "adopted" for r in self._records.values()),
                 ignored=sum(r.state == "ignored" for r in self._records.values()))

    # -- the hot path ----------------------------------------------------------------------------
    def handle(self, adv: Advert) -> None:
        """One advertisement, from bleak's callback or the simulator. Never blocks."""
        counts = self.counts
        counts["received"] += 1
        self.last_advert_mono = adv.time
        families = self.router.route(adv)
        if families is None:
            counts["rejected"] += 1
            return
        if _oversized(adv):
            counts["oversized"] += 1
            return
        address = adv.address
        s = self._nearby.get(address)
        now = time.time()
        if s is None:
            if not ADDRESS_RE.match(address):
                counts["rejected"] += 1
                return
            s = self._add_sensor(address, now, adv.time)
        else:
            self._nearby.move_to_end(address)
        s.rssi = adv.rssi
        s.last_seen = now
        s.seen_mono = adv.time
        s.adverts += 1
        if adv.name:
            s.name = adv.name[:MAX_NAME_CHARS]
        state = self._state(s)
        if state == "ignored":
            counts["ignored"] += 1
            return
        md, sd = adv.manufacturer_data, adv.service_data
        if md == s.last_md and sd == s.last_sd:
            # the same bytes again (sensors repeat each packet): what they said is known
            decoded = s.last_decoded
        else:
            decoded = self._decode(s, adv, families)
            s.last_md, s.last_sd, s.last_decoded = md, sd, decoded
        if not decoded:
            counts["undecoded"] += 1
            return
        counts["decoded"] += 1
        values = self._merge(s, decoded, now)
        if state == "adopted":
            if values:
                self._registry.note_values(s.device_id, values, now)
                shaped = self.shaper.select(s.device_id, values, now)
                if shaped:
                    self._enqueue(("readings", s.device_id, shaped))
        elif self.auto_adopt != "off" and address not in self._pending_adopt and self._auto_adoptable(s):
            self._pending_adopt.add(address)
            self._enqueue(("auto_adopt", address))

    def _decode(self, s: Sensor, adv: Advert, families: tuple[str, ...]) -> list[Decoded]:
        out: list[Decoded] = []
        for fam in families:
            dec = s.decoders.get(fam)
            if dec is None:
                dec = make_decoder(fam)
                rec = self._records.get(s.address)
                if rec is not None and rec.bindkey is not None:
                    dec.set_bindkey(rec.bindkey)
                s.decoders[fam] = dec
            counter = None
            if fam in ENCRYPTED_FAMILIES:
                counter = dec.counter(adv)  # type: ignore[attr-defined]
                if counter is not None:
                    last = self._counters.get((s.address, fam))
                    if last is not None and counter < last:
                        s.replay_refused += 1
                        self.counts["replay"] += 1
                        self._report(s, "replay", {"family": fam, "counter": counter, "last_accepted": last})
                        continue
            try:
                d = dec.update(adv)
            except Exception as exc:  # a library choking on hostile bytes must not stop the radio
                s.decode_errors += 1
                self.counts["decode_error"] += 1
                self._burst.warning(f"decode:{fam}", "ble.decode_error", family=fam, address=s.address,
                                    error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            if d is None:
                continue
            if counter is not None and d.key_status is KeyStatus.OK and d.values:
                # only an authenticated packet may move the counter forward
                self._counters[(s.address, fam)] = counter
                self._dirty_counters[(s.address, fam)] = counter
            if d.key_status is KeyStatus.WRONG:
                self._report(s, "bindkey_wrong", {"family": fam})
            elif d.key_status is KeyStatus.OK:
                s.reported.discard("bindkey_wrong")
            out.append(d)
        return out

    def _merge(self, s: Sensor, decoded: list[Decoded], now: float) -> list[tuple[str, float, str]]:
        values: list[tuple[str, float, str]] = []
        for d in decoded:
            s.family = d.family
            if d.model:
                s.model = d.model[:MAX_NAME_CHARS]
            s.key_status = d.key_status
            if d.presence is not None:
                s.presence = d.presence
            for item in d.values:
                metric = item[0]
                if metric not in s.values and len(s.values) >= MAX_METRICS_PER_SENSOR:
                    continue
                s.values[metric] = (item[1], item[2], now)
                values.append(item)
        return values

    def _state(self, s: Sensor) -> str:
        dev = self._registry.get_cached(s.device_id)
        if dev is not None:
            if dev.state == DeviceState.IGNORED:
                return "ignored"
            if dev.state == DeviceState.ADOPTED:
                return "adopted"
        rec = self._records.get(s.address)
        return rec.state if rec is not None else "new"

    def _auto_adoptable(self, s: Sensor) -> bool:
        if s.key_status not in (KeyStatus.PLAIN, KeyStatus.OK):
            return False
        if s.values:
            return True
        return self.auto_adopt == "all" and s.presence is not None

    def _add_sensor(self, address: str, now: float, mono: float) -> Sensor:
        while len(self._nearby) >= self.nearby_max:
            _, old = self._nearby.popitem(last=False)  # least recently heard goes first
            self._pending_adopt.discard(old.address)
        s = Sensor(address=address, device_id=device_id_of(address), first_seen=now, last_seen=now, seen_mono=mono)
        self._nearby[address] = s
        return s

    def _enqueue(self, job: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counts["queue_dropped"] += 1
            self._burst.warning("queue_full", "ble.queue_full", note="store is behind; BLE readings dropped")

    def _report(self, s: Sensor, problem: str, data: dict[str, Any]) -> None:
        """Tell the technician once per episode, on the sensor and in the event log."""
        if problem in s.reported:
            return
        s.reported.add(problem)
        self._burst.warning(f"{problem}:{s.address}", f"ble.{problem}", address=s.address, **data)
        self._enqueue(("event", f"ble.{problem}", s.device_id, {"address": s.address, **data}))

    # -- the queue's consumer (supervised) ---------------------------------------------------------
    async def run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._do(job)
            finally:
                self._queue.task_done()

    async def _do(self, job: tuple[Any, ...]) -> None:
        kind = job[0]
        if kind == "readings":
            with contextlib.suppress(Rejected):  # counted and logged by ingest
                await self._ingest.ingest_values(job[1], job[2], source=Source.BLE, profile="ble", kind="ble")
        elif kind == "auto_adopt":
            address = job[1]
            try:
                if self.state_of(address) == "new":
                    await self.adopt(address, None, actor="policy")
            finally:
                self._pending_adopt.discard(address)
        elif kind == "event":
            await self._events.record(job[1], job[2], job[3])

    async def drain(self) -> None:
        """Wait until everything queued so far has been handled (tests, shutdown)."""
        await self._queue.join()

    # -- housekeeping (supervised) -----------------------------------------------------------------
    async def run_housekeeping(self, interval_s: float = 2.0) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            self.expire(time.monotonic())
            self.export_metrics()
            if time.monotonic() - last_flush >= REPLAY_FLUSH_INTERVAL_S:
                await self.flush_counters()
                last_flush = time.monotonic()

    def expire(self, now_mono: float) -> int:
        cutoff = now_mono - self.nearby_expiry_s
        gone = [a for a, s in self._nearby.items() if s.seen_mono < cutoff]
        for a in gone:
            del self._nearby[a]
        return len(gone)

    def export_metrics(self) -> None:
        m = self._metrics
        for outcome, n in self.counts.items():
            delta = n - self._exported[outcome]
            if delta:
                m.ble_adverts.labels(outcome=outcome).inc(delta)
                self._exported[outcome] = n
        m.ble_nearby.set(len(self._nearby))

    async def flush_counters(self) -> None:
        if self._dirty_counters:
            batch, self._dirty_counters = self._dirty_counters, {}
            await self._store.save_counters(batch)

    # -- queries -------------------------------------------------------------------------------------
    def seconds_since_advert(self) -> float | None:
        if self.last_advert_mono is None:
            return None
        return max(0.0, time.monotonic() - self.last_advert_mono)

    def adopted_count(self) -> int:
        return sum(1 for r in self._records.values() if r.state == "adopted")

    def state_of(self, address: str) -> str:
        s = self._nearby.get(address)
        if s is not None:
            return self._state(s)
        rec = self._records.get(address)
        return rec.state if rec is not None else "new"

    def nearby(self) -> list[dict[str, Any]]:
        return [self.sensor_json(s) for s in reversed(self._nearby.values())]

    def sensor_json(self, s: Sensor) -> dict[str, Any]:
        rec = self._records.get(s.address)
        battery = s.values.get("battery")
        return {
            "address": s.address,
            "device_id": s.device_id,
            "name": s.name,
            "rssi": s.rssi,
            "family": s.family,
            "model": s.model,
            "state": self._state(s),
            "key_status": s.key_status.value,
            "has_bindkey": bool(rec is not None and rec.bindkey),
            "battery": battery[0] if battery else None,
            "values": {k: {"value": v, "unit": u, "ts": ts} for k, (v, u, ts) in s.values.items()},
            "presence": s.presence,
            "first_seen": s.first_seen,
            "last_seen": s.last_seen,
            "adverts": s.adverts,
            "replay_refused": s.replay_refused,
            "decode_errors": s.decode_errors,
        }

    def get(self, address: str) -> dict[str, Any] | None:
        s = self._nearby.get(address)
        if s is not None:
            return self.sensor_json(s)
        rec = self._records.get(address)
        if rec is None:
            return None
        return {"address": address, "device_id": device_id_of(address), "state": rec.state, "family": rec.family,
                "model": rec.model, "has_bindkey": rec.bindkey is not None, "values": {}, "key_status": None}

    def __len__(self) -> int:
        return len(self._nearby)

    # -- what technicians do ---------------------------------------------------------------------------
    async def adopt(self, address: str, bindkey: bytes | None, *, actor: str) -> dict[str, Any]:
        s = self._nearby.get(address)
        rec = self._records.get(address)
        key = bindkey if bindkey is not None else (rec.bindkey if rec is not None else None)
        new = SensorRecord(address, "adopted", s.family if s else (rec.family if rec else None),
                           s.model if s else (rec.model if rec else None), key)
        await self._store.save(new, reset_counters=bindkey is not None)
        self._records[address] = new
        if bindkey is not None:
            self._apply_bindkey(address, bindkey)
        did = device_id_of(address)
        dev = await self._registry.ensure(did, profile="ble", state=DeviceState.ADOPTED, kind="ble")
        if dev.state != DeviceState.ADOPTED:
            await self._registry.adopt(did)
        attrs: dict[str, Any] = {"ble_address": address}
        if new.model:
            attrs["model"] = new.model
        await self._registry.apply_attributes(did, attrs)
        if dev.name is None and s is not None and (s.name or s.model):
            await self._registry.update_meta(did, name=(s.name or s.model or "")[:MAX_NAME_CHARS])
        await self._events.record("ble.adopted", did, {"address": address, "by": actor,
                                                       "bindkey_given": bindkey is not None})
        log.info("ble.adopted", address=address, by=actor, model=new.model)
        return self.get(address) or {}

    async def ignore(self, address: str, *, actor: str) -> dict[str, Any]:
        rec = self._records.get(address)
        s = self._nearby.get(address)
        new = SensorRecord(address, "ignored", rec.family if rec else (s.family if s else None),
                           rec.model if rec else (s.model if s else None), None)
        await self._store.save(new, reset_counters=True)
        self._records[address] = new
        for k in [k for k in self._counters if k[0] == address]:
            self._counters.pop(k, None)
            self._dirty_counters.pop(k, None)
        did = device_id_of(address)
        if self._registry.get_cached(did) is not None:
            await self._registry.ignore(did)
        self.shaper.forget(did)
        await self._events.record("ble.ignored", did, {"address": address, "by": actor})
        return self.get(address) or {}

    async def set_bindkey(self, address: str, bindkey: bytes, *, actor: str) -> dict[str, Any]:
        """Replace an adopted sensor's bindkey (re-entering the same key also clears a
        replay lock-out after the sensor's counter was reset by a battery change)."""
        if self.state_of(address) != "adopted":
            raise NotAdopted(address)
        rec = self._records.get(address)
        s = self._nearby.get(address)
        new = SensorRecord(address, "adopted", (rec.family if rec else None) or (s.family if s else None),
                           (rec.model if rec else None) or (s.model if s else None), bindkey)
        await self._store.save(new, reset_counters=True)
        self._records[address] = new
        self._apply_bindkey(address, bindkey)
        await self._events.record("ble.bindkey_set", device_id_of(address), {"address": address, "by": actor})
        return self.get(address) or {}

    def _apply_bindkey(self, address: str, bindkey: bytes) -> None:
        # a new key starts a new trust: counters and cached decodes of the old one are void
        for k in [k for k in self._counters if k[0] == address]:
            self._counters.pop(k, None)
            self._dirty_counters.pop(k, None)
        s = self._nearby.get(address)
        if s is not None:
            for dec in s.decoders.values():
                dec.set_bindkey(bindkey)
            s.last_md = s.last_sd = None
            s.last_decoded = []
            s.reported.clear()


def _oversized(adv: Advert) -> bool:
    # One AD structure holds at most 254 bytes; BlueZ merges a device's keys over time, so
    # the number of keys is capped separately (SensorPush alone can accumulate hundreds).
    md, sd = adv.manufacturer_data, adv.service_data
    if len(md) + len(sd) > MAX_AD_KEYS or len(adv.service_uuids) > MAX_AD_KEYS:
        return True
    for v in md.values():
        if len(v) > MAX_ADVERT_BYTES:
            return True
    return any(len(v) > MAX_ADVERT_BYTES for v in sd.values())
