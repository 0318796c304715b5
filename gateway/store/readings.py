"""Queries and upkeep of readings: the outbox table, the history table, the merge between.

Two tables, for the SD card's sake (docs/performance.md, "Where the bytes go"):

* ``readings`` is append-only and unindexed: the outbox (cloud sync reads ids above its
  watermark) and the newest history. A commit writes about one page.
* ``history`` is clustered by (series, ts, id) for queries and charts. A periodic
  merge copies readings into it in bulk, so each series' leaf page is written once per
  merge rather than once per commit. It lives in a file of its own, written by its own
  connection, so that the merge never holds up ingest (``gateway.store.history``).

Every query reads ``history`` plus the unmerged tail of ``readings`` in one statement
(one snapshot). A row leaves ``readings`` once it is merged and every outbox consumer
has acknowledged it; the newest row always stays, so ``max(id)`` is the high-water mark
and ids are never reused.

Retention deletes history older than the retention period that every outbox consumer
has acknowledged. When the database outgrows its quota, the policy decides:
``drop_oldest`` deletes the oldest acknowledged history first and only then the oldest
unacknowledged readings (counted, persisted, reported upward); ``refuse_new`` keeps
what is stored and refuses new readings (counted) until space frees up.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time
from typing import Any

import structlog

from gateway.metrics import Metrics
from gateway.models import StoredReading, TimeFlag
from gateway.store.database import Database
from gateway.store.files import transaction
from gateway.store.filters import Where
from gateway.store.history import merged_upto

log = structlog.get_logger(__name__)

# quota drops: the first chunk probes how much a reading frees, later ones are sized from it
QUOTA_FIRST_CHUNK = 500
QUOTA_MIN_CHUNK = 50
QUOTA_MAX_CHUNK = 200_000
QUOTA_MAX_ROUNDS = 100
# the outbox is rebuilt, not deleted from, when at most 1/REBUILD_RATIO of it stays
REBUILD_RATIO = 4
# rows merged per transaction of the history file: more than a minute at 1,000 msg/s x 3
# metrics, so a merge is one transaction (each series' pages written once); bounds the
# memory of the in-memory sort (~20 MB) when a backlog is merged
MERGE_CHUNK = 250_000

_MERGED = "(SELECT merged_id FROM history_merge)"
# history plus the unmerged tail of readings, as one relation (one snapshot)
_ALL = (
    "(SELECT id, series_id, ts, value, flags FROM history WHERE series_id = :sid AND ts >= :since AND ts <= :until"
    " UNION ALL SELECT id, series_id, ts, value, flags FROM readings"
    f" WHERE id > coalesce({_MERGED}, 0) AND series_id = :sid AND ts >= :since AND ts <= :until)"
)

# min/max/sum/count per time bucket of one series, in one statement (one snapshot). History: one
# range scan per bucket along its (series_id, ts) clustering, the four aggregates packed into one
# text value, so SQLite never sorts bucket numbers (a GROUP BY on the computed bucket sorts every
# row through a temporary B-tree: twice the time for a week of 1 Hz data). The short unmerged tail
# of readings is grouped the plain way. A bucket can come twice (history and tail): callers add up.
# The bench (bench/ui.py) times this same statement as its reference.
_PACKED = "min(value) || ' ' || max(value) || ' ' || total(value) || ' ' || count(*)"
DOWNSAMPLE_SQL = (
    "WITH RECURSIVE b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i < :last)"
    f" SELECT i, (SELECT {_PACKED} FROM history"
    " WHERE series_id = :sid AND ts >= :since + i * :width AND ts < :since + (i + 1) * :width) FROM b"
    f" UNION ALL SELECT CAST((ts - :since) / :width AS INTEGER), {_PACKED} FROM readings"
    f" WHERE id > coalesce({_MERGED}, 0) AND series_id = :sid AND ts >= :since"
    " AND ts < :since + (:last + 1) * :width GROUP BY 1"
)
_RANGE_SQL = f"SELECT id, ts, value, flags FROM {_ALL} ORDER BY ts DESC, id DESC LIMIT :limit"
# one series in time order, for streaming it out (the CSV export walks a private cursor over it)
SERIES_ASC_SQL = f"SELECT ts, value, flags FROM {_ALL} ORDER BY ts, id"
_FAR = 1e12


def downsample_params(series_id: int, since: float, until: float, buckets: int) -> dict[str, Any]:
    buckets = max(int(buckets), 1)
    # a hair wider than (until - since) / buckets, so that a reading at exactly ``until`` is in: the
    # margin is in units of the timestamps' own precision (at 1.8e9 s a double resolves 2.4e-7 s)
    width = max((until - since) / buckets, 1e-3) + 2 * math.ulp(abs(since) + abs(until))
    return {"since": since, "width": width, "sid": series_id, "last": buckets - 1}


def summarise(rows: Any, since: float, until: float, buckets: int) -> list[tuple[Any, ...]]:
    """Add up what DOWNSAMPLE_SQL returned per bucket: (bucket, middle time, min, max, avg, count)."""
    width = downsample_params(0, since, until, buckets)["width"]
    acc: dict[int, list[float]] = {}
    for b, packed in rows:
        if packed is None:
            continue
        lo, hi, total, n = (float(x) for x in packed.split(" "))
        cur = acc.get(int(b))
        if cur is None:
            acc[int(b)] = [lo, hi, total, n]
        else:
            cur[0], cur[1], cur[2], cur[3] = min(cur[0], lo), max(cur[1], hi), cur[2] + total, cur[3] + n
    return [(b, min(since + (b + 0.5) * width, until), v[0], v[1], v[2] / v[3], int(v[3]))
            for b, v in sorted(acc.items()) if v[3] > 0]


def merged_and_acked(merged: int, synced: int | None) -> int:
    """Highest id that is merged (up to ``merged``) and acknowledged by every outbox
    consumer (``synced``, None when nobody consumes): what may leave the outbox, and the
    history that retention and the quota may free first."""
    return merged if synced is None else min(merged, synced)


def _rebuildable(c: sqlite3.Connection) -> bool:
    """The outbox has no index or trigger that a rebuild would have to recreate."""
    row = c.execute("SELECT count(*) FROM sqlite_master WHERE tbl_name = 'readings' AND type != 'table'").fetchone()
    return int(row[0]) == 0


def synced_upto(c: sqlite3.Connection) -> int | None:
    """Lowest id every outbox consumer acknowledged; None when nobody consumes the outbox."""
    row = c.execute("SELECT min(acked_id), count(*) FROM outbox_consumers").fetchone()
    return int(row[0]) if row[1] else None


class ReadingsQuery:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def history(self, device_id: str, metric: str | None = None, since: float | None = None,
                      until: float | None = None, limit: int = 1000) -> list[StoredReading]:
        """Newest first, at most ``limit``."""
        sql = "SELECT id, metric, unit FROM series WHERE device_id = ?"
        args: list[Any] = [device_id]
        if metric is not None:
            sql += " AND metric = ?"
            args.append(metric)
        out: list[StoredReading] = []
        for sid, m, unit in await self._db.fetchall(sql, args):
            rows = await self._db.fetchall(_RANGE_SQL, {"sid": sid, "since": -_FAR if since is None else since,
                                                        "until": _FAR if until is None else until, "limit": limit})
            out += [StoredReading(id=r[0], device=device_id, metric=m, value=r[2], unit=unit, ts=r[1], flags=r[3])
                    for r in rows]
        out.sort(key=lambda x: (x.ts, x.id), reverse=True)
        return out[:limit]

    async def series_of(self, device_id: str, metric: str) -> tuple[int, str] | None:
        """(series id, unit) of one device's metric, or None if it never reported it."""
        row = await self._db.fetchone("SELECT id, unit FROM series WHERE device_id = ? AND metric = ?",
                                      (device_id, metric))
        return (int(row[0]), str(row[1])) if row else None

    async def downsample(self, series_id: int, since: float, until: float, buckets: int) -> list[tuple[Any, ...]]:
        """Min/max/avg per time bucket, computed in SQL: a week of 1 Hz data (604,800 rows)
        comes back as at most ``buckets`` rows, so a phone draws a few kB instead of 10+ MB.

        Rows: (bucket index, bucket middle time, min, max, avg, count), oldest first, only
        buckets with data; ``until`` itself is inside the last bucket.
        """
        return summarise(await self._db.fetchall(DOWNSAMPLE_SQL, downsample_params(series_id, since, until, buckets)),
                         since, until, buckets)

    async def count(self, device_id: str | None = None) -> int:
        """Readings stored (history + unmerged), optionally of one device."""
        if device_id is None:
            row = await self._db.fetchone(
                f"SELECT (SELECT count(*) FROM history) + (SELECT count(*) FROM readings"
                f" WHERE id > coalesce({_MERGED}, 0))")
        else:
            row = await self._db.fetchone(
                "SELECT (SELECT count(*) FROM history WHERE series_id IN (SELECT id FROM series WHERE device_id = :d))"
                " + (SELECT count(*) FROM readings WHERE series_id IN (SELECT id FROM series WHERE device_id = :d)"
                f" AND id > coalesce({_MERGED}, 0))", {"d": device_id})
        return int(row[0]) if row else 0

    async def metrics_of(self, device_id: str) -> list[str]:
        rows = await self._db.fetchall("SELECT metric FROM series WHERE device_id = ? ORDER BY metric",
                                       (device_id,))
        return [r[0] for r in rows]

    async def all_metrics(self) -> list[str]:
        """Every metric some device has sent (removed devices' too: their readings stay)."""
        return [r[0] for r in await self._db.fetchall("SELECT DISTINCT metric FROM series ORDER BY metric")]

    async def devices_with_data(self) -> list[str]:
        return [r[0] for r in await self._db.fetchall("SELECT DISTINCT device_id FROM series ORDER BY device_id")]

    async def series_list(self, devices: list[str] | None = None,
                          metrics: list[str] | None = None) -> list[tuple[int, str, str, str]]:
        """(series id, device, metric, unit), by device then metric; empty filters mean all."""
        where = Where()
        if devices:
            where.add("device_id IN (SELECT value FROM json_each(?))", json.dumps(devices))
        if metrics:
            where.add("metric IN (SELECT value FROM json_each(?))", json.dumps(metrics))
        rows = await self._db.fetchall(
            "SELECT id, device_id, metric, unit FROM series" + where.sql() + " ORDER BY device_id, metric",
            where.params)
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


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

    async def oldest_unacknowledged_ts(self) -> float | None:
        """Timestamp of the oldest reading some consumer has not acknowledged; None when every
        consumer is up to date or nobody consumes."""
        acked = await self.min_watermark()
        if acked is None:
            return None
        # ids follow arrival order: the first row past the lowest watermark is the oldest waiting
        row = await self._db.fetchone("SELECT ts FROM readings WHERE id > ? ORDER BY id LIMIT 1", (acked,))
        return float(row[0]) if row else None


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

    async def merge(self) -> int:
        """Copy readings into history (bulk, in series order); release acknowledged outbox rows.

        The copy runs on the history file's own writer: ingest keeps committing meanwhile.
        Outbox rows are released afterwards, on the main writer, and only up to the marker
        the copy committed, so no reading is ever in neither table.
        """
        total = 0
        t0 = time.perf_counter()
        while True:
            n, upto = await self._db.history.run(self._merge_chunk)
            total += n
            await self._db.write(functools.partial(self._release, upto))
            if n < MERGE_CHUNK:
                break
        if total:
            self._metrics.history_merged.inc(total)
            self._metrics.history_merge_seconds.observe(time.perf_counter() - t0)
            await self._db.history.shrink()
        return total

    @staticmethod
    def _merge_chunk(c: sqlite3.Connection) -> tuple[int, int]:
        merged = merged_upto(c)
        top = int(c.execute("SELECT max(id) FROM main.readings").fetchone()[0] or 0)
        upto = min(top, merged + MERGE_CHUNK)
        n = 0
        if upto > merged:
            # sorted by the clustering key: each series' rows land on its leaf pages in one go
            n = int(c.execute(
                "INSERT OR IGNORE INTO history (series_id, ts, id, value, flags, source)"
                " SELECT series_id, ts, id, value, flags, source FROM main.readings WHERE id > ? AND id <= ?"
                " ORDER BY series_id, ts, id", (merged, upto)).rowcount)
            c.execute("UPDATE history_merge SET merged_id = ?", (upto,))
        return n, max(upto, merged)

    @staticmethod
    def _release(merged: int, c: sqlite3.Connection) -> None:
        """Delete outbox rows that are merged (up to ``merged``) and acknowledged by every consumer.

        The newest row always stays: max(id) is the high-water mark that keeps ids unique.
        When what stays is small beside what goes (the cloud keeping up), the table is
        rebuilt from the rows that stay instead: a row-by-row DELETE writes every page it
        empties (~50 B per reading, the checkpoint as much again), a dropped table only
        its freelist (docs/performance.md, "What a reading costs the card").
        """
        first, top = c.execute("SELECT min(id), max(id) FROM readings").fetchone()
        if first is None:
            return
        release = min(merged_and_acked(merged, synced_upto(c)), top - 1)
        if release < first:
            return
        # upper bounds (ids have gaps where quota drops were), enough to choose the way
        going, staying = release - first + 1, top - release
        if staying * REBUILD_RATIO <= going and _rebuildable(c):
            schema = c.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'readings'").fetchone()[0]
            c.execute(schema.replace("readings", "readings_keep", 1))
            c.execute("INSERT INTO readings_keep SELECT * FROM readings WHERE id > ?", (release,))
            c.execute("DROP TABLE readings")
            c.execute("ALTER TABLE readings_keep RENAME TO readings")
        else:
            c.execute("DELETE FROM readings WHERE id <= ?", (release,))

    async def run_once(self) -> dict[str, int]:
        merged = await self.merge()
        deleted = await self._db.history.run(self._retention)
        dropped = 0
        self._metrics.db_bytes.set(self._db.size_bytes())
        size = await self._db.used_bytes()
        if size > self.quota_bytes:
            if self.policy == "drop_oldest":
                dropped = await self._make_room(size)
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
        await self._db.checkpoint("PASSIVE")
        return {"merged": merged, "retention_deleted": deleted, "quota_dropped": dropped}

    async def _make_room(self, size: int) -> int:
        """Delete until the pages in use fit the quota again, and not a reading more: every
        unsent reading dropped is one the cloud never gets. A page is freed only once all
        its rows are gone, so what a chunk frees says little about a reading's size until
        several chunks are in: each round drops half of what the estimate so far says is
        needed, then measures again."""
        dropped = freed = 0
        chunk = QUOTA_FIRST_CHUNK
        for _ in range(QUOTA_MAX_ROUNDS):
            if size <= self.quota_bytes:
                break
            acked, n = await self._drop_oldest(chunk)
            if not acked and not n:
                break  # nothing left that may go
            after = await self._db.used_bytes()
            if n:
                dropped += n
                freed += max(0, size - after)
                excess = after - self.quota_bytes
                chunk = (max(QUOTA_MIN_CHUNK, min(QUOTA_MAX_CHUNK, math.ceil(excess / 2 / (freed / dropped))))
                         if freed else min(QUOTA_MAX_CHUNK, chunk * 2))
            size = after
        return dropped

    @staticmethod
    def _series_ids(c: sqlite3.Connection) -> list[int]:
        return [int(r[0]) for r in c.execute("SELECT id FROM series")]

    def _retention(self, c: sqlite3.Connection) -> int:
        cutoff = time.time() - self.retention_s
        bound = merged_and_acked(merged_upto(c), synced_upto(c))
        deleted = 0
        for sid in self._series_ids(c):  # per series: a range delete on the clustering key
            deleted += int(c.execute("DELETE FROM history WHERE series_id = ? AND ts < ? AND id <= ?",
                                     (sid, cutoff, bound)).rowcount)
        return deleted

    async def _drop_oldest(self, limit: int) -> tuple[int, int]:
        """Free space: acknowledged history first (the cloud has it), oldest day at a time;
        only when there is none, up to `limit` of the oldest unacknowledged readings, counted
        as drops. Returns (acknowledged rows deleted, unacknowledged readings dropped)."""
        freed, drop = await self._db.history.run(functools.partial(self._drop_history, limit=limit))
        if freed or drop is None:
            return freed, 0
        return 0, await self._db.write(functools.partial(self._drop_unsent, *drop))

    def _drop_history(self, c: sqlite3.Connection, limit: int) -> tuple[int, tuple[int, int] | None]:
        """On the history writer: delete the oldest acknowledged day of history; when there is
        none, pick the oldest `limit` unacknowledged readings, delete their history copies and
        return their id range for the main writer to drop from the outbox. History goes first:
        once the outbox rows are gone, nothing says where their copies are."""
        synced = synced_upto(c)
        bound = merged_and_acked(merged_upto(c), synced)
        oldest = c.execute("SELECT min(m) FROM (SELECT (SELECT min(ts) FROM history h WHERE h.series_id = s.id"
                           " AND h.id <= ?) AS m FROM series s)", (bound,)).fetchone()[0]
        if oldest is not None:
            freed = 0
            for sid in self._series_ids(c):
                freed += int(c.execute("DELETE FROM history WHERE series_id = ? AND ts < ? AND id <= ?",
                                       (sid, oldest + 86400.0, bound)).rowcount)
            if freed:
                return freed, None
        if synced is None:
            return 0, None  # nothing is waiting for a consumer: there is nothing unsynced to drop
        top = int(c.execute("SELECT max(id) FROM main.readings").fetchone()[0] or 0)
        upto = c.execute("SELECT max(id) FROM (SELECT id FROM main.readings WHERE id > ? AND id < ?"
                         " ORDER BY id LIMIT ?)", (synced, top, limit)).fetchone()[0]
        if upto is None:
            return 0, None
        c.execute("DELETE FROM history WHERE (series_id, ts, id) IN"
                  " (SELECT series_id, ts, id FROM main.readings WHERE id > ? AND id <= ?)", (synced, upto))
        return 0, (synced, int(upto))

    @staticmethod
    def _drop_unsent(first: int, upto: int, c: sqlite3.Connection) -> int:
        """On the main writer: drop outbox rows in (first, upto] that are still unacknowledged
        (the sync may have caught up since they were picked), and count them."""
        synced = synced_upto(c)
        if synced is None:
            return 0
        n = int(c.execute("DELETE FROM readings WHERE id > ? AND id <= ?", (max(first, synced), upto)).rowcount)
        c.execute("INSERT INTO counters (name, value) VALUES ('dropped_quota', ?)"
                  " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (n,))
        return n

    async def correct_clock(self, step_s: float, from_id: int) -> int:
        """Shift readings stamped by the unsynchronised clock of this boot by the step NTP made."""
        unsynced, corrected = int(TimeFlag.CLOCK_UNSYNCED), int(TimeFlag.CORRECTED)
        args = (step_s, corrected, from_id, unsynced, int(TimeFlag.NODE_TS))

        def fix(c: sqlite3.Connection) -> int:
            # on the history writer, two transactions with nothing between them (no merge can
            # run): the outbox first, since that is what the cloud gets; a crash before the
            # second leaves history's copies uncorrected but still flagged as unsynchronised
            where = "WHERE id >= ? AND flags & ? AND NOT flags & ?"
            upd = f"UPDATE main.readings SET ts = ts + ?, flags = flags | ? {where}"
            with transaction(c, "IMMEDIATE"):
                merged = merged_upto(c)
                # rows merged but still in the outbox are fixed in both places, counted once
                c.execute(f"{upd} AND id <= ?", (*args, merged))
                n = c.execute(f"{upd} AND id > ?", (*args, merged)).rowcount
            with transaction(c):
                n += c.execute(f"UPDATE history SET ts = ts + ?, flags = flags | ? {where}", args).rowcount
            return int(n)

        n = await self._db.history.run(fix, transaction=False)
        log.info("store.clock_corrected", readings=n, step_s=round(step_s, 3))
        return n
