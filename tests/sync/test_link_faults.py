"""Faults on the way to the cloud, with the sync running in this process: broker down at
start, broker restarted mid-stream, connection cut mid-batch, black-holed connection.

After each: every reading of the store reached the cloud with its original timestamp,
duplicates only from messages in flight at the fault (and counted by the sync), SQLite
integrity check passes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.store.database import Database
from tests.sync.cloud import CloudBroker, CloudConsumer, TcpProxy, integrity
from tests.sync.conftest import add_readings, running_sync, store_of


@contextlib.asynccontextmanager
async def live_ingest(db: Database, every_s: float = 0.02) -> AsyncIterator[list[int]]:
    """Fresh readings trickling in (as nodes keep reporting) for the duration of the block."""
    ids: list[int] = []
    stop = asyncio.Event()

    async def run() -> None:
        n = 0
        while not stop.is_set():
            r = await add_readings(db, 3, devices=3, start=1_000_000 + n, metric="live")
            ids.extend(r)
            n += 3
            await asyncio.sleep(every_s)

    task = asyncio.create_task(run())
    try:
        yield ids
    finally:
        stop.set()
        await task


def assert_clean(consumer: CloudConsumer, svc, db_path) -> None:  # type: ignore[no-untyped-def]
    consumer.check_against_store(db_path)
    assert consumer.duplicates <= svc.figures.duplicates_resent, (
        f"cloud saw {consumer.duplicates} duplicates, the sync counted {svc.figures.duplicates_resent} re-sent")
    assert integrity(db_path) == "ok"


async def test_broker_down_at_start(sync_settings, cloud: CloudBroker, consumer: CloudConsumer) -> None:
    # a long backoff: only the reachability probe can start the drain promptly
    s = sync_settings(backoff_initial_s=30.0, backoff_max_s=60.0)
    cloud.stop()  # the consumer's persistent session survives in the broker's persistence file
    async with store_of(s) as db:
        await add_readings(db, 5000)
        async with running_sync(s) as svc:
            await consumer.wait_for(lambda: svc.link.backoff.attempt >= 1 and svc.figures.last_error is not None,
                                    what="a failed first attempt")
            assert not svc.figures.connected
            async with live_ingest(db):
                cloud.start()
                await consumer.wait_for(lambda: svc.figures.connected, within=15, what="the sync to connect")
            await consumer.wait_for_store(s.db_path)
            # connected by the probe, not by waiting out a 15-30 s backoff
            assert svc.link.shortcuts >= 1
            assert svc.link.backoff.nominal() >= 30.0 or svc.figures.sessions == 1
        assert_clean(consumer, svc, s.db_path)
        assert consumer.duplicates == 0


async def test_broker_restarted_mid_stream(sync_settings, cloud: CloudBroker, consumer: CloudConsumer) -> None:
    s = sync_settings(batch_max_readings=1000)
    async with store_of(s) as db:
        await add_readings(db, 40_000)
        async with running_sync(s) as svc:
            async with live_ingest(db):
                await consumer.wait_for(lambda: len(consumer.seen.readings) > 5000, what="the drain to start")
                await asyncio.to_thread(cloud.restart)
                await consumer.wait_for(lambda: svc.figures.sessions >= 2, within=15, what="a reconnection")
                await asyncio.sleep(0.3)
            await consumer.wait_for_store(s.db_path)
            assert svc.figures.sessions >= 2
        assert_clean(consumer, svc, s.db_path)


async def test_connection_cut_mid_batch(sync_settings, cloud: CloudBroker, consumer: CloudConsumer,
                                        proxy: TcpProxy) -> None:
    # big messages, so that a cut lands inside one being transmitted
    s = sync_settings(port=proxy.port, batch_max_readings=2000)
    async with store_of(s) as db:
        await add_readings(db, 40_000)
        async with running_sync(s) as svc:
            async with live_ingest(db):
                for cut in range(3):
                    target = 6000 * (cut + 1)
                    await consumer.wait_for(lambda t=target: len(consumer.seen.readings) > t, what="progress")
                    proxy.cut()
                    await consumer.wait_for(lambda c=cut: svc.figures.sessions >= c + 2, within=15,
                                            what="a reconnection")
            await consumer.wait_for_store(s.db_path)
            assert svc.figures.sessions >= 4
        # cuts mid-drain leave messages unacknowledged: they are re-sent and counted
        assert svc.figures.duplicates_resent > 0
        assert_clean(consumer, svc, s.db_path)


async def test_black_holed_connection_is_detected_by_keepalive(sync_settings, cloud: CloudBroker,
                                                              consumer: CloudConsumer, proxy: TcpProxy) -> None:
    # keepalive 2 s; the PUBACK watchdog is set far out so that keepalive is what notices
    s = sync_settings(port=proxy.port, keepalive_s=2, ack_timeout_s=60.0)
    async with store_of(s) as db:
        await add_readings(db, 20_000)
        async with running_sync(s) as svc:
            async with live_ingest(db):
                await consumer.wait_for(lambda: len(consumer.seen.readings) > 2000, what="the drain to start")
                proxy.blackholed = True  # the TCP connection stays open; nothing passes either way
                await consumer.wait_for(lambda: not svc.figures.connected, within=20,
                                        what="the dead link to be noticed")
                # noticed with the socket still open and long before the 60 s PUBACK watchdog:
                # by MQTT keepalive (no PINGRESP). paho reports it as "Keep alive timeout" or,
                # depending on which callback sees the closed socket first, as code 128.
                assert svc.figures.last_error is not None
                assert svc.metrics.errors.labels(kind="stalled")._value.get() == 0
                seen_during = len(consumer.seen.readings)
                await asyncio.sleep(1.0)
                proxy.blackholed = False
                proxy.cut()  # connections opened during the black hole are stuck half-way
                await consumer.wait_for(lambda: svc.figures.connected, within=20, what="reconnection")
            await consumer.wait_for_store(s.db_path)
            assert len(consumer.seen.readings) > seen_during
        assert_clean(consumer, svc, s.db_path)
