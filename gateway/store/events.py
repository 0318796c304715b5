"""The events table: online/offline, discoveries, commands, OTA results, alerts.

Every event is stored (so the cloud sync's events lane can send it) and published on
the live bus.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from gateway.bus import LiveBus
from gateway.models import Event
from gateway.store.database import Database
from gateway.store.filters import Where


class EventLog:
    def __init__(self, db: Database, bus: LiveBus) -> None:
        self._db = db
        self._bus = bus

    async def record(self, kind: str, device: str | None = None, data: dict[str, Any] | None = None,
                     ts: float | None = None) -> int:
        ts = time.time() if ts is None else ts
        eid = await self._db.write(lambda c: self.insert(c, kind, device, data, ts))
        self.announce(eid, kind, device, data, ts)
        return eid

    @staticmethod
    def insert(c: sqlite3.Connection, kind: str, device: str | None, data: dict[str, Any] | None,
               ts: float) -> int:
        """Write an event inside a caller's write (one commit with the change it reports)."""
        body = json.dumps(data or {}, separators=(",", ":"), default=str)
        cur = c.execute("INSERT INTO events (ts, device_id, kind, data) VALUES (?, ?, ?, ?)",
                        (ts, device, kind, body))
        return int(cur.lastrowid or 0)

    def announce(self, eid: int, kind: str, device: str | None, data: dict[str, Any] | None, ts: float) -> None:
        """Tell live viewers, once the event is committed."""
        self._bus.publish({"type": "event", "id": eid, "ts": ts, "device": device, "kind": kind,
                           "data": data or {}})

    async def query(self, device: str | None = None, kind: str | None = None, since: float | None = None,
                    limit: int = 200) -> list[Event]:
        where = Where()
        where.given("device_id = ?", device)
        where.given("kind = ?", kind)
        where.given("ts >= ?", since)
        sql = "SELECT id, ts, device_id, kind, data FROM events" + where.sql() + " ORDER BY id DESC LIMIT ?"
        rows = await self._db.fetchall(sql, [*where.params, limit])
        return [Event(id=r[0], ts=r[1], device=r[2], kind=r[3], data=json.loads(r[4])) for r in rows]
