"""The sync process composed: store reader and writer, lanes, window, link, downlink, status.

``async with SyncService(settings) as svc`` (or ``start()``/``stop()``) runs the uplink
until stopped. Long-lived loops are supervised (a crash is logged and restarted with
backoff, the way the gateway runs its own), and the per-connection work runs in one
task group per session, so a lost connection ends all of it together and nothing is
left publishing into a dead socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import gateway
from cloud_sync.aio import checkpoint, wait_event
from cloud_sync.config import SyncConfig
from cloud_sync.downlink import Downlink
from cloud_sync.lanes import Scheduler, Unit
from cloud_sync.link import CloudLink, LinkStalled
from cloud_sync.outbox import NEEDED_SCHEMA, StoreReader, schema_version
from cloud_sync.publisher import Window
from cloud_sync.state import StateStore
from cloud_sync.status import Figures, SyncMetrics
from gateway.settings import Settings
from gateway.supervisor import Supervisor

log = structlog.get_logger(__name__)

STORE_WAIT_S = 1.0
STOP_DRAIN_S = 5.0
STOP_ROUNDS, STOP_ROUND_S = 3, 10.0
RECORD_RETRY_S = 1.0
RECORD_MIN_INTERVAL_S = 0.05


class SyncService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = SyncConfig.from_settings(settings)
        self.metrics = SyncMetrics()
        self.figures = Figures(self.metrics)
        self.reader = StoreReader(self.cfg.db_path)
        self.state = StateStore(self.cfg.db_path)
        self.link = CloudLink(self.cfg, self.figures)
        c = self.cfg.cloud
        self.window = Window(c.inflight_window, c.inflight_max_bytes, reserved=c.live_reserved_slots)
        self.downlink = Downlink(self.cfg.topics, self.reader, self.state, gateway=self.cfg.gateway,
                                 max_bytes=c.downlink_max_bytes,
                                 allowed_commands=c.downlink_commands)
        self.scheduler: Scheduler | None = None
        self.supervisor = Supervisor(self.metrics)  # type: ignore[arg-type]  # needs only .task_restarts
        self.ready = asyncio.Event()
        self._to_record: list[Unit] = []
        self._record_due = asyncio.Event()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._stopping = False
        self._metrics_server: Any = None
        # told a one-line summary at every status write (systemd's STATUS=, when run under it)
        self.status_hook: Callable[[str], object] | None = None
        # called when the store file was replaced under us (the gateway salvaged a corrupt
        # file): the process must start over on the new file (main stops it; systemd restarts)
        self.on_store_replaced: Callable[[], object] | None = None
        self._store_id: tuple[int, int] | None = None
        self._props = self._publish_properties()

    def _publish_properties(self) -> Properties | None:
        if self.cfg.cloud.mqtt_version != "5":
            return None
        from cloud_sync.contract import CONTENT_JSON, CONTENT_JSON_ZLIB

        props = Properties(PacketTypes.PUBLISH)
        zipped = self.cfg.cloud.encoding == "json+zlib"
        props.ContentType = CONTENT_JSON_ZLIB if zipped else CONTENT_JSON
        props.PayloadFormatIndicator = 0 if zipped else 1
        return props

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> SyncService:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Returns at once; the work (waiting for the store first) runs supervised."""
        self.supervisor.start("sync.main", self._main)

    async def _main(self) -> None:
        if self.scheduler is None:
            await self._wait_for_store()
            self._store_id = _file_id(self.cfg.db_path)
            persisted = await self.state.load()
            self.scheduler = Scheduler(self.cfg, self.reader, self.state, self.figures, persisted)
            log.info("sync.started", gateway=self.cfg.gateway, watermark=persisted.readings_base,
                     events_watermark=persisted.events_base, broker=f"{self.cfg.cloud.host}:{self.cfg.cloud.port}")
            if self.cfg.cloud.metrics_port is not None:
                from prometheus_client import start_http_server

                self._metrics_server = start_http_server(self.cfg.cloud.metrics_port, addr="127.0.0.1",
                                                         registry=self.metrics.registry)
            self.supervisor.start("sync.recorder", self._recorder)
            self.supervisor.start("sync.status", self._status_loop)
            self.ready.set()
        await self.link.run(self._session)

    async def _wait_for_store(self) -> None:
        said = None
        while True:
            try:
                found = await asyncio.to_thread(schema_version, self.cfg.db_path)
            except sqlite3.Error as exc:
                found, err = None, str(exc)
            else:
                err = None
            if found is not None and found[0] >= NEEDED_SCHEMA and found[1]:
                return
            if found is not None and found[0] >= NEEDED_SCHEMA:
                what = "sync.store_lacks_tables"  # said loudly: waiting will not fix this one
                if said != what:
                    log.error(what, path=str(self.cfg.db_path), schema=found[0],
                              note="schema version says migrated but migration 2's tables are missing "
                                   "(a development store from when migrations were out of order); "
                                   "move the file aside")
            else:
                what = "sync.waiting_for_store"  # the gateway creates and migrates it, never the sync
                if said != what:
                    log.warning(what, path=str(self.cfg.db_path), schema=found[0] if found else None,
                                error=err, needs=NEEDED_SCHEMA)
            said = what
            await asyncio.sleep(STORE_WAIT_S)

    async def stop(self, reason: str = "shutdown") -> None:
        self._stopping = True
        self._wake.set()
        if self.scheduler is not None and self.figures.connected:
            # let what is in flight be acknowledged and recorded, so a restart re-sends nothing
            if not self.window.empty():
                self._drained.clear()
                await wait_event(self._drained, STOP_DRAIN_S)
            await self.link.say_offline(reason)
        for _ in range(STOP_ROUNDS):
            # a second cancel reaches a loop that lost the first to 3.11's wait_for (see aio.py)
            stopping = asyncio.create_task(self.supervisor.stop())
            done, _ = await asyncio.wait({stopping}, timeout=STOP_ROUND_S)
            if done:
                break
            log.error("sync.stop_slow", note="a task ignored its cancellation; cancelling again")
        if self.scheduler is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._record_now(retry=False)
            self.figures.link_down("closed", None)
            with contextlib.suppress(sqlite3.Error):
                await self.state.write_status(self._status_data())
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        await self.reader.close()
        await self.state.close()
        log.info("sync.stopped", reason=reason)

    # -- one connection ---------------------------------------------------------------------
    async def _session(self, client: aiomqtt.Client) -> None:
        sch = self.scheduler
        assert sch is not None
        for u in await sch.begin_session():
            self.window.release(u)
        self.figures.inflight = self.window.count
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._downlink_loop(client), name="sync-downlink")
            tg.create_task(self._pump(client, tg), name="sync-pump")
            tg.create_task(self._watchdog(), name="sync-watchdog")
            tg.create_task(self._health_loop(client), name="sync-health")

    async def _pump(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        sch, win = self.scheduler, self.window
        assert sch is not None
        poll = self.cfg.cloud.poll_interval_ms / 1000
        while not self._stopping:
            checkpoint()
            if not win.has_room():
                await self._sleep_until_woken(None)
                continue
            unit = await sch.next_unit(backlog_ok=win.backlog_room())
            if unit is None:
                timeout = poll
                if sch.wake_at is not None:
                    timeout = max(0.0, min(timeout, sch.wake_at - time.monotonic()))
                await self._sleep_until_woken(timeout)
                continue
            win.take(unit)
            self.figures.inflight = win.count
            if not unit.messages:  # a range with nothing left to send (dropped or deleted)
                self._broker_acked(unit)
                continue
            tg.create_task(self._publish(client, unit))
        await asyncio.Event().wait()  # stopping: keep the session open until cancelled

    async def _sleep_until_woken(self, within: float | None) -> None:
        await wait_event(self._wake, within)
        self._wake.clear()

    async def _publish(self, client: aiomqtt.Client, u: Unit) -> None:
        u.sent_at = time.monotonic()
        await asyncio.gather(*(
            client.publish(m.topic, m.payload, qos=1, retain=m.retain, properties=self._props, timeout=math.inf)
            for m in u.messages))
        self.link.acked_in_session = True
        self._broker_acked(u)

    def _broker_acked(self, u: Unit) -> None:
        assert self.scheduler is not None
        self.scheduler.on_broker_ack(u)
        self._to_record.append(u)
        self._record_due.set()

    async def _watchdog(self) -> None:
        sch = self.scheduler
        assert sch is not None
        limit = self.cfg.cloud.ack_timeout_s
        while True:
            checkpoint()
            await asyncio.sleep(min(1.0, limit / 4))
            oldest = min((u.sent_at for u in sch.inflight if u.sent_at is not None), default=None)
            if oldest is not None and time.monotonic() - oldest > limit:
                raise LinkStalled(f"no PUBACK for {limit:g} s")

    async def _downlink_loop(self, client: aiomqtt.Client) -> None:
        # also the session's ear for the connection dropping: the iterator raises then
        async for m in client.messages:
            checkpoint()
            if not self.cfg.cloud.downlink:
                continue
            payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload or "").encode()
            try:
                _qid, state = await self.downlink.handle(str(m.topic), bytes(payload))
            except sqlite3.Error as exc:
                # the MQTT client acknowledged it on receipt: say loudly that it was not queued
                log.error("sync.downlink_not_stored", topic=str(m.topic)[:200], error=f"{type(exc).__name__}: {exc}")
                state = "store_error"
            self.metrics.downlink.labels(outcome=state).inc()
            assert self.scheduler is not None
            self.scheduler._next_slow = 0.0  # report it now, not at the next slow check
            self._wake.set()

    async def _health_loop(self, client: aiomqtt.Client) -> None:
        while True:
            checkpoint()
            body = await self._health()
            from cloud_sync.codec import encode_message

            await client.publish(self.cfg.topics.health, encode_message(body, self.cfg.cloud.encoding), qos=1,
                                 retain=True, properties=self._props, timeout=self.cfg.cloud.ack_timeout_s)
            await asyncio.sleep(self.cfg.cloud.health_interval_s)

    async def _health(self) -> dict[str, Any]:
        f = self.figures
        await self._refresh_backlog()
        return {
            "v": 1, "type": "health", "gateway": self.cfg.gateway, "ts": time.time(),
            "version": gateway.__version__, "uptime_s": round(time.time() - f.started_at, 1),
            "connected_since": f.connected_since,
            "backlog": {"count": f.backlog_count, "oldest_ts": f.backlog_oldest_ts},
            "send_rate": f.send_rate(), "dropped_by_policy": await self.reader.counter("dropped_quota"),
            "duplicates_resent": f.duplicates_resent, "devices": await self.reader.devices_summary(),
            "db_bytes": self.reader.db_bytes(),
        }

    # -- recording acknowledgements ---------------------------------------------------------
    async def _recorder(self) -> None:
        while True:
            checkpoint()
            await self._record_due.wait()
            self._record_due.clear()
            began = time.monotonic()
            await self._record_now()
            # acknowledgements arriving meanwhile are recorded together: fewer, equally short
            # transactions on the shared file (see docs/cloud-contract.md, "Never blocking ingest")
            await asyncio.sleep(max(0.0, RECORD_MIN_INTERVAL_S - (time.monotonic() - began)))

    async def _record_now(self, *, retry: bool = True) -> None:
        units, self._to_record = self._to_record, []
        if not units:
            return
        assert self.scheduler is not None
        snap = self.scheduler.apply_recorded(units)
        said = False
        while True:
            checkpoint()
            try:
                await self.state.record(snap)
                break
            except sqlite3.Error as exc:
                # the acknowledgement stays in memory; the units keep their window slots
                # (so nothing more is sent) until the store takes the record
                if not retry:
                    raise
                if not said:
                    log.warning("sync.record_failed", error=f"{type(exc).__name__}: {exc}")
                    said = True
                await asyncio.sleep(RECORD_RETRY_S)
        self.scheduler.after_record(units)
        for u in units:
            self.window.release(u)
            self.figures.acked(u.kind, u.readings, len(u.messages), u.nbytes)
        self.figures.inflight = self.window.count
        if self.window.empty():
            self._drained.set()
        self._wake.set()

    # -- status -----------------------------------------------------------------------------
    async def _refresh_backlog(self) -> None:
        sch = self.scheduler
        assert sch is not None
        count, oldest = await self.reader.backlog(sch.readings.base, list(sch.readings.acked))
        self.figures.backlog_count, self.figures.backlog_oldest_ts = count, oldest

    def _summary(self) -> str:
        f = self.figures
        link = "connected" if f.connected else f"offline ({f.last_error or 'connecting'})"
        return f"{link}; backlog {f.backlog_count}; {f.send_rate():g} readings/s"

    def _status_data(self) -> dict[str, Any]:
        d = self.figures.snapshot()
        d.update(pid=os.getpid(), broker=f"{self.cfg.cloud.host}:{self.cfg.cloud.port}",
                 backlog={"count": self.figures.backlog_count, "oldest_ts": self.figures.backlog_oldest_ts},
                 downlink={"accepted": self.downlink.accepted, "rejected": self.downlink.rejected,
                           "duplicates": self.downlink.duplicates})
        return d

    async def _status_loop(self) -> None:
        while True:
            checkpoint()
            try:
                await self._refresh_backlog()
                await self.state.write_status(self._status_data())
            except sqlite3.Error as exc:
                log.warning("sync.status_write_failed", error=f"{type(exc).__name__}: {exc}")
            if self.status_hook is not None:
                self.status_hook(self._summary())
            if self._store_id is not None and _file_id(self.cfg.db_path) != self._store_id:
                log.error("sync.store_replaced", path=str(self.cfg.db_path),
                          note="the gateway set the file aside (salvage?); starting over on the new one")
                self._store_id = None  # said once
                if self.on_store_replaced is not None:
                    self.on_store_replaced()
            await asyncio.sleep(self.cfg.cloud.status_interval_s)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino
