"""The store: group commit, ids that are never reused, migrations, retention, quota, clock fix."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.metrics import Metrics
from gateway.models import Reading, TimeFlag
from gateway.store.database import Database
from gateway.store.migrations import MIGRATIONS, current_version
from gateway.store.readings import Maintenance, Outbox, ReadingsQuery


def r(device: str = "n1", metric: str = "temperature", value: float = 1.0, ts: float | None = None,
      flags: int = 0) -> Reading:
    return Reading(device=device, metric=metric, value=value, unit="°C", ts=ts or time.time(), flags=flags)


@pytest.fixture
async def db(tmp_path: Path):
    d = Database(tmp_path / "s.db", Metrics(), commit_interval_ms=5)
    await d.open()
    yield d
    await d.close()


async def test_concurrent_writes_share_commits_and_get_consecutive_ids(db: Database) -> None:
    results = await asyncio.gather(*(db.add_readings([r(value=i), r(metric="humidity", value=i)])
                                     for i in range(500)))
    ids = [i for rng in results for i in rng]
    assert ids == list(range(1, 1001))
    assert db.commits < 50  # 500 writers, far fewer fsyncs
    rows = await db.fetchall("SELECT count(*) FROM readings")
    assert rows[0][0] == 1000


async def test_a_failing_write_does_not_take_the_batch_down(db: Database) -> None:
    good = db.add_readings([r()])
    bad = db.write(lambda c: c.execute("INSERT INTO no_such_table VALUES (1)"))
    res = await asyncio.gather(good, bad, return_exceptions=True)
    assert list(res[0]) == [1]
    assert isinstance(res[1], sqlite3.OperationalError)


async def test_close_commits_everything_acknowledged(tmp_path: Path) -> None:
    d = Database(tmp_path / "c.db", Metrics(), commit_interval_ms=200)
    await d.open()
    pending = [asyncio.ensure_future(d.add_readings([r(value=i)])) for i in range(50)]
    await asyncio.sleep(0)
    await d.close()
    assert all(p.done() and not p.exception() for p in pending)
    conn = sqlite3.connect(tmp_path / "c.db")
    assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 50


async def test_ids_are_never_reused_after_retention_emptied_the_store(tmp_path: Path) -> None:
    path = tmp_path / "ids.db"
    d = Database(path, Metrics())
    await d.open()
    await d.add_readings([r(ts=time.time() - 90 * 86400) for _ in range(10)])
    await Outbox(d).register("cloud")
    await d.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 10"))
    m = Maintenance(d, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    await m.run_once()  # everything is old and acknowledged: merged, then deleted
    assert await ReadingsQuery(d).count() == 0
    await d.close()
    d = Database(path, Metrics())
    await d.open()
    assert list(await d.add_readings([r()])) == [11]
    await d.close()


async def test_merge_moves_readings_to_history_and_keeps_unacknowledged_ones_in_the_outbox(db: Database) -> None:
    await db.add_readings([r(value=i) for i in range(100)])
    await Outbox(db).register("cloud")
    await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 40"))
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    assert await m.merge() == 100
    # acknowledged rows left the outbox; the rest wait there for the cloud
    assert (await db.fetchone("SELECT min(id), max(id) FROM readings"))[:] == (41, 100)
    await db.add_readings([r(value=100.0)])
    q = ReadingsQuery(db)
    assert await q.count() == 101  # history + unmerged tail, nothing twice
    assert [x.value for x in await q.history("n1", limit=3)] == [100.0, 99.0, 98.0]


async def test_reopening_applies_pending_migrations_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    d = Database(path, Metrics())
    assert await d.open() == sorted(m[0] for m in MIGRATIONS)
    await d.add_readings([r(value=42.0)])
    await d.close()
    d = Database(path, Metrics())
    assert await d.open() == []  # nothing pending the second time
    rows = await ReadingsQuery(d).history("n1")
    assert [x.value for x in rows] == [42.0]
    await d.close()
    assert current_version(sqlite3.connect(path)) == max(m[0] for m in MIGRATIONS)


def test_migrations_are_numbered_1_to_n_without_gaps() -> None:
    # user_version records only the highest number applied: a gap would be skipped forever
    assert sorted(m[0] for m in MIGRATIONS) == list(range(1, len(MIGRATIONS) + 1))


async def test_refuses_a_database_from_a_newer_siteward(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute("PRAGMA user_version = 999")
    d = Database(path, Metrics())
    with pytest.raises(RuntimeError, match="newer"):
        await d.open()


async def test_history_filters_by_metric_and_time(db: Database) -> None:
    now = time.time()
    await db.add_readings([r(value=i, ts=now - 100 + i) for i in range(100)]
                          + [r(metric="humidity", value=5, ts=now)])
    q = ReadingsQuery(db)
    rows = await q.history("n1", "temperature", since=now - 50, until=now - 41)
    assert [x.value for x in rows] == [float(v) for v in range(59, 49, -1)]
    assert await q.metrics_of("n1") == ["humidity", "temperature"]


async def test_retention_deletes_only_synced_and_old(db: Database) -> None:
    old = time.time() - 40 * 86400
    await db.add_readings([r(ts=old) for _ in range(10)] + [r() for _ in range(5)])
    out = Outbox(db)
    await out.register("cloud")
    await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 6 WHERE name = 'cloud'"))
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    assert (await m.run_once())["retention_deleted"] == 6  # old rows 7..10 are not synced yet: kept
    rows = await ReadingsQuery(db).history("n1", limit=100)
    assert sorted(x.id for x in rows) == list(range(7, 16))


async def test_quota_drop_oldest_counts_every_drop_persistently(db: Database) -> None:
    await db.add_readings([r(value=i) for i in range(30_000)])
    await Outbox(db).register("cloud")  # nothing acknowledged: every drop loses unsent data
    metrics = Metrics()
    m = Maintenance(db, metrics, retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    await m.merge()
    full = await db.used_bytes()
    m.quota_bytes = full // 2
    res = await m.run_once()
    dropped = res["quota_dropped"]
    # no more than it takes: it stops as soon as the pages in use fit, a few pages under at most
    used = await db.used_bytes()
    assert m.quota_bytes - 32 * 1024 < used <= m.quota_bytes
    assert 10_000 < dropped < 30_000
    assert (await db.fetchone("SELECT min(id) FROM readings"))[0] == dropped + 1  # the oldest went
    assert await ReadingsQuery(db).count() == 30_000 - dropped
    assert (await m.run_once())["quota_dropped"] == 0  # under quota: the next run leaves it alone
    m2 = Maintenance(db, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    await m2.load()
    assert m2.dropped_total == dropped
    assert f'siteward_dropped_total{{policy="quota_drop_oldest"}} {float(dropped)}'.encode() in metrics.render()


async def _old_half_acknowledged(db: Database) -> None:
    """5,000 readings of three days ago the cloud has acknowledged, then 5,000 fresh unsent ones."""
    await db.add_readings([r(value=i, ts=time.time() - 3 * 86400) for i in range(5000)])
    await db.add_readings([r(value=i) for i in range(5000)])
    await Outbox(db).register("cloud")
    await db.write(lambda c: c.execute("UPDATE outbox_consumers SET acked_id = 5000"))


async def test_quota_frees_acknowledged_history_before_dropping_anything_unsent(db: Database) -> None:
    await _old_half_acknowledged(db)
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    await m.merge()
    # the acknowledged half of history is about a fifth of the pages in use
    m.quota_bytes = int(await db.used_bytes() * 0.9)
    assert (await m.run_once())["quota_dropped"] == 0
    assert await ReadingsQuery(db).count() == 5000  # the cloud had the old half
    assert await db.used_bytes() <= m.quota_bytes


async def test_quota_drops_unsent_only_once_acknowledged_history_is_gone(db: Database) -> None:
    await _old_half_acknowledged(db)
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=0.01, quota_policy="drop_oldest")
    dropped = (await m.run_once())["quota_dropped"]
    # a quota smaller than an empty store: everything goes except the newest row (the id high-water mark)
    assert dropped == 4999
    assert [x.id for x in await ReadingsQuery(db).history("n1")] == [10_000]


async def test_quota_refuse_new_keeps_what_is_stored(db: Database) -> None:
    await db.add_readings([r(value=i) for i in range(5000)])
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=0.01, quota_policy="refuse_new")
    await m.run_once()
    assert m.refusing
    assert await ReadingsQuery(db).count() == 5000


async def test_clock_correction_shifts_only_unsynced_gateway_stamped_readings(db: Database) -> None:
    unsynced = int(TimeFlag.CLOCK_UNSYNCED)
    await db.add_readings([r(ts=1000.0, flags=unsynced), r(ts=2000.0, flags=0),
                           r(ts=3000.0, flags=int(TimeFlag.NODE_TS))])
    m = Maintenance(db, Metrics(), retention_days=30, quota_mb=1000, quota_policy="drop_oldest")
    assert await m.correct_clock(3600.0, from_id=1) == 1
    await m.merge()  # the correction must hold in history as well as in the outbox
    rows = sorted(await ReadingsQuery(db).history("n1"), key=lambda x: x.id)
    assert [(x.ts, x.flags) for x in rows] == [(4600.0, unsynced | int(TimeFlag.CORRECTED)), (2000.0, 0),
                                        (3000.0, int(TimeFlag.NODE_TS))]


async def test_closing_while_a_cancelled_checkpoint_still_runs_is_safe(tmp_path: Path) -> None:
    # a checkpoint task cancelled at shutdown keeps running in its thread; closing the
    # store must wait for it, not close the connection under it (this crashed the process)
    for i in range(20):
        d = Database(tmp_path / f"ck{i}.db", Metrics(), commit_interval_ms=0)
        await d.open()
        await d.add_readings([r(value=v) for v in range(2000)])
        task = asyncio.ensure_future(d.checkpoint("PASSIVE"))
        await asyncio.sleep(0)
        task.cancel()
        await d.close()
    # reaching here without a crash is the point; the data is there too
    assert sqlite3.connect(tmp_path / "ck19.db").execute("SELECT count(*) FROM readings").fetchone()[0] == 2000
