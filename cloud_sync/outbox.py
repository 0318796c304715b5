"""Everything the sync process reads from the gateway's SQLite file, on a read-only connection.

The connection lives on one dedicated thread (queries and the CPU work of encoding
batches happen there, never on the event loop). Every statement is its own short read
transaction: a long-lived snapshot would keep the gateway's checkpoints from
recycling the WAL. Read-only also means that whatever this process does, it cannot
hold the write lock the gateway's ingest needs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.codec import Row, Series
from cloud_sync.dbthread import ConnectionThread
from gateway.store.files import connect, file_bytes

T = TypeVar("T")

# the schema this process needs (migration 2 adds the sync tables)
NEEDED_SCHEMA = 2
OUTBOX_CONSUMER = "cloud"
CACHE_KIB = 512


class SchemaNotReady(Exception):
    pass


def schema_version(path: Path) -> tuple[int, bool] | None:
    """(schema version, whether the sync's tables are there), or None without a database.

    Both, because a version is not proof: a development store made while migration 2 was
    committed after 3 and 4 reports version 5 without the sync's tables.
    """
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return version, {"sync_acked", "sync_state", "sync_status", "command_queue"} <= tables
    finally:
        conn.close()


class StoreReader(ConnectionThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "sync-reader")
        self.series: dict[int, Series] = {}

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.path, readonly=True)
        # a read that waits cannot block anyone; keep it bounded so a wedged file shows up
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA query_only=1")
        # reads walk the outbox forward once: a big page cache would only cost memory
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the reader thread (also for encoding work that needs rows)."""
        return await self._on_thread(self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._connection())

    # -- readings -------------------------------------------------------------------------
    async def head(self) -> int:
        """The highest reading id ever committed (0 for none)."""
        return await self.run(_head)

    def rows(self, c: sqlite3.Connection, lo: int, hi: int | None, limit: int) -> list[Row]:
        """Readings with id in [lo, hi] (hi None: no upper bound), oldest first; on the reader thread."""
        if hi is None or hi < 0:
            cur = c.execute("SELECT id, series_id, ts, value, flags, source FROM readings WHERE id >= ?"
                            " ORDER BY id LIMIT ?", (lo, limit))
        else:
            cur = c.execute("SELECT id, series_id, ts, value, flags, source FROM readings"
                            " WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?", (lo, hi, limit))
        rows: list[Row] = cur.fetchall()
        missing = {r[1] for r in rows} - self.series.keys()
        if missing:
            self._load_series(c)
        return rows

    def _load_series(self, c: sqlite3.Connection) -> None:
        for sid, dev, metric, unit in c.execute("SELECT id, device_id, metric, unit FROM series"):
            s = self.series.get(sid)
            if s is None or (s.device, s.metric, s.unit) != (dev, metric, unit):
                self.series[sid] = Series.of(dev, metric, unit)

    # -- events -----------------------------------------------------------------------------
    async def events_from(self, lo: int, limit: int) -> list[tuple[int, float, str | None, str, str]]:
        return await self.run(lambda c: c.execute(
            "SELECT id, ts, device_id, kind, data FROM events WHERE id >= ? ORDER BY id LIMIT ?",
            (lo, limit)).fetchall())

    # -- commands ---------------------------------------------------------------------------
    async def device_state(self, device_id: str) -> str | None:
        row = await self.run(lambda c: c.execute("SELECT state FROM devices WHERE id = ?", (device_id,)).fetchone())
        return str(row[0]) if row else None

    async def queue_entry_for(self, command_id: str) -> tuple[str, str | None] | None:
        """(cloud id, device) of a queued command the gateway sent under ``command_id``."""
        row = await self.run(lambda c: c.execute(
            "SELECT id, device_id FROM command_queue WHERE command_id = ?", (command_id,)).fetchone())
        return (row[0], row[1]) if row else None

    async def results_to_report(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self.run(lambda c: c.execute(
            "SELECT id, device_id, state, command_id, error, updated_at FROM command_queue"
            " WHERE needs_report = 1 ORDER BY updated_at LIMIT ?", (limit,)).fetchall())
        return [{"id": r[0], "device": r[1], "state": r[2], "command_id": r[3],
                 "error": json.loads(r[4]) if r[4] else None, "updated_at": r[5]} for r in rows]

    # -- figures ----------------------------------------------------------------------------
    async def counter(self, name: str) -> int:
        row = await self.run(lambda c: c.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone())
        return int(row[0]) if row else 0

    async def devices_summary(self) -> dict[str, int]:
        def q(c: sqlite3.Connection) -> dict[str, int]:
            total, online, discovered, ignored = c.execute(
                "SELECT count(*), coalesce(sum(online), 0), coalesce(sum(state = 'discovered'), 0),"
                " coalesce(sum(state = 'ignored'), 0) FROM devices").fetchone()
            return {"total": total, "online": online, "discovered": discovered, "ignored": ignored}

        return await self.run(q)

    async def backlog(self, base: int, acked: list[tuple[int, int]]) -> tuple[int, float | None]:
        return await self.run(lambda c: backlog_of(c, base, acked))

    def db_bytes(self) -> int:
        return file_bytes(self.path)


def _head(c: sqlite3.Connection) -> int:
    row = c.execute("SELECT max(id) FROM readings").fetchone()
    seq = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
    return max(int(row[0] or 0), int(seq[0]) if seq else 0)


def backlog_of(c: sqlite3.Connection, base: int, acked: list[tuple[int, int]]) -> tuple[int, float | None]:
    """(readings not acknowledged by the cloud, timestamp of the oldest of them).

    Index lookups only (no count(*) over a million rows on an SD card): readings above
    the watermark have no holes except a prefix the quota dropped, because ids are
    consecutive per commit and never reused, retention deletes only acknowledged rows
    and the quota drops the oldest first. So the count is (head - lowest + 1) minus the
    acknowledged ranges above the watermark.
    """
    head = _head(c)
    low = base + 1
    ranges = sorted(acked)
    while True:
        row = c.execute("SELECT min(id) FROM readings WHERE id >= ?", (low,)).fetchone()
        if row[0] is None:
            return 0, None
        low = int(row[0])
        inside = next(((a, b) for a, b in ranges if a <= low <= b), None)
        if inside is None:
            break
        low = inside[1] + 1
    count = (head - low + 1) - sum(max(0, min(b, head) - max(a, low) + 1) for a, b in ranges)
    ts = c.execute("SELECT ts FROM readings WHERE id = ?", (low,)).fetchone()
    return max(count, 0), (float(ts[0]) if ts else None)
