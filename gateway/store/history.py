"""The history file: readings clustered by series and time, in a SQLite file of its own.

Why its own file: SQLite has one write lock per file. Merging a minute of the outbox into
the clustered history (180,000 rows at 1,000 msg/s, 0.2 to 1 s of work) held the one writer
of a single file, and every ingest commit, so every PUBACK, waited behind it
(docs/performance.md). With its own file, WAL and lock, the merge runs on a connection and
thread of its own while ingest keeps committing to the main file.

The rules that keep the two files one store:

* Only :class:`HistoryWriter` writes this file. The main writer never attaches it, so
  no statement on the ingest path can wait for this file's lock.
* The merge marker (``history_merge.merged_id``) lives here, committed in the same
  transaction as the rows it covers. Outbox rows leave the main file only after that.
* Readers attach the file as ``hist``, so an unqualified ``history`` resolves here. A
  statement over both files opens main's snapshot first (SQLite takes them in schema
  order), and rows leave main only after the marker that covers them has been committed
  here, so a statement never misses a reading that moves between its two snapshots.
* A transaction that writes both files is atomic in each file, not across both (SQLite's
  WAL mode). Every step that touches both is ordered so that a crash between its two
  commits leaves the outbox, which is what the cloud receives, whole.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog

from gateway.store.files import (
    HISTORY_PAGE_SIZE,
    HISTORY_SCHEMA,
    attach_history,
    connect,
    history_path,
    transaction,
)
from gateway.store.migrations import HISTORY_MIGRATIONS, apply_migrations

log = structlog.get_logger(__name__)

T = TypeVar("T")

# the key under which a single-file store (schema 5 and older) kept its merge marker
LEGACY_MERGED_KEY = "history_merged_id"
# after a large merge, the history WAL is cut back to this size at the next checkpoint
WAL_LIMIT_BYTES = 8 * 1024 * 1024


def make_history_schema(conn: sqlite3.Connection) -> list[int]:
    """Bring a connection opened on the history file itself up to its own schema."""
    return apply_migrations(conn, migrations=HISTORY_MIGRATIONS)


def prepare(main: Path) -> list[int]:
    """Create the history file of ``main`` or migrate it (run before any connection attaches it)."""
    conn = connect(history_path(main), page_size=HISTORY_PAGE_SIZE)
    try:
        return make_history_schema(conn)
    finally:
        conn.close()


def merged_upto(c: sqlite3.Connection) -> int:
    """Highest outbox id merged into history, on a connection that has the file attached."""
    row = c.execute("SELECT merged_id FROM history_merge").fetchone()
    return int(row[0]) if row else 0


def move_legacy_history(conn: sqlite3.Connection, main: Path) -> int:
    """Copy a single-file store's ``history`` table (schema 5 and older) into the history file.

    Called on the main writer's connection before migration 6 drops the old table. The copy
    commits in the history file alone; if the process dies before migration 6 commits, the
    next start copies again, and INSERT OR IGNORE makes the second copy a no-op.
    """
    if conn.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = 'history'").fetchone() is None:
        return 0
    t0 = time.monotonic()
    attach_history(conn, main, readonly=False)
    try:
        with transaction(conn):
            n = int(conn.execute(
                f"INSERT OR IGNORE INTO {HISTORY_SCHEMA}.history (series_id, ts, id, value, flags, source)"
                " SELECT series_id, ts, id, value, flags, source FROM main.history").rowcount)
            row = conn.execute("SELECT value FROM main.meta WHERE key = ?", (LEGACY_MERGED_KEY,)).fetchone()
            conn.execute(f"UPDATE {HISTORY_SCHEMA}.history_merge SET merged_id = max(merged_id, ?)",
                         (int(row[0]) if row else 0,))
    finally:
        conn.execute(f"DETACH DATABASE {HISTORY_SCHEMA}")
    if n:
        log.info("store.history_moved", rows=n, to=str(history_path(main)),
                 seconds=round(time.monotonic() - t0, 2))
    return n


class HistoryWriter:
    """The one connection that writes the history file, on a thread of its own.

    It sees the main file too (attached the other way round: main is main, history is
    ``hist``) so that a merge reads the outbox and writes history in one statement.
    """

    def __init__(self, main: Path) -> None:
        self._main = main
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siteward-history")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        conn = connect(self._main)
        attach_history(conn, self._main, readonly=False)
        conn.execute(f"PRAGMA {HISTORY_SCHEMA}.journal_size_limit = {WAL_LIMIT_BYTES}")
        # the merge sorts a minute of readings by series: in memory, not through temporary
        # files, which cost ~30 B written per merged reading (bench/store_cycle.py);
        # shrink() gives the memory back after each merge
        conn.execute("PRAGMA temp_store=MEMORY")
        self._conn = conn

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True) -> T:
        """Run ``fn(conn)`` on the history thread, in one transaction unless told otherwise
        (then ``fn`` opens its own, e.g. one per file, and nothing else runs in between)."""
        if self._closed:
            raise RuntimeError("the history writer is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, transaction)

    def _call(self, fn: Callable[[sqlite3.Connection], T], in_transaction: bool) -> T:
        conn = self._conn
        assert conn is not None, "history writer is not open"
        if not in_transaction:
            return fn(conn)
        # DEFERRED: IMMEDIATE would take the write lock of every attached file, main's too
        with transaction(conn):
            return fn(conn)

    async def shrink(self) -> None:
        """Free this connection's caches (a merge's sort and pages) until the next merge."""
        await self.run(lambda c: c.execute("PRAGMA shrink_memory"), transaction=False)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
