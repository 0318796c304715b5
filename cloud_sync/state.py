"""The few things the sync process writes into the shared SQLite file.

Watermarks and acknowledged ranges, a handful of persisted integers, the status row
the gateway's API shows, and commands that came down from the cloud. Each write is
one short ``BEGIN IMMEDIATE … COMMIT`` on a dedicated thread, so the write lock is
held for a millisecond, never across network I/O: the gateway's ingest never waits
for the sync process.

``synchronous=NORMAL`` here (the gateway uses FULL): a power cut can forget the
newest watermark advance, which only means a few batches are sent again (the cloud
de-duplicates by key); it can never lose a reading, and it spares the SD card an
fsync per acknowledgement. ``wal_autocheckpoint=0`` leaves checkpointing to the
gateway, so a write of ours never turns into a checkpoint of its WAL.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.dbthread import ConnectionThread
from cloud_sync.ledger import Range
from cloud_sync.outbox import OUTBOX_CONSUMER
from gateway.store.files import transaction

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000

READINGS_LANE = "readings"
EVENTS_LANE = "events"


@dataclass
class Persisted:
    readings_base: int
    readings_acked: list[Range]
    events_base: int
    events_acked: list[Range]
    values: dict[str, int]


@dataclass
class Snapshot:
    readings: tuple[int, list[Range]] | None = None
    events: tuple[int, list[Range]] | None = None
    values: dict[str, int] = field(default_factory=dict)
    # (cloud command id, state reported): clear needs_report unless the state moved on
    reported: list[tuple[str, str]] = field(default_factory=list)


class StateStore(ConnectionThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "sync-writer")
        self.writes = 0

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA cache_size=-256")  # a few small rows
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._on_thread(self._txn, fn)

    def _txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with transaction(self._connection(), "IMMEDIATE") as c:
            out = fn(c)
        self.writes += 1
        return out

    # -- startup ----------------------------------------------------------------------------
    async def load(self) -> Persisted:
        def q(c: sqlite3.Connection) -> Persisted:
            c.execute("INSERT OR IGNORE INTO outbox_consumers (name, acked_id, updated_at) VALUES (?, 0, ?)",
                      (OUTBOX_CONSUMER, time.time()))
            base = int(c.execute("SELECT acked_id FROM outbox_consumers WHERE name = ?",
                                 (OUTBOX_CONSUMER,)).fetchone()[0])
            ranges: dict[str, list[Range]] = {READINGS_LANE: [], EVENTS_LANE: []}
            for lane, lo, hi in c.execute("SELECT lane, first_id, last_id FROM sync_acked ORDER BY first_id"):
                ranges.setdefault(lane, []).append((int(lo), int(hi)))
            values = {k: int(v) for k, v in c.execute("SELECT name, value FROM sync_state")}
            return Persisted(base, ranges[READINGS_LANE], values.get("events.base", 0), ranges[EVENTS_LANE],
                             values)

        return await self._run(q)

    # -- the acknowledgement record ---------------------------------------------------------
    async def record(self, snap: Snapshot) -> None:
        def w(c: sqlite3.Connection) -> None:
            now = time.time()
            if snap.readings is not None:
                base, ranges = snap.readings
                c.execute("UPDATE outbox_consumers SET acked_id = max(acked_id, ?), updated_at = ? WHERE name = ?",
                          (base, now, OUTBOX_CONSUMER))
                _put_ranges(c, READINGS_LANE, ranges)
            if snap.events is not None:
                base, ranges = snap.events
                snap.values["events.base"] = base
                _put_ranges(c, EVENTS_LANE, ranges)
            if snap.values:
                c.executemany("INSERT INTO sync_state (name, value) VALUES (?, ?)"
                              " ON CONFLICT(name) DO UPDATE SET value = excluded.value", list(snap.values.items()))
            if snap.reported:
                c.executemany("UPDATE command_queue SET needs_report = 0 WHERE id = ? AND state = ?",
                              snap.reported)

        await self._run(w)

    async def set_values(self, values: dict[str, int]) -> None:
        await self.record(Snapshot(values=dict(values)))

    async def write_status(self, data: dict[str, Any]) -> None:
        body = json.dumps(data, separators=(",", ":"), default=str)
        await self._run(lambda c: c.execute(
            "INSERT INTO sync_status (id, updated_at, data) VALUES (1, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at, data = excluded.data",
            (time.time(), body)))

    # -- downlink ---------------------------------------------------------------------------
    async def queue_command(self, row: dict[str, Any]) -> tuple[bool, str]:
        """Insert a command from the cloud (state queued or rejected) unless its id is known.

        Returns (inserted, state). A known id is never executed twice: it is only marked
        for its current state to be reported again.
        """
        def w(c: sqlite3.Connection) -> tuple[bool, str]:
            old = c.execute("SELECT state FROM command_queue WHERE id = ?", (row["id"],)).fetchone()
            if old is not None:
                c.execute("UPDATE command_queue SET needs_report = 1 WHERE id = ?", (row["id"],))
                return False, str(old[0])
            now = time.time()
            c.execute(
                "INSERT INTO command_queue (id, device_id, command, args, expect, timeout_s, received_at, expires_at,"
                " state, error, needs_report, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (row["id"], row.get("device"), row.get("command"), json.dumps(row.get("args") or {}),
                 json.dumps(row["expect"]) if row.get("expect") is not None else None, row.get("timeout_s"),
                 now, row.get("expires_at"), row["state"],
                 json.dumps(row["error"]) if row.get("error") else None, now))
            return True, str(row["state"])

        return await self._run(w)


def _put_ranges(c: sqlite3.Connection, lane: str, ranges: list[Range]) -> None:
    c.execute("DELETE FROM sync_acked WHERE lane = ?", (lane,))
    c.executemany("INSERT INTO sync_acked (lane, first_id, last_id) VALUES (?, ?, ?)",
                  [(lane, lo, hi) for lo, hi in ranges])
