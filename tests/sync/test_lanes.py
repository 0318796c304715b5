"""Lanes: events before bulk readings, live readings interleaved with a backlog drain,
per-device order within a lane. Behaviour, not speed (speed is bench/sync.py's)."""

from __future__ import annotations

import asyncio

from gateway.bus import LiveBus
from gateway.store.events import EventLog
from tests.sync.cloud import CloudConsumer, store_readings
from tests.sync.conftest import add_readings, running_sync, store_of


async def test_events_go_before_the_backlog(sync_settings, consumer: CloudConsumer) -> None:
    s = sync_settings()
    async with store_of(s) as db:
        await add_readings(db, 20_000)
        events = EventLog(db, LiveBus())
        for i in range(5):
            await events.record("alert.raised", "node-1", {"n": i})
        async with running_sync(s):
            await consumer.wait_for_store(s.db_path)
            await consumer.wait_for(lambda: len(consumer.seen.events) == 5, what="the events")
    kinds = [t.rsplit("/", 1)[1] for t, _ in consumer.seen.raw]
    data = [k for k in kinds if k in ("events", "readings")]
    assert data[0] == "events", data[:5]


async def test_live_readings_interleave_with_the_drain(sync_settings, consumer: CloudConsumer) -> None:
    # a small window and batches, so that the backlog takes many round trips
    s = sync_settings(batch_max_readings=200, inflight_window=4, live_reserved_slots=1)
    async with store_of(s) as db:
        await add_readings(db, 25_000)
        async with running_sync(s) as svc:
            await consumer.wait_for(lambda: len(consumer.seen.readings) > 1000, what="the drain to start")
            live: list[int] = []
            for i in range(20):
                live.extend(await add_readings(db, 1, devices=1, start=500_000 + i, metric="live"))
                await asyncio.sleep(0.02)
            await consumer.wait_for_store(s.db_path)
            assert svc.scheduler is not None and min(live) > svc.scheduler.live_start
    order = consumer.seen.order
    last_backlog = max(i for i, (lane, _) in enumerate(order) if lane == "backlog")
    live_positions = [i for i, (lane, rid) in enumerate(order) if rid in set(live)]
    assert all(order[i][0] == "live" for i in live_positions)
    # the fresh readings did not wait for the backlog to finish
    assert max(live_positions) < last_backlog, "live readings queued behind the whole backlog"


async def test_per_device_order_within_a_lane(sync_settings, consumer: CloudConsumer) -> None:
    s = sync_settings(batch_max_readings=300)
    async with store_of(s) as db:
        await add_readings(db, 10_000, devices=7)
        async with running_sync(s):
            for i in range(50):
                await add_readings(db, 7, devices=7, start=100_000 + 7 * i, metric="live")
                await asyncio.sleep(0.01)
            await consumer.wait_for_store(s.db_path)
    device_of = {rid: r["device"] for rid, r in store_readings(s.db_path).items()}
    last: dict[tuple[str, str], int] = {}
    for lane, rid in consumer.seen.order:
        key = (lane, device_of[rid])
        assert rid > last.get(key, 0), f"{key}: {rid} after {last[key]}"
        last[key] = rid
