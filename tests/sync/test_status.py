"""What the gateway tells people and Prometheus about the uplink: GET /api/v1/sync, /metrics,
/healthz, from the store, true whether the sync process runs or not."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.outbox import backlog_of
from tests.sync.cloud import CloudBroker, CloudConsumer, TcpProxy
from tests.sync.conftest import add_readings, cloud_section, running_sync, store_of
from tests.sync.pki import Pki
from tests.web.conftest import Client, Site


async def view_until(client: Client, ok: Callable[[dict[str, Any]], bool], within: float = 10.0) -> dict[str, Any]:
    """GET /api/v1/sync until ``ok`` (the sync writes its status row every 0.5 s here)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        v = (await client.get("/api/v1/sync")).json
        if ok(v) or asyncio.get_running_loop().time() > deadline:
            return v  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)


def _count_unacked(path: Path, base: int, acked: list[tuple[int, int]]) -> tuple[int, float | None]:
    conn = sqlite3.connect(path)
    try:
        rows = [(rid, ts) for rid, ts in conn.execute("SELECT id, ts FROM readings WHERE id > ? ORDER BY id", (base,))
                if not any(a <= rid <= b for a, b in acked)]
        return len(rows), (rows[0][1] if rows else None)
    finally:
        conn.close()


@pytest.mark.parametrize(("base", "acked", "drop_prefix"), [
    (0, [], 0), (1000, [], 0), (1000, [(3000, 3999), (5000, 5004)], 0), (0, [], 2500),
    (0, [(2000, 2600)], 2500),  # the lowest remaining row is itself acknowledged
    (10_000, [], 0),
])
async def test_backlog_figures_equal_a_full_count(make_settings, base: int, acked: list[tuple[int, int]],
                                                  drop_prefix: int) -> None:
    s = make_settings()
    async with store_of(s) as db:
        await add_readings(db, 10_000)
        if drop_prefix:
            await db.write(lambda c: c.execute("DELETE FROM readings WHERE id <= ?", (drop_prefix,)))
    conn = sqlite3.connect(s.db_path)
    try:
        assert backlog_of(conn, base, acked) == _count_unacked(s.db_path, base, acked)
    finally:
        conn.close()


async def test_api_and_metrics_tell_the_truth_about_the_uplink(make_settings, cloud: CloudBroker, pki: Pki,
                                                               consumer: CloudConsumer, proxy: TcpProxy) -> None:
    from gateway.app import Gateway

    s = make_settings(cloud=cloud_section(cloud, pki, port=proxy.port))
    async with Gateway(s) as gw:
        site = Site(gw)
        try:
            viewer = await site.user("watcher", "viewer")
            anon = site.client()
            assert (await anon.get("/api/v1/sync")).status == 401

            await add_readings(gw.db, 1500)
            r = await viewer.get("/api/v1/sync")
            assert r.status == 200, r
            v = r.json
            # no sync process yet: nothing claims a connection, the backlog is counted from the store
            assert v["enabled"] is True and v["process"]["running"] is False and v["connected"] is False
            assert v["backlog"]["count"] == 1500 and v["backlog"]["oldest_age_s"] >= 0

            async with running_sync(s) as svc:
                await consumer.wait_for_store(s.db_path)
                await consumer.wait_for(lambda: svc.figures.readings_acked >= 1500, what="acks")
                v = await view_until(viewer, lambda v: v["readings_acked"] >= 1500)
                assert v["process"]["running"] and v["connected"] and v["connected_since"]
                assert v["backlog"] == {"count": 0, "oldest_ts": None, "oldest_age_s": None}
                assert v["readings_acked"] >= 1500 and v["broker"]["port"] == proxy.port

                await proxy.down()  # the uplink fails; the sync notices and says so
                await consumer.wait_for(lambda: not svc.figures.connected, what="the outage")
                await add_readings(gw.db, 200, start=5000)
                v = await view_until(viewer, lambda v: not v["connected"])
                assert v["process"]["running"] and not v["connected"] and v["last_error"]
                assert v["backlog"]["count"] == 200
                await gw.db.write(lambda c: c.execute(
                    "INSERT INTO counters (name, value) VALUES ('dropped_quota', 3)"))

                await gw.sync_gauges.refresh()
                text = (await anon.get("/metrics")).text
                assert "siteward_sync_process_up 1.0" in text and "siteward_sync_connected 0.0" in text
                assert "siteward_sync_backlog_readings 200.0" in text
                assert "siteward_sync_dropped_by_policy 3.0" in text
                assert "siteward_sync_drops_unreported 3.0" in text
                health = (await anon.get("/healthz")).json
                assert health["components"]["cloud_sync"]["connected"] is False

                await proxy.up()
                await consumer.wait_for_store(s.db_path)
                await consumer.wait_for(lambda: any(e["kind"] == "readings.dropped"
                                                    for e in consumer.seen.events.values()), what="drop report")
                v = await view_until(viewer, lambda v: v["connected"] and v["dropped_reported"] == 3)
                assert v["connected"] and v["backlog"]["count"] == 0
                assert v["dropped_by_policy"] == 3 and v["dropped_reported"] == 3
        finally:
            await site.close()
