"""Queries and upkeep of the readings table (history + outbox).

Retention deletes only readings that every outbox consumer (cloud sync) has
acknowledged and that are older than the retention period. When the database
outgrows its quota, the policy decides: ``drop_oldest`` deletes the oldest readings
even if unsynced (counted, persisted, reported upward), ``refuse_new`` keeps what is
stored and refuses new readings (counted) until space frees up.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import structlog

from gateway.metrics import Metrics
from gateway.models import StoredReading, TimeFlag
from gateway.store.database import Database

log = structlog.get_logger(__name__)

QUOTA_DELETE_CHUNK = 20_000


class ReadingsQuery:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def history(self, device_id: str, metric: str | None = None, since: float | None = None,
                      until: float | None = None, limit: int = 1000) -> list[StoredReading]:
        where = ["s.device_id = ?"]
        params: list[Any] = [device_id]
        if metric is not None:
            where.append("s.metric = ?")
            params.append(metric)
        if since is not None:
            where.append("r.ts >= ?")
            params.append(since)
        if until is not None:
            where.append("r.ts <= ?")
            params.append(until)
        params.append(limit)
        rows = await self._db.fetchall(
            "SELECT r.id, s.device_id, s.metric, r.value, s.unit, r.ts, r.flags FROM readings r"
            " JOIN series s ON s.id = r.series_id WHERE " + " AND ".join(where)
            + " ORDER BY r.ts DESC, r.id DESC LIMIT ?", params)
        return [StoredReading(id=r[0], device=r[1], metric=r[2], value=r[3], unit=r[4], ts=r[5], flags=r[6])
                for r in rows]

    async def metrics_of(self, device_id: str) -> list[str]:
        rows = await self._db.fetchall("SELECT metric FROM series WHERE device_id = ? ORDER BY metric",
                                       (device_id,))
        return [r[0] for r in rows]

    async def count(self) -> int:
        row = await self._db.fetchone("SELECT count(*) FROM readings")
        return int(row[0]) if row else 0


class Outbox:
    """The readings table seen as an outbox: consumers and their acknowledged watermark."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def register(self, name: str) -> int:
        await self._db.write(lambda c: c.execute(
            "INSERT OR IGNORE INTO outbox_consumers (name, acked_id, updated_at) VALUES (?, 0, ?)",
            (name, time.time())))
        return await self.watermark(name)

    async def watermark(self, name: str) -> int:
        row = await self._db.fetchone("SELECT acked_id FROM outbox_consumers WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    async def min_watermark(self) -> int | None:
        """Lowest acknowledged id over all consumers; None when nobody consumes."""
        row = await self._db.fetchone("SELECT min(acked_id), count(*) FROM outbox_consumers")
        return int(row[0]) if row and row[1] else None


class Maintenance:
    def __init__(self, db: Database, metrics: Metrics, *, retention_days: float, quota_mb: float,
                 quota_policy: str) -> None:
        self._db = db
        self._metrics = metrics
        self.retention_s = retention_days * 86400.0
        self.quota_bytes = int(quota_mb * 1024 * 1024)
        self.policy = quota_policy
        self.refusing = False
        self.dropped_total = 0
        self.first_boot_id = 0

    async def load(self) -> None:
        row = await self._db.fetchone("SELECT value FROM counters WHERE name = 'dropped_quota'")
        self.dropped_total = int(row[0]) if row else 0

    async def run_once(self) -> dict[str, int]:
        deleted = await self._db.write(self._retention)
        dropped = 0
        size = self._db.size_bytes()
        self._metrics.db_bytes.set(size)
        if size > self.quota_bytes:
            if self.policy == "drop_oldest":
                dropped = await self._db.write(self._drop_oldest)
                if dropped:
                    self.dropped_total += dropped
                    self._metrics.dropped.labels(policy="quota_drop_oldest").inc(dropped)
                    log.warning("store.quota_dropped", dropped=dropped, total=self.dropped_total,
                                size=size, quota=self.quota_bytes)
            else:
                if not self.refusing:
                    log.warning("store.quota_refusing", size=size, quota=self.quota_bytes)
                self.refusing = True
        else:
            self.refusing = False
        # freed pages are reused by SQLite; the WAL is truncated so the file size is honest
        await self._db.checkpoint("PASSIVE")
        return {"retention_deleted": deleted, "quota_dropped": dropped}

    def _synced_upto(self, c: sqlite3.Connection) -> int | None:
        row = c.execute("SELECT min(acked_id), count(*) FROM outbox_consumers").fetchone()
        return int(row[0]) if row[1] else None

    def _retention(self, c: sqlite3.Connection) -> int:
        cutoff = time.time() - self.retention_s
        synced = self._synced_upto(c)
        if synced is None:
            cur = c.execute("DELETE FROM readings WHERE ts < ?", (cutoff,))
        else:
            cur = c.execute("DELETE FROM readings WHERE ts < ? AND id <= ?", (cutoff, synced))
        return int(cur.rowcount)

    def _drop_oldest(self, c: sqlite3.Connection) -> int:
        # synced rows go first, whatever their age; only then unsynced ones (counted as drops)
        synced = self._synced_upto(c)
        freed = 0
        if synced:
            freed = c.execute(
                "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE id <= ? ORDER BY id LIMIT ?)",
                (synced, QUOTA_DELETE_CHUNK)).rowcount
        if freed:
            return 0
        n = int(c.execute("DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)",
                          (QUOTA_DELETE_CHUNK,)).rowcount)
        c.execute("INSERT INTO counters (name, value) VALUES ('dropped_quota', ?)"
                  " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (n,))
        return n

    async def correct_clock(self, step_s: float, from_id: int) -> int:
        """Shift readings stamped by the unsynchronised clock of this boot by the step NTP made."""
        unsynced, corrected = int(TimeFlag.CLOCK_UNSYNCED), int(TimeFlag.CORRECTED)

        def fix(c: sqlite3.Connection) -> int:
            return int(c.execute(
                "UPDATE readings SET ts = ts + ?, flags = flags | ? WHERE id >= ? AND flags & ? AND NOT flags & ?",
                (step_s, corrected, from_id, unsynced, int(TimeFlag.NODE_TS))).rowcount)

        n = await self._db.write(fix)
        log.info("store.clock_corrected", readings=n, step_s=round(step_s, 3))
        return n
