"""A corrupt SQLite file at start: checked, salvaged, set aside, reported; the gateway keeps serving."""

from __future__ import annotations

import glob
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from gateway.metrics import Metrics
from gateway.models import Reading
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.files import history_path
from gateway.store.readings import Maintenance, Outbox
from gateway.store.salvage import ID_GAP, integrity_problem

N = 20_000


async def _fill(path: Path, n: int = N) -> None:
    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    now = time.time()
    for start in range(0, n, 5000):
        await db.add_readings([Reading(device="n1", metric="t", value=float(i), unit="C", ts=now - n + i)
                               for i in range(start, min(n, start + 5000))])
    await db.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('marker', 'kept')"))
    await db.checkpoint("TRUNCATE")
    await db.close()


def _leaf_pages(path: Path, table: str) -> list[int]:
    """Page numbers of the table's b-tree leaves (via the dbstat virtual table when available,
    else every page past the first tenth of the file, which is where the readings are)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                            (table,)).fetchall()
        return [r[0] for r in rows]
    except sqlite3.OperationalError:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        return list(range(pages // 10, pages))
    finally:
        conn.close()


def _smash(path: Path, pages: list[int]) -> None:
    with open(path, "rb") as f:  # the header says the page size (bytes 16-17; 1 means 65536)
        page_size = int.from_bytes(f.read(100)[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    with open(path, "r+b") as f:
        for p in pages:
            f.seek((p - 1) * page_size)
            f.write(b"\xa5" * page_size)


async def test_a_damaged_table_is_salvaged_around_the_bad_pages(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    await _fill(path)
    leaves = _leaf_pages(path, "readings")
    assert len(leaves) > 20
    middle = leaves[len(leaves) // 2 : len(leaves) // 2 + 3]
    _smash(path, middle)
    assert integrity_problem(path) is not None

    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        rep = db.salvage_report
        assert rep is not None
        # the broken file is kept beside, under a name saying what it is
        assert glob.glob(rep.broken_file) and ".corrupt-" in rep.broken_file
        copied = rep.tables["readings"]["copied"]
        # three leaves of ~N/len(leaves) rows each are lost, the rest (before AND after) is kept
        assert N - 4 * (N // len(leaves)) < copied < N
        assert rep.tables["readings"]["skipped_ranges"] >= 1
        rows = await db.fetchall("SELECT min(id), max(id), count(*) FROM readings")
        assert rows[0][0] == 1 and rows[0][1] == N and rows[0][2] == copied
        assert (await db.fetchone("SELECT value FROM meta WHERE key = 'marker'"))[0] == "kept"
        # serving goes on, and new ids continue above the old ones (they are idempotency keys)
        ids = await db.add_readings([Reading(device="n1", metric="t", value=1.0, unit="C", ts=time.time())])
        assert ids[0] == N + 1
        assert await db.integrity_check() == "ok"
    finally:
        await db.close()
    # the next start finds a sound file: no second salvage
    again = Database(path, Metrics())
    await again.open()
    assert again.salvage_report is None
    await again.close()


async def test_a_damaged_history_file_is_salvaged_and_the_outbox_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    await _fill(path)
    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    outbox = Outbox(db)
    await outbox.register("cloud")
    await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = ?", (N // 2,)))
    await Maintenance(db, db.metrics, retention_days=30, quota_mb=1000, quota_policy="drop_oldest").merge()
    await db.history.run(lambda c: c.execute("PRAGMA hist.wal_checkpoint(TRUNCATE)").fetchone(), transaction=False)
    await db.close()
    hist = history_path(path)
    leaves = _leaf_pages(hist, "history")
    _smash(hist, leaves[len(leaves) // 2: len(leaves) // 2 + 2])
    assert integrity_problem(hist) is not None

    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        assert db.salvage_report is None  # the main file was sound and is left alone
        rep = db.history_salvage_report
        assert rep is not None and glob.glob(rep.broken_file)
        # a WITHOUT ROWID table is copied in key order up to the damage: what came before is kept
        assert 0 < rep.tables["history"]["copied"] < N
        # the unacknowledged half is still in the outbox, whole: the cloud loses nothing
        row = await db.fetchone("SELECT count(*), min(id), max(id) FROM main.readings")
        assert tuple(row) == (N - N // 2, N // 2 + 1, N)
        assert await db.integrity_check() == "ok"
        ids = await db.add_readings([Reading(device="n1", metric="t", value=1.0, unit="C", ts=time.time())])
        assert ids[0] == N + 1
    finally:
        await db.close()


async def test_a_file_that_is_not_a_database_at_all_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    await _fill(path, 100)
    _smash(path, [1])  # the header and the schema: nothing can be located any more
    db = Database(path, Metrics(), commit_interval_ms=0)
    await db.open()
    try:
        rep = db.salvage_report
        assert rep is not None and rep.rows_copied == 0
        assert "not a database" in rep.problem or "malformed" in rep.problem
        assert rep.sequence_lost
        # ids of readings that may already be in the cloud are not handed out again
        ids = await db.add_readings([Reading(device="n1", metric="t", value=1.0, unit="C", ts=time.time())])
        assert ids[0] > ID_GAP
    finally:
        await db.close()
    assert len(glob.glob(str(tmp_path / "siteward.db.corrupt-*"))) == 1


async def test_a_sound_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "siteward.db"
    await _fill(path, 10)
    db = Database(path, Metrics())
    await db.open()
    assert db.salvage_report is None
    await db.close()
    assert glob.glob(str(tmp_path / "*.corrupt-*")) == []


async def test_the_gateway_reports_a_salvage_in_healthz_and_keeps_serving(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    from gateway.app import Gateway

    settings = make_settings()
    await _fill(settings.db_path, 5000)
    _smash(settings.db_path, _leaf_pages(settings.db_path, "readings")[3:5])
    async with Gateway(settings) as gw, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.web_port}/healthz") as resp:
            body = await resp.json()
        salvage = body["components"]["store_salvage"]
        assert salvage["ok"] is False and ".corrupt-" in salvage["broken_file"]
        assert 4000 < salvage["rows_copied"] < 5000
        assert body["status"] == "degraded"
        events = await gw.db.fetchall("SELECT kind FROM events WHERE kind = 'store.salvaged'")
        assert len(events) == 1
        # still collecting
        ids = await gw.db.add_readings([Reading(device="n9", metric="t", value=1.5, unit="", ts=time.time())])
        assert ids[0] == 5001
