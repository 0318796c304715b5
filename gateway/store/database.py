"""The SQLite file: one writer with group commit, read connections for queries.

Why not aiosqlite for the writer: group commit means "run every queued write in one
transaction, then COMMIT once". aiosqlite hops to its thread once per statement and
has no public way to run a whole transaction there; a dedicated single-thread
executor does one hop per batch. Readers use aiosqlite as usual.

Durability: WAL with ``synchronous=FULL`` fsyncs the WAL on every commit, so a write
whose future has resolved survives kill -9 and power loss. The broker sends a PUBACK
only after that (see ``gateway.ingest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from gateway.metrics import Metrics
from gateway.models import Reading, Source
from gateway.store import history
from gateway.store.files import (
    HISTORY_SCHEMA,
    MAIN_PAGE_SIZE,
    attach_statement,
    connect,
    file_bytes,
    history_path,
)
from gateway.store.migrations import LAST_SINGLE_FILE_VERSION, apply_migrations
from gateway.store.salvage import SalvageReport, check_and_salvage, id_floor

log = structlog.get_logger(__name__)

T = TypeVar("T")

SOURCE_CODES = {Source.MQTT: 0, Source.HTTP: 1, Source.BLE: 2, Source.SIMULATOR: 3}
SOURCE_NAMES = {v: k.value for k, v in SOURCE_CODES.items()}

_READINGS = 0
_CALL = 1


class StoreClosed(Exception):
    pass


class _Op:
    __slots__ = ("fn", "future", "kind", "readings", "weight")

    def __init__(self, kind: int, future: asyncio.Future[Any], readings: Sequence[Reading] = (),
                 fn: Callable[[sqlite3.Connection], Any] | None = None) -> None:
        self.kind = kind
        self.future = future
        self.readings = readings
        self.fn = fn
        self.weight = len(readings) if kind == _READINGS else 1


class Database:
    def __init__(
        self,
        path: Path,
        metrics: Metrics,
        *,
        commit_interval_ms: float = 20.0,
        max_batch: int = 5000,
    ) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self._interval = commit_interval_ms / 1000.0
        self._max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siteward-writer")
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_id = 1
        # (device, metric) -> (series id, unit); touched only on the writer thread
        self._series: dict[tuple[str, str], tuple[int, str]] = {}
        self._closed = False
        self._ckpt_conn: sqlite3.Connection | None = None
        self._ckpt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="siteward-checkpoint")
        self.commits = 0
        self.last_commit_error: str | None = None
        self.history = history.HistoryWriter(self.path)
        self.salvage_report: SalvageReport | None = None
        self.history_salvage_report: SalvageReport | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> list[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        # a corrupt file is set aside and what it still holds copied to a fresh one (store.salvage)
        self.salvage_report = await loop.run_in_executor(self._executor, check_and_salvage, self.path,
                                                         apply_migrations)
        self.history_salvage_report = await loop.run_in_executor(
            self._executor, check_and_salvage, history_path(self.path), history.make_history_schema)
        await loop.run_in_executor(self._executor, history.prepare, self.path)
        applied = await loop.run_in_executor(self._executor, self._open_writer)
        await self.history.open()
        # ids stay above those of readings a salvage could not save (they may be in the cloud),
        # and above every merged id (a store emptied by hand keeps its marker)
        self._next_id = max(self._next_id, await loop.run_in_executor(self._executor, id_floor, self._conn) + 1,
                            await self.history.run(history.merged_upto) + 1)
        self._reader = await self._connect_reader()
        await self._reader.execute("PRAGMA busy_timeout=30000")
        self._task = asyncio.create_task(self._writer_loop(), name="store-writer")
        if applied:
            log.info("store.migrated", path=str(self.path), applied=applied)
        return applied

    def _open_writer(self) -> list[int]:
        conn = connect(self.path, page_size=MAIN_PAGE_SIZE)
        applied = apply_migrations(conn, upto=LAST_SINGLE_FILE_VERSION)
        history.move_legacy_history(conn, self.path)  # before migration 6 drops the old table
        applied += apply_migrations(conn)
        # the newest reading never leaves the table (gateway.store.readings), so max(id) is
        # the high-water mark
        top = conn.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
        self._next_id = top + 1
        # checkpoints run from their own connection (checkpoint()), not inside a commit:
        # the commit that happened to trigger SQLite's automatic one was the latency tail
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # Debian builds SQLite with SECURE_DELETE on: every freed page is zeroed and written
        # again, and the outbox frees a minute of pages every minute (Maintenance._release).
        # What is deleted here is sensor readings already in the history file and the cloud,
        # or hashes; the card's wear matters more than erasing free pages.
        conn.execute("PRAGMA secure_delete=OFF")
        for sid, dev, metric, unit in conn.execute("SELECT id, device_id, metric, unit FROM series"):
            self._series[(dev, metric)] = (sid, unit)
        self._conn = conn
        return applied

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            # the writer commits everything queued before the sentinel, then stops
            self._queue.put_nowait(None)
            await self._task
        if self._reader is not None:
            await self._reader.close()
        if self._ckpt_conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._ckpt_executor, self._ckpt_conn.close)
        self._ckpt_executor.shutdown(wait=True)
        await self.history.close()
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    # -- writing ------------------------------------------------------------------------
    async def add_readings(self, readings: Sequence[Reading]) -> range:
        """Queue readings for the next group commit; returns their ids once durable."""
        if not readings:
            return range(0)
        return await self.submit_readings(readings)

    def submit_readings(self, readings: Sequence[Reading]) -> asyncio.Future[range]:
        """Queue readings *now* (no await before they are in line) and return the commit future.

        Callers that must keep per-device order across their own awaits enqueue first and
        await later: ids, and so the cloud's order, follow the order of these calls.
        """
        if self._closed:
            raise StoreClosed("store is closed")
        fut: asyncio.Future[range] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(_READINGS, fut, readings=readings))
        return fut

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the writer thread inside the next group commit.

        ``fn`` runs in a savepoint: if it raises, its own changes are rolled back, the
        exception is re-raised here, and the rest of the batch still commits.
        """
        return await self._submit(_CALL, fn=fn)

    async def _submit(self, kind: int, **kw: Any) -> Any:
        if self._closed:
            raise StoreClosed("store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(kind, fut, **kw))
        return await fut

    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_commit = 0.0
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            # Waiting up to commit_interval after the previous commit lets one fsync
            # cover many messages: fewer, larger WAL appends spare the SD card.
            wait = last_commit + self._interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            batch = [first]
            weight = first.weight
            while weight < self._max_batch and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:
                    stopping = True
                    break
                batch.append(op)
                weight += op.weight
            self.metrics.queue_depth.set(self._queue.qsize())
            await self._commit(batch)
            last_commit = loop.time()

    async def _commit(self, batch: list[_Op]) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, batch)
        except Exception as exc:  # the COMMIT itself failed: nothing in the batch is durable
            self.last_commit_error = f"{type(exc).__name__}: {exc}"
            log.error("store.commit_failed", error=self.last_commit_error, ops=len(batch))
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(exc)
            return
        self.last_commit_error = None
        self.commits += 1
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self.metrics.commit_batch.observe(len(batch))
        stored = 0
        for op, (ok, value) in zip(batch, results, strict=True):
            if op.future.done():  # caller gave up (cancelled); the write stands anyway
                continue
            if ok:
                op.future.set_result(value)
                if op.kind == _READINGS:
                    stored += op.weight
            else:
                op.future.set_exception(value)
        if stored:
            self.metrics.readings_stored.inc(stored)

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        saved_next = self._next_id
        saved_series = dict(self._series) if any(op.kind == _READINGS for op in batch) else None
        out: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                if op.kind == _READINGS:
                    out.append((True, self._insert_readings(conn, op.readings)))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)  # type: ignore[misc]
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    out.append((False, exc))
                else:
                    conn.execute("RELEASE op")
                    out.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._next_id = saved_next
            if saved_series is not None:
                self._series = saved_series
            raise
        return out

    def _series_id(self, conn: sqlite3.Connection, device: str, metric: str, unit: str) -> int:
        key = (device, metric)
        hit = self._series.get(key)
        if hit is not None:
            if hit[1] == unit or not unit:
                return hit[0]
            conn.execute("UPDATE series SET unit=? WHERE id=?", (unit, hit[0]))
            self._series[key] = (hit[0], unit)
            return hit[0]
        cur = conn.execute("INSERT INTO series (device_id, metric, unit) VALUES (?, ?, ?)",
                           (device, metric, unit))
        sid = int(cur.lastrowid or 0)
        self._series[key] = (sid, unit)
        return sid

    def _insert_readings(self, conn: sqlite3.Connection, readings: Sequence[Reading]) -> range:
        first = self._next_id
        rows = []
        rid = first
        for r in readings:
            rows.append((rid, self._series_id(conn, r.device, r.metric, r.unit), r.ts, r.value,
                         r.flags, SOURCE_CODES[r.source]))
            rid += 1
        conn.executemany(
            "INSERT INTO readings (id, series_id, ts, value, flags, source) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
        self._next_id = rid
        return range(first, rid)

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Copy the WAL back into the database file.

        PASSIVE runs on a connection and thread of its own, beside the writer: commits go on
        while it copies. The other modes wait for the writer (they must reset the WAL).
        """
        assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
        if mode != "PASSIVE":
            conn = self._conn
            assert conn is not None
            row = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
            return tuple(row)  # type: ignore[return-value]
        # its own single thread: a checkpoint cancelled mid-way keeps running there, and
        # close() queues behind it instead of closing the connection under it
        return await asyncio.get_running_loop().run_in_executor(self._ckpt_executor, self._passive_checkpoint)

    def _passive_checkpoint(self) -> tuple[int, int, int]:
        if self._ckpt_conn is None:
            self._ckpt_conn = connect(self.path)
        return tuple(self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())  # type: ignore[return-value]

    def wal_bytes(self) -> int:
        try:
            return Path(str(self.path) + "-wal").stat().st_size
        except OSError:
            return 0

    async def run_checkpoints(self, interval_s: float, truncate_above_bytes: int) -> None:
        """Supervised loop: keep the WAL short without ever checkpointing inside a commit."""
        while True:
            await asyncio.sleep(interval_s)
            await self.checkpoint("PASSIVE")
            if self.wal_bytes() > truncate_above_bytes:
                # readers kept the WAL from being reused for long: reset it once, briefly
                # holding the writer, so the file does not grow without bound
                await self.checkpoint("TRUNCATE")

    # -- reading ------------------------------------------------------------------------
    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        assert self._reader is not None
        return list(await self._reader.execute_fetchall(sql, params))  # type: ignore[arg-type]

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def read_connection(self) -> Any:
        """A private read-only connection, for long streaming reads (CSV export)."""
        conn = await self._connect_reader()
        try:
            yield conn
        finally:
            await conn.close()

    async def _connect_reader(self) -> aiosqlite.Connection:
        """Read-only, the history file attached: queries read history and outbox in one statement."""
        conn = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            await conn.execute(*attach_statement(self.path, readonly=True))
        except BaseException:
            await conn.close()
            raise
        conn.row_factory = sqlite3.Row
        return conn

    async def used_bytes(self) -> int:
        """Bytes of pages in use: DELETE frees pages inside the file without shrinking it, so
        the file size would keep a quota "exceeded" forever and drop more on every run."""
        total = 0
        for db in ("main", HISTORY_SCHEMA):  # the history file is most of the store
            # plain PRAGMAs: their table-valued forms do not all take a schema
            pages, free, size = [int((await self.fetchall(f"PRAGMA {db}.{p}"))[0][0])
                                 for p in ("page_count", "freelist_count", "page_size")]
            total += (pages - free) * size
        return total

    def size_bytes(self) -> int:
        return file_bytes(self.path)

    async def integrity_check(self) -> str:
        """"ok", or what is wrong, in either file."""
        problems = []
        for db in ("main", HISTORY_SCHEMA):
            row = await self.fetchone(f"PRAGMA {db}.quick_check")
            if row is None or row[0] != "ok":
                problems.append(f"{db}: {row[0] if row else 'no answer'}")
        return "; ".join(problems) or "ok"
