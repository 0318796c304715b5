"""Ingest: the one path every reading takes, whatever its source.

    message ─ profile match ─ parse/validate ─ Reading[] ─ registry ─ store (commit) ─ live bus

``on_mqtt`` is the broker's ``on_publish`` hook: it returns only after the readings
are committed, so the broker's PUBACK means durable. Bad input raises
:class:`Rejected` inside, which is counted by reason, logged once per burst, and
swallowed (retrying a malformed message cannot fix it). Store failures propagate so
that no acknowledgement is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from gateway.bus import LiveBus
from gateway.clock import Clock
from gateway.devices.commands import Commander
from gateway.devices.registry import DeviceRegistry
from gateway.ingest.errors import Rejected
from gateway.ingest.profiles import Parsed, ProfileSet
from gateway.logs import BurstLogger
from gateway.metrics import Metrics
from gateway.models import Reading, Source, TimeFlag
from gateway.settings import TimeSection
from gateway.store.database import Database
from gateway.store.events import EventLog
from gateway.store.readings import Maintenance

log = structlog.get_logger(__name__)

# readings stamped before this are certainly a node with an unset clock
EARLIEST_PLAUSIBLE_TS = 1_577_836_800.0  # 2020-01-01


class Timekeeper:
    """Decides each reading's timestamp and how far it can be trusted."""

    def __init__(self, clock: Clock, cfg: TimeSection) -> None:
        self.clock = clock
        self.cfg = cfg
        self.synced = clock.synced()

    def stamp(self, node_ts: float | None) -> tuple[float, int]:
        now = self.clock.wall()
        flags = 0 if self.synced else int(TimeFlag.CLOCK_UNSYNCED)
        if node_ts is None:
            return now, flags
        if self.synced:
            ok = now - self.cfg.max_age_s <= node_ts <= now + self.cfg.max_future_skew_s
        else:
            # our own clock is not to be trusted: a node with NTP may know better
            ok = EARLIEST_PLAUSIBLE_TS <= node_ts <= now + 10 * 365 * 86400
        if ok:
            return node_ts, int(TimeFlag.NODE_TS)
        return now, flags | int(TimeFlag.TS_REPLACED)


class ReadingsObserver(Protocol):
    """Told about every batch of readings right after it is committed (ids and readings in order).

    Called synchronously on the ingest path, so it must be quick and must not block: do the
    cheap part inline and hand anything slow to a task of its own. Unlike the live bus
    (which drops updates for slow viewers), observers see every committed reading.
    """

    def __call__(self, ids: list[int], readings: list[Reading], /) -> None: ...


class Ingest:
    def __init__(self, *, db: Database, profiles: ProfileSet, registry: DeviceRegistry, commander: Commander,
                 events: EventLog, bus: LiveBus, metrics: Metrics, timekeeper: Timekeeper,
                 maintenance: Maintenance) -> None:
        self.db = db
        self.profiles = profiles
        self.registry = registry
        self.commander = commander
        self.events = events
        self.bus = bus
        self.metrics = metrics
        self.timekeeper = timekeeper
        self.maintenance = maintenance
        self._burst = BurstLogger(log)
        self._msg_counter = {s: metrics.messages_in.labels(source=s.value) for s in Source}
        self._rejected: dict[str, Any] = {}
        self._observers: list[ReadingsObserver] = []
        # the OTA service listens here: (device, status payload) of every valid OTA status message
        self.ota_observers: list[Callable[[str, dict[str, Any]], Awaitable[None]]] = []

    def add_observer(self, fn: ReadingsObserver) -> None:
        """Have ``fn`` see every committed reading (the rules engine does); see :class:`ReadingsObserver`."""
        self._observers.append(fn)

    def remove_observer(self, fn: ReadingsObserver) -> None:
        self._observers.remove(fn)

    # -- sources ----------------------------------------------------------------------------
    async def on_mqtt(self, principal_device: str | None, topic: str, payload: bytes) -> list[int]:
        self._msg_counter[Source.MQTT].inc()
        try:
            parsed = self.profiles.parse(topic, payload)
            return await self._accept(parsed, Source.MQTT)
        except Rejected as r:
            self.reject(r, device=principal_device, topic=topic)
            return []

    async def ingest_http(self, device_id: str, body: bytes) -> list[int]:
        """``POST /api/v1/devices/{id}/telemetry``: same contract as MQTT telemetry."""
        self._msg_counter[Source.HTTP].inc()
        try:
            native = self.profiles.get("native")
            assert native is not None
            route = next(r for r in native.routes if r.kind == "telemetry")
            parsed = self.profiles.parse_route(native, route, device_id, body)
            return await self._accept(parsed, Source.HTTP)
        except Rejected as r:
            self.reject(r, device=device_id, topic="http")
            raise

    async def ingest_values(self, device_id: str, values: list[tuple[str, float, str]], *, source: Source,
                            profile: str, kind: str = "node", node_ts: float | None = None) -> list[int]:
        """For in-process sources (BLE decoders, simulators) that already hold numbers."""
        self._msg_counter[source].inc()
        parsed = Parsed("telemetry", device_id, profile, values, node_ts)
        try:
            return await self._accept(parsed, source, kind=kind)
        except Rejected as r:
            self.reject(r, device=device_id, topic=source.value)
            raise

    def reject(self, r: Rejected, *, device: str | None, topic: str) -> None:
        c = self._rejected.get(r.reason)
        if c is None:
            c = self._rejected[r.reason] = self.metrics.rejected.labels(reason=r.reason)
        c.inc()
        self._burst.warning(r.reason, "ingest.rejected", reason=r.reason, detail=r.detail, device=device,
                            topic=topic[:120])

    # -- the path -----------------------------------------------------------------------------
    async def _accept(self, p: Parsed, source: Source, kind: str = "node") -> list[int]:
        # Readings are put in the store's queue before the first await, so a device's
        # messages are committed (and numbered, and sent to the cloud) in arrival order
        # even when registering a new device makes this message wait.
        pending: tuple[asyncio.Future[range], list[Reading]] | None = None
        refused: Rejected | None = None
        if p.values and p.kind != "ota_status":
            try:
                pending = self._enqueue(p, source)
            except Rejected as r:
                refused = r
        await self.registry.observe(p.device, profile=p.profile, kind=kind, via=p.via)
        if p.attributes:
            await self.registry.apply_attributes(p.device, p.attributes)
        if p.kind == "ota_status":
            await self.events.record("ota.status", p.device, p.raw or {})
            for observe in self.ota_observers:
                await observe(p.device, p.raw or {})
            return []
        ids: list[int] = []
        if pending is not None:
            fut, readings = pending
            ids = list(await fut)
            self.registry.note_values(p.device, p.values, readings[0].ts)
            for observe in self._observers:
                try:
                    observe(ids, readings)
                except Exception as exc:
                    # the readings are committed: an observer's bug must not turn into a
                    # refused message (the device would resend what is already stored)
                    self._burst.warning("observer_failed", "ingest.observer_failed",
                                        observer=getattr(observe, "__qualname__", "?"), error=repr(exc))
            if self.bus.subscriber_count:
                self.bus.publish_many([
                    {"type": "reading", "id": rid, "device": r.device, "metric": r.metric, "value": r.value,
                     "unit": r.unit, "ts": r.ts, "flags": r.flags}
                    for rid, r in zip(ids, readings, strict=True)])
        if p.kind == "status":
            # the state is stored first, so whoever sees the command confirmed also sees the
            # new state; a refused value must not hide the status itself
            if refused is not None:
                self.reject(refused, device=p.device, topic="status")
            await self._status(p)
        elif refused is not None:
            raise refused
        return ids

    def _enqueue(self, p: Parsed, source: Source) -> tuple[asyncio.Future[range], list[Reading]]:
        ts, flags = self.timekeeper.stamp(p.node_ts)
        if not self.registry.would_accept_readings(p.device):
            self.registry.note_values(p.device, p.values, ts)
            raise Rejected("not_adopted", f"device {p.device} is not adopted; readings are not stored")
        if self.maintenance.refusing:
            self.metrics.dropped.labels(policy="quota_refuse_new").inc(len(p.values))
            raise Rejected("store_full", "store quota reached; policy refuses new readings")
        try:
            readings = [Reading(device=p.device, metric=m, value=v, unit=u, ts=ts, source=source, flags=flags)
                        for m, v, u in p.values]
        except ValidationError as exc:
            err = exc.errors()[0]
            raise Rejected("invalid", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self.db.submit_readings(readings), readings

    async def _status(self, p: Parsed) -> None:
        st = p.status
        if isinstance(st, str):
            word = st.lower()
            if word in ("offline", "lost", "disconnected", "dead"):
                await self.registry.set_online(p.device, False, "status offline (last will)")
            elif word in ("online", "connected", "alive"):
                await self.registry.set_online(p.device, True, "status online")
            return
        if isinstance(st, dict):
            await self.registry.apply_attributes(p.device, {"status": {k: v for k, v in st.items()
                                                                          if k != "cmd_id"}})
            await self.commander.on_status(p.device, st)
