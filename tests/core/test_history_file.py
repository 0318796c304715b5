"""History in a file of its own: the merge never holds up ingest, and a single-file store from
an older Siteward moves over without losing or doubling a reading."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from gateway.metrics import Metrics
from gateway.models import Reading
from gateway.store import history
from gateway.store.database import Database
from gateway.store.files import connect, history_path
from gateway.store.migrations import LAST_SINGLE_FILE_VERSION, MIGRATIONS, apply_migrations, current_version
from gateway.store.readings import Maintenance, Outbox, ReadingsQuery


def _readings(n: int, start: float, device: str = "n1") -> list[Reading]:
    return [Reading(device=device, metric="temperature", value=float(i), unit="°C", ts=start + i) for i in range(n)]


def _maintenance(db: Database) -> Maintenance:
    return Maintenance(db, db.metrics, retention_days=30, quota_mb=1000, quota_policy="drop_oldest")


async def test_ingest_commits_while_the_history_file_is_locked_by_a_merge(tmp_path: Path) -> None:
    db = Database(tmp_path / "siteward.db", Metrics(), commit_interval_ms=5)
    await db.open()
    try:
        await db.add_readings(_readings(100, time.time() - 200))
        holding = threading.Event()
        release = threading.Event()

        def long_merge(c: sqlite3.Connection) -> None:
            # take the history file's write lock, as a merge does, and keep it until told
            c.execute("UPDATE history_merge SET merged_id = merged_id")
            holding.set()
            assert release.wait(30), "the test never released the history writer"

        merge = asyncio.ensure_future(db.history.run(long_merge))
        await asyncio.to_thread(holding.wait, 10)
        # with one file this commit would wait for the merge, which waits for this commit: a hang
        ids = await asyncio.wait_for(db.add_readings(_readings(10, time.time() - 50)), 10)
        assert list(ids) == list(range(101, 111))
        assert not merge.done()  # the "merge" really was in progress the whole time
        release.set()
        await merge
        assert await ReadingsQuery(db).count("n1") == 110
    finally:
        await db.close()
    # the history file sits beside the main one; nothing else appeared (a URI taken for a name)
    assert _store_files(tmp_path) == ["siteward-history.db", "siteward.db"]


def _store_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm")))


async def test_a_merge_moves_rows_to_the_history_file_and_queries_see_every_reading_once(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db", Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        outbox = Outbox(db)
        await outbox.register("cloud")
        now = time.time()
        await db.add_readings(_readings(300, now - 1000))
        await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 200"))
        merged = await _maintenance(db).merge()
        await db.add_readings(_readings(50, now - 500))  # an unmerged tail
        q = ReadingsQuery(db)
        assert merged == 300
        assert await q.count("n1") == 350
        values = [x.value for x in await q.history("n1", limit=1000)]
        assert sorted(values) == sorted([float(i) for i in range(300)] + [float(i) for i in range(50)])
        # acknowledged and merged rows left the main file; the rest wait for the cloud there
        left = (await db.fetchone("SELECT count(*), min(id) FROM main.readings"))
        assert (left[0], left[1]) == (150, 201)
        assert (await db.fetchone("SELECT count(*) FROM hist.history"))[0] == 300
        assert (await db.fetchone("SELECT merged_id FROM hist.history_merge"))[0] == 300
        assert await db.integrity_check() == "ok"
    finally:
        await db.close()


def _legacy_store(path: Path, n: int, merged: int) -> None:
    """A store as Siteward wrote it up to schema 5: history in the main file, marker in meta."""
    conn = connect(path)
    apply_migrations(conn, upto=LAST_SINGLE_FILE_VERSION)
    now = time.time()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO series (id, device_id, metric, unit) VALUES (1, 'old-1', 'temperature', '°C')")
    rows = [(i, 1, now - 10_000 + i, float(i), 0, 0) for i in range(1, n + 1)]
    conn.executemany("INSERT INTO history (id, series_id, ts, value, flags, source) VALUES (?, ?, ?, ?, ?, ?)",
                     rows[:merged])
    # merged but not yet acknowledged rows are in both tables, as the old merge left them
    conn.executemany("INSERT INTO readings (id, series_id, ts, value, flags, source) VALUES (?, ?, ?, ?, ?, ?)",
                     rows[merged // 2:])
    conn.execute("INSERT INTO meta (key, value) VALUES ('history_merged_id', ?)", (str(merged),))
    conn.execute("COMMIT")
    conn.close()


async def _open_and_count(path: Path) -> tuple[int, list[float], range]:
    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        q = ReadingsQuery(db)
        count = await q.count("old-1")
        values = sorted(x.value for x in await q.history("old-1", limit=10_000))
        ids = await db.add_readings(_readings(1, time.time(), device="new-1"))
        return count, values, ids
    finally:
        await db.close()


async def test_a_single_file_store_from_an_older_siteward_moves_its_history_over(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    _legacy_store(path, n=2000, merged=1500)
    count, values, ids = await _open_and_count(path)
    assert count == 2000 and values == [float(i) for i in range(1, 2001)]
    assert list(ids) == [2001]  # ids go on above the old ones
    conn = sqlite3.connect(path)
    assert current_version(conn) == max(m[0] for m in MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'history'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'history_merged_id'").fetchone()[0] == 0
    hist = sqlite3.connect(history_path(path))
    assert hist.execute("SELECT count(*), max(id) FROM history").fetchone() == (1500, 1500)
    assert hist.execute("SELECT merged_id FROM history_merge").fetchone()[0] == 1500


async def test_a_move_interrupted_before_the_old_table_was_dropped_is_done_once(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    _legacy_store(path, n=600, merged=400)
    history.prepare(path)
    conn = connect(path)
    history.move_legacy_history(conn, path)  # copied and committed, then the power went
    conn.close()
    count, values, _ids = await _open_and_count(path)
    assert count == 600 and values == [float(i) for i in range(1, 601)]


async def test_with_the_cloud_keeping_up_the_outbox_is_rebuilt_and_ids_go_on(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db", Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        await Outbox(db).register("cloud")
        now = time.time()
        await db.add_readings(_readings(1000, now - 2000))
        await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 990"))
        columns = [tuple(r) for r in await db.fetchall("PRAGMA main.table_info(readings)")]
        await _maintenance(db).merge()
        # 990 acknowledged and merged rows went with the old table; the 10 the cloud still
        # waits for stay, the newest among them
        rows = await db.fetchall("SELECT id FROM main.readings ORDER BY id")
        assert [r[0] for r in rows] == list(range(991, 1001))
        assert [tuple(r) for r in await db.fetchall("PRAGMA main.table_info(readings)")] == columns
        assert (await db.fetchone("SELECT count(*) FROM sqlite_master WHERE name = 'readings_keep'"))[0] == 0
        assert list(await db.add_readings(_readings(5, now - 900))) == list(range(1001, 1006))
        q = ReadingsQuery(db)
        assert await q.count("n1") == 1005  # nothing lost to local queries either
        # and again: the rebuilt table's schema (the name now quoted) rebuilds the same way
        await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 1005"))
        await _maintenance(db).merge()
        assert [r[0] for r in await db.fetchall("SELECT id FROM main.readings")] == [1005]
        assert await q.count("n1") == 1005
        assert await db.integrity_check() == "ok"
    finally:
        await db.close()
    # a restart takes the high-water mark from the rebuilt table
    again = Database(tmp_path / "s.db", Metrics(), commit_interval_ms=0)
    await again.open()
    try:
        assert list(await again.add_readings(_readings(1, now))) == [1006]
    finally:
        await again.close()
