"""Faults of the processes: kill -9 of the sync mid-batch, kill -9 of the gateway, both killed
and restarted in either order, and a sync process that is stuck or crash-looping while
the gateway keeps collecting. Real processes (``siteward gateway``, ``siteward sync``)
sharing one SQLite file, a real mosquitto as the cloud."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from cloud_sync.status import read_sync_view
from gateway.devices.credentials import Credentials
from gateway.metrics import Metrics
from gateway.store.database import Database
from tests.fixtures.mqtt_brokers import free_port
from tests.sync.cloud import CloudBroker, CloudConsumer, integrity
from tests.sync.conftest import (
    add_readings,
    cloud_section,
    kill9,
    process_config,
    running_sync,
    start_process,
    store_of,
    terminate,
)
from tests.sync.pki import Pki

WINDOW, BATCH = 8, 500  # cloud_section's inflight_window and batch_max_readings


class Flooder:
    """Nodes publishing QoS 1 telemetry to the gateway; records every value that got a PUBACK
    (acknowledged means durable). Reconnects while the gateway is down."""

    def __init__(self, port: int, creds: dict[str, str]) -> None:
        self.port = port
        self.creds = creds
        self.acked: dict[str, list[int]] = {d: [] for d in creds}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(d, pw)) for d, pw in self.creds.items()]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def _run(self, dev: str, pw: str) -> None:
        seq = 0
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=dev, username=dev, password=pw,
                                          timeout=3) as c:
                    while not self._stop.is_set():
                        seq += 1
                        await c.publish(f"devices/{dev}/telemetry", json.dumps({"counter": seq}), qos=1)
                        self.acked[dev].append(seq)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)


async def mint(db_path: Path, n: int) -> dict[str, str]:
    db = Database(db_path, Metrics())
    await db.open()
    try:
        creds = Credentials(db)
        return {f"flood-{i}": await creds.mint(f"flood-{i}") for i in range(n)}
    finally:
        await db.close()


def gateway_sections(tmp: Path, mqtt: int) -> dict[str, dict[str, Any]]:
    return {"broker": {"host": "127.0.0.1", "port": mqtt, "rate_limit_per_s": 100000, "rate_limit_burst": 100000},
            "web": {"host": "127.0.0.1", "port": free_port(), "admin_password": "fault test password"}}


async def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        assert proc is None or proc.poll() is None, "process exited during start"
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def cloud_values(consumer: CloudConsumer) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for r in consumer.seen.readings.values():
        if r["metric"] == "counter":
            out.setdefault(r["device"], set()).add(int(r["value"]))
    return out


def assert_acked_in_cloud(flood: Flooder, consumer: CloudConsumer) -> None:
    have = cloud_values(consumer)
    lost = {d: sorted(set(v) - have.get(d, set()))[:5] for d, v in flood.acked.items() if set(v) - have.get(d, set())}
    assert not lost, f"acknowledged readings missing in the cloud: {lost}"


async def test_kill_9_of_the_sync_mid_batch(tmp_path: Path, make_settings, cloud: CloudBroker, pki: Pki,
                                            consumer: CloudConsumer) -> None:
    cc = cloud_section(cloud, pki)
    s = make_settings(cloud=cc)
    async with store_of(s) as db:
        await add_readings(db, 30_000)
    cfg = process_config(tmp_path, cc)
    log = tmp_path / "sync.log"
    proc = start_process(cfg, "sync", log)
    try:
        await consumer.wait_for(lambda: len(consumer.seen.readings) > 4000, within=30, what="the drain")
        kill9(proc)  # mid-drain: batches in flight, acknowledgements not yet recorded
        # the broker publishes the will: the cloud learns the gateway's uplink died
        await consumer.wait_for(lambda: consumer.seen.status and consumer.seen.status[-1]["state"] == "offline",
                                what="the will")
        assert consumer.seen.status[-1]["ts"] is None and consumer.seen.status[-1]["reason"] == "connection lost"
        before = len(consumer.seen.readings)
        assert before < 30_000
        proc = start_process(cfg, "sync", log)
        await consumer.wait_for_store(s.db_path, within=60)
        assert terminate(proc) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill9(proc)
    consumer.check_against_store(s.db_path)
    # what was in flight (published, not yet acknowledged and recorded) at most
    assert consumer.duplicates <= WINDOW * BATCH, consumer.duplicates
    view = read_sync_view(s.db_path, enabled=True, status_interval_s=0.5)
    assert view["backlog"]["count"] == 0 and view["watermark"] >= 30_000
    assert integrity(s.db_path) == "ok"


async def test_kill_9_of_the_gateway(tmp_path: Path, make_settings, cloud: CloudBroker, pki: Pki,
                                     consumer: CloudConsumer) -> None:
    cc = cloud_section(cloud, pki)
    mqtt = free_port()
    s = make_settings(cloud=cc)
    cfg = process_config(tmp_path, cc, **gateway_sections(tmp_path, mqtt))
    creds = await mint(s.db_path, 3)
    log = tmp_path / "gateway.log"
    gw = start_process(cfg, "gateway", log)
    flood = Flooder(mqtt, creds)
    try:
        await wait_port(mqtt, gw)
        async with running_sync(s) as svc:
            flood.start()
            await consumer.wait_for(lambda: len(consumer.seen.readings) > 300, what="readings flowing")
            kill9(gw)
            acked_at_kill = flood.total
            # the uplink does not care: it stays up and sends what the gateway had stored
            await consumer.wait_for_store(s.db_path)
            assert svc.figures.connected
            gw = start_process(cfg, "gateway", log)
            await wait_port(mqtt, gw)
            await consumer.wait_for(lambda: flood.total > acked_at_kill + 200, what="collection to resume")
            await flood.stop()
            await consumer.wait_for_store(s.db_path)
        assert terminate(gw) == 0, log.read_text()[-3000:]
    finally:
        if gw.poll() is None:
            kill9(gw)
    assert_acked_in_cloud(flood, consumer)
    consumer.check_against_store(s.db_path)
    assert consumer.duplicates <= svc.figures.duplicates_resent
    assert integrity(s.db_path) == "ok"


async def test_both_killed_and_restarted_in_either_order(tmp_path: Path, make_settings, cloud: CloudBroker,
                                                         pki: Pki, consumer: CloudConsumer) -> None:
    cc = cloud_section(cloud, pki)
    mqtt = free_port()
    s = make_settings(cloud=cc)
    cfg = process_config(tmp_path, cc, **gateway_sections(tmp_path, mqtt))
    creds = await mint(s.db_path, 3)
    glog, slog = tmp_path / "gateway.log", tmp_path / "sync.log"
    flood = Flooder(mqtt, creds)
    gw = start_process(cfg, "gateway", glog)
    sync = start_process(cfg, "sync", slog)
    try:
        await wait_port(mqtt, gw)
        flood.start()
        for order in (("sync", "gateway"), ("gateway", "sync")):
            mark = len(consumer.seen.readings)
            await consumer.wait_for(lambda m=mark: len(consumer.seen.readings) > m + 300, within=30,
                                    what="readings flowing")
            kill9(gw)
            kill9(sync)
            for which in order:
                await asyncio.sleep(0.5)  # the one started first runs alone for a moment
                if which == "gateway":
                    gw = start_process(cfg, "gateway", glog)
                    await wait_port(mqtt, gw)
                else:
                    sync = start_process(cfg, "sync", slog)
        acked = flood.total
        await consumer.wait_for(lambda: flood.total > acked + 200, what="collection after the restarts")
        await flood.stop()
        await consumer.wait_for_store(s.db_path, within=60)
        assert terminate(sync) == 0, slog.read_text()[-3000:]
        assert terminate(gw) == 0, glog.read_text()[-3000:]
    finally:
        for p in (gw, sync):
            if p.poll() is None:
                kill9(p)
    assert_acked_in_cloud(flood, consumer)
    consumer.check_against_store(s.db_path)
    assert consumer.duplicates <= 2 * WINDOW * BATCH  # two kills, each at most a window in flight
    assert integrity(s.db_path) == "ok"


def _write_lock_free(db_path: Path) -> bool:
    conn = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def freeze_outside_a_write(proc: subprocess.Popen[bytes], db_path: Path) -> None:
    """SIGSTOP the sync process at a moment it holds no write lock.

    Freezing it *inside* one of its sub-millisecond write transactions would hold the
    store's write lock until it is thawed: the documented residual risk (see
    docs/cloud-contract.md, "Never blocking ingest"). Any other freeze must not matter.
    """
    for _ in range(100):
        os.kill(proc.pid, signal.SIGSTOP)
        if _write_lock_free(db_path):
            return
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError("could not freeze the sync process outside a write")


async def until_working(proc: subprocess.Popen[bytes], db_path: Path, within: float = 30.0) -> None:
    """Until this sync process has written its status row (it has the store open and runs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        assert proc.poll() is None, "the sync process exited"
        view = await asyncio.to_thread(read_sync_view, db_path, enabled=True, status_interval_s=0.5)
        if view["process"]["pid"] == proc.pid:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sync process did not start working")


@contextlib.asynccontextmanager
async def gateway_in_process(settings: Any) -> AsyncIterator[Any]:
    from gateway.app import Gateway

    async with Gateway(settings) as gw:
        yield gw


async def test_stuck_dead_or_crash_looping_sync_never_blocks_ingest(tmp_path: Path, make_settings,
                                                                    cloud: CloudBroker, pki: Pki,
                                                                    consumer: CloudConsumer) -> None:
    cc = cloud_section(cloud, pki)
    s = make_settings(cloud=cc)
    cfg = process_config(tmp_path, cc)
    log = tmp_path / "sync.log"
    n = 0

    async def ingest(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            # each call returns only once the reading is committed: a blocked store would hang here
            await asyncio.wait_for(gw.ingest.ingest_http("steady-1", json.dumps({"counter": n}).encode()), 10)

    async with gateway_in_process(s) as gw:
        sync = start_process(cfg, "sync", log)
        try:
            await ingest(200)
            await consumer.wait_for_store(s.db_path)

            await freeze_outside_a_write(sync, s.db_path)  # stuck
            await ingest(300)
            await asyncio.sleep(1.0)
            await ingest(100)
            os.kill(sync.pid, signal.SIGCONT)
            kill9(sync)  # dead
            await ingest(300)
            for i in range(3):  # crash-looping: killed while it works, at a different point each time
                sync = start_process(cfg, "sync", log)
                await until_working(sync, s.db_path)
                await ingest(50 * (i + 1))
                kill9(sync)
            await ingest(100)
            assert await gw.db.integrity_check() == "ok"
            stored = await gw.readings.count()
            assert stored == n

            sync = start_process(cfg, "sync", log)
            await consumer.wait_for_store(s.db_path, within=60)
            assert terminate(sync) == 0, log.read_text()[-3000:]
        finally:
            if sync.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sync.pid, signal.SIGCONT)
                kill9(sync)
    consumer.check_against_store(s.db_path)
    assert integrity(s.db_path) == "ok"
