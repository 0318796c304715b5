"""What to send next: the lanes and their order.

Priority, highest first:

1. **results**: answers to cloud commands (queued / rejected), from ``command_queue``;
2. **events**: the events table in id order (alerts, online/offline, command states),
   plus a ``command_result`` for every state change of a command that came from the cloud;
3. **drops**: readings the store quota dropped since last reported (a synthetic event);
4. **live**: readings newer than the start of this connection, as soon as a batch fills
   or ``batch_max_wait_ms`` has passed;
5. **backlog**: every older reading not yet acknowledged, oldest first.

When the gateway corrects timestamps after NTP sync, its clock event goes up followed by
a ``readings.corrected`` event naming the id range that may have left uncorrected (see
docs/cloud-contract.md, "Clock corrections").

The backlog may not use the last ``live_reserved_slots`` of the in-flight window, so
live readings and events never queue behind a long drain. Within a lane ids only
increase, so a device's readings leave in the order they were stored. What is sent
is tracked in :class:`~cloud_sync.ledger.Ledger` ranges; a message that is not
acknowledged before the connection dies goes back to "unclaimed" and is sent again,
counted as a possible duplicate.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cloud_sync.codec import ReadingsCodec, encode_message
from cloud_sync.config import SyncConfig
from cloud_sync.contract import CommandStatus, Lane
from cloud_sync.ledger import Ledger, RangeSet
from cloud_sync.outbox import StoreReader
from cloud_sync.state import Persisted, Snapshot, StateStore
from cloud_sync.status import Figures

log = structlog.get_logger(__name__)

CLOCK_EVENT = "gateway.clock_synchronised"
COMMAND_EVENTS = {"command.sent": CommandStatus.SENT, "command.confirmed": CommandStatus.CONFIRMED,
                  "command.timed_out": CommandStatus.TIMED_OUT, "command.failed": CommandStatus.FAILED}
QUEUE_STATUS = {"queued": CommandStatus.QUEUED, "rejected": CommandStatus.REJECTED, "taken": CommandStatus.SENT}
SEQ_BLOCK = 10_000
# how often the lanes that need a query of their own (results, drops) are looked at
SLOW_CHECK_S = 0.5


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(eq=False)
class Unit:
    """One or more messages acknowledged together, covering one id range of one lane."""

    kind: str  # results | events | drops | readings
    lane: str
    lo: int = 0
    hi: int = -1
    messages: list[Msg] = field(default_factory=list)
    readings: int = 0
    nbytes: int = 0
    attempt: int = 1
    sent_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    def __init__(self, cfg: SyncConfig, reader: StoreReader, state: StateStore, figures: Figures,
                 persisted: Persisted) -> None:
        self.cfg = cfg
        c = cfg.cloud
        self.reader = reader
        self.state = state
        self.figures = figures
        self.codec = ReadingsCodec(cfg.gateway, encoding=c.encoding, max_count=c.batch_max_readings,
                                   max_bytes=c.batch_max_bytes, templates=c.templates)
        self.readings = Ledger(persisted.readings_base, persisted.readings_acked)
        self.events = Ledger(persisted.events_base, persisted.events_acked)
        v = persisted.values
        self.seq = v.get("seq.reserved", 0)
        self.seq_reserved = self.seq
        self.drops_reported = v.get("drops.reported", 0)
        self.sent_hwm = v.get("sent.hwm", 0)
        self.duplicates_resent = v.get("dups.resent", 0)
        figures.duplicates_resent = self.duplicates_resent
        # readings a previous run may have delivered without us recording the PUBACK
        self.resend = RangeSet()
        if self.sent_hwm > self.readings.base:
            self.resend.add(self.readings.base + 1, self.sent_hwm)
            for lo, hi in self.readings.acked:
                self.resend.remove(lo, hi)
        self.events_resend = RangeSet()
        self.inflight: set[Unit] = set()
        self.live_start = 0
        self.live_next = 1
        self._live_seen: float | None = None
        self._replies_inflight: set[str] = set()
        self._drops_inflight = False
        self._next_slow = 0.0
        self.wake_at: float | None = None

    # -- connection boundaries --------------------------------------------------------------
    async def begin_session(self) -> list[Unit]:
        """A new connection: what was in flight goes back (returned); readings up to now are backlog."""
        returned = list(self.inflight)
        for lo, hi in self.readings.release_inflight():
            self.resend.add(lo, hi)
        for lo, hi in self.events.release_inflight():
            self.events_resend.add(lo, hi)
        self.inflight.clear()
        self._replies_inflight.clear()
        self._drops_inflight = False
        self.live_start = await self.reader.head()
        self.live_next = self.live_start + 1
        self._live_seen = None
        self._next_slow = 0.0
        return returned

    def on_broker_ack(self, u: Unit) -> None:
        self.inflight.discard(u)
        if u.kind == "readings" and u.hi >= u.lo:
            self.readings.broker_acked(u.lo, u.hi)
        elif u.kind == "events" and u.hi >= u.lo:
            self.events.broker_acked(u.lo, u.hi)

    def apply_recorded(self, units: Iterable[Unit]) -> Snapshot:
        """Fold acknowledged units into the ledgers; returns what the store must now say."""
        snap = Snapshot()
        touched_r = touched_e = False
        for u in units:
            if u.kind == "readings" and u.hi >= u.lo:
                self.readings.recorded(u.lo, u.hi)
                touched_r = True
            elif u.kind == "events" and u.hi >= u.lo:
                self.events.recorded(u.lo, u.hi)
                touched_e = True
            elif u.kind == "drops":
                self.drops_reported = max(self.drops_reported, u.extra["total"])
                snap.values["drops.reported"] = self.drops_reported
                self._drops_inflight = False
            elif u.kind == "results":
                # still "in flight" until after_record: the store says needs_report until then
                snap.reported.extend(u.extra["reported"])
        if touched_r:
            snap.readings = (self.readings.base, list(self.readings.acked))
        if touched_e:
            snap.events = (self.events.base, list(self.events.acked))
        snap.values["sent.hwm"] = self.sent_hwm
        snap.values["dups.resent"] = self.duplicates_resent
        return snap

    def after_record(self, units: Iterable[Unit]) -> None:
        """The record is written: answers it covers may be looked for again (no double answer)."""
        for u in units:
            if u.kind == "results":
                for qid, _ in u.extra["reported"]:
                    self._replies_inflight.discard(qid)

    # -- choosing -----------------------------------------------------------------------------
    async def next_unit(self, *, backlog_ok: bool) -> Unit | None:
        now = time.monotonic()
        self.wake_at = None
        if now >= self._next_slow:
            self._next_slow = now + SLOW_CHECK_S
            u = await self._results()
            if u is None:
                u = await self._drops()
            if u is not None:
                return self._claimed(u)
        for lane in (self._events, self._live):
            u = await lane(now)
            if u is not None:
                return self._claimed(u)
        if backlog_ok:
            u = await self._backlog()
            if u is not None:
                return self._claimed(u)
        return None

    def _claimed(self, u: Unit) -> Unit:
        if u.kind == "readings" and u.hi >= u.lo:
            self.readings.claim(u.lo, u.hi)
            self.sent_hwm = max(self.sent_hwm, u.hi)
        elif u.kind == "events" and u.hi >= u.lo:
            self.events.claim(u.lo, u.hi)
        self.inflight.add(u)
        u.nbytes = sum(len(m.payload) for m in u.messages)
        return u

    async def _next_seq(self) -> int:
        self.seq += 1
        if self.seq > self.seq_reserved:
            # a restarted process must never reuse a sequence number, so blocks are
            # reserved in the store before use
            self.seq_reserved = self.seq + SEQ_BLOCK
            await self.state.set_values({"seq.reserved": self.seq_reserved})
        return self.seq

    async def _results(self) -> Unit | None:
        rows = [r for r in await self.reader.results_to_report() if r["id"] not in self._replies_inflight]
        if not rows:
            return None
        u = Unit("results", "results", extra={"reported": []})
        for r in rows:
            status = QUEUE_STATUS[r["state"]]
            u.messages.append(self._result_msg(r["id"], status, device=r["device"], command_id=r["command_id"],
                                               error=r["error"]))
            u.extra["reported"].append((r["id"], r["state"]))
            self._replies_inflight.add(r["id"])
        return u

    def _result_msg(self, qid: str | None, status: CommandStatus, *, device: str | None = None,
                    command_id: str | None = None, result: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None) -> Msg:
        body: dict[str, Any] = {"v": 1, "type": "command_result", "gateway": self.cfg.gateway, "id": qid,
                                "status": status.value, "ts": time.time(), "device": device,
                                "command_id": command_id}
        if result is not None:
            body["result"] = result
        if error is not None:
            body["error"] = error
        return Msg(self.cfg.topics.command_result, encode_message(body, self.cfg.cloud.encoding))

    async def _drops(self) -> Unit | None:
        if self._drops_inflight:
            return None
        total = await self.reader.counter("dropped_quota")
        if total <= self.drops_reported:
            return None
        count = total - self.drops_reported
        event = {"id": None, "key": f"{self.cfg.gateway}:readings_dropped:{total}", "ts": time.time(),
                 "device": None, "kind": "readings.dropped",
                 "data": {"count": count, "total": total, "policy": "drop_oldest",
                          "note": "oldest unsynchronised readings deleted because the store reached its quota"}}
        self._drops_inflight = True
        return Unit("drops", "events", messages=[await self._events_msg([event], 1)], extra={"total": total})

    async def _events_msg(self, events: list[dict[str, Any]], attempt: int) -> Msg:
        body = {"v": 1, "type": "events", "gateway": self.cfg.gateway, "seq": await self._next_seq(),
                "sent_at": time.time(), "attempt": attempt, "events": events}
        return Msg(self.cfg.topics.events, encode_message(body, self.cfg.cloud.encoding))

    async def _events(self, now: float) -> Unit | None:
        gap = self.events.next_unclaimed(1, None)
        if gap is None:
            return None
        lo, hi = gap
        rows = await self.reader.events_from(lo, self.cfg.cloud.events_batch_max)
        if hi >= 0:
            rows = [r for r in rows if r[0] <= hi]
        if not rows:
            return None
        u = Unit("events", "events", lo, rows[-1][0])
        if self.events_resend.covered(u.lo, u.hi):
            u.attempt = 2
            self.events_resend.remove(u.lo, u.hi)
        events = []
        for eid, ts, device, kind, data in rows:
            try:
                payload = json.loads(data)
            except ValueError:
                payload = {"unparsable": data[:200]}
            events.append({"id": eid, "key": f"{self.cfg.gateway}:ev:{eid}", "ts": ts, "device": device,
                           "kind": kind, "data": payload if isinstance(payload, dict) else {"value": payload}})
            if kind == CLOCK_EVENT and isinstance(payload, dict):
                fix = self._correction(eid, ts, payload)
                if fix is not None:
                    events.append(fix)
            status = COMMAND_EVENTS.get(kind)
            if status is not None and isinstance(payload, dict) and isinstance(payload.get("id"), str):
                entry = await self.reader.queue_entry_for(payload["id"])
                if entry is not None:
                    res = payload.get("result")
                    u.messages.append(self._result_msg(entry[0], status, device=device or entry[1],
                                                       command_id=payload["id"],
                                                       result=res if isinstance(res, dict) else None))
        u.messages.insert(0, await self._events_msg(events, u.attempt))
        return u

    def _correction(self, eid: int, ts: float, data: dict[str, Any]) -> dict[str, Any] | None:
        """The readings the cloud may hold with the timestamp the gateway has since corrected.

        Every reading read from the store before this event was, at most, the highest id
        claimed so far: any later read sees the corrected rows (the gateway commits the
        correction before it records the event). So the range is [from_id, sent_hwm].
        """
        step, first, n = data.get("step_s"), data.get("from_id"), data.get("corrected")
        if not isinstance(step, int | float) or not isinstance(first, int) or not n or first > self.sent_hwm:
            return None
        return {"id": None, "key": f"{self.cfg.gateway}:readings_corrected:{eid}", "ts": ts, "device": None,
                "kind": "readings.corrected",
                "data": {"first_id": first, "last_id": self.sent_hwm, "step_s": step, "set_flags": 4,
                         "applies_to": "readings with id in [first_id, last_id] received with flag 1 set and "
                                       "flags 4 and 8 clear: add step_s to ts and set flag 4"}}

    async def _live(self, now: float) -> Unit | None:
        head = await self.reader.head()
        if head < self.live_next:
            self._live_seen = None
            return None
        if self._live_seen is None:
            self._live_seen = now
        linger = self.cfg.cloud.batch_max_wait_ms / 1000
        if head - self.live_next + 1 < self.cfg.cloud.batch_max_readings and now - self._live_seen < linger:
            self.wake_at = self._live_seen + linger
            return None
        u = await self._readings_unit(Lane.LIVE, self.live_next, head)
        self.live_next = u.hi + 1
        self._live_seen = None if u.hi >= head else now
        return u

    async def _backlog(self) -> Unit | None:
        gap = self.readings.next_unclaimed(1, self.live_start)
        if gap is None:
            return None
        return await self._readings_unit(Lane.BACKLOG, gap[0], gap[1])

    async def _readings_unit(self, lane: Lane, lo: int, hi: int) -> Unit:
        seq = await self._next_seq()
        attempt = 2 if self.resend.covered(lo, hi) else 1
        codec, reader = self.codec, self.reader
        limit = self.cfg.cloud.batch_max_readings

        def build(c: sqlite3.Connection) -> tuple[bytes | None, int, int, int]:
            rows = reader.rows(c, lo, hi, limit)
            if not rows:
                return None, hi, 0, 0
            full = len(rows) < limit
            batch = codec.encode(rows, reader.series, seq=seq, lane=lane.value, first_id=lo,
                                 last_id=hi if full else None, attempt=attempt, sent_at=time.time())
            last = hi if (full and batch.used == len(rows)) else rows[batch.used - 1][0]
            return batch.payload, last, batch.used, batch.text_bytes

        payload, last, used, _text = await reader.run(build)
        u = Unit("readings", lane.value, lo, last, readings=used, attempt=attempt)
        if payload is not None:
            u.messages.append(Msg(self.cfg.topics.readings_for(lane.value), payload))
        if attempt > 1:
            dup = self.resend.covered(lo, last)
            self.resend.remove(lo, last)
            # counted as re-sent readings: ids in the range that exist and went out again
            self.duplicates_resent += min(dup, used)
            self.figures.duplicates_resent = self.duplicates_resent
        return u
