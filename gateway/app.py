"""The one place that composes the gateway: every room, wired in data-flow order.

    broker / HTTP / simulator ─▶ ingest ─▶ store ─▶ live bus ─▶ web

``async with Gateway(settings) as gw:`` starts everything; leaving the block stops it
in reverse order, committing whatever was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.audit import Audit
from gateway.ble.service import BleService
from gateway.broker import EmbeddedBroker
from gateway.bus import LiveBus
from gateway.clock import Clock, ClockMonitor, FixedClock, KernelClock
from gateway.devices.access import DeviceAccess
from gateway.devices.commands import Commander
from gateway.devices.credentials import Credentials
from gateway.devices.registry import DeviceRegistry
from gateway.health import Health
from gateway.ingest.pipeline import Ingest, Timekeeper
from gateway.ingest.profiles import load_profiles
from gateway.metrics import Metrics
from gateway.ota.service import OtaService
from gateway.rules.service import Rules
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.events import EventLog
from gateway.store.readings import Maintenance, Outbox, ReadingsQuery
from gateway.supervisor import Supervisor
from gateway.tls import GatewayCA

if TYPE_CHECKING:
    from gateway.broker.external import ExternalBroker

log = structlog.get_logger(__name__)

# WAL upkeep: copied back every few seconds, reset if readers kept it from shrinking
CHECKPOINT_INTERVAL_S = 2.0
WAL_TRUNCATE_BYTES = 64 * 1024 * 1024


def make_clock(settings: Settings) -> Clock:
    src = settings.time.source
    if src == "kernel":
        return KernelClock()
    return FixedClock(synced=src == "assume_synced")


class Gateway:
    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or make_clock(settings)
        self.metrics = Metrics()
        s = settings.store
        self.db = Database(settings.db_path, self.metrics, commit_interval_ms=s.commit_interval_ms,
                           max_batch=s.max_batch)
        self.bus = LiveBus(self.metrics)
        self.events = EventLog(self.db, self.bus)
        self.profiles = load_profiles(settings.profiles.dirs, settings.profiles.enabled,
                                      max_payload_bytes=settings.broker.max_payload_bytes,
                                      max_depth=settings.broker.max_json_depth)
        self.registry = DeviceRegistry(self.db, self.events, self.bus, self.metrics,
                                       require_adoption=settings.devices.require_adoption,
                                       offline_after_s=settings.devices.offline_after_s)
        self.credentials = Credentials(self.db)
        self.readings = ReadingsQuery(self.db)
        self.outbox = Outbox(self.db)
        self.maintenance = Maintenance(self.db, self.metrics, retention_days=s.retention_days,
                                       quota_mb=s.quota_mb, quota_policy=s.quota_policy)
        self.timekeeper = Timekeeper(self.clock, settings.time)
        self.clock_monitor = ClockMonitor(self.clock, self._on_clock_sync, settings.time.check_interval_s)
        self.commander = Commander(self.db, self.registry, self.profiles, self.events, self.metrics,
                                   self._publish, default_timeout_s=settings.devices.command_timeout_s)
        self.ingest = Ingest(db=self.db, profiles=self.profiles, registry=self.registry,
                             commander=self.commander, events=self.events, bus=self.bus, metrics=self.metrics,
                             timekeeper=self.timekeeper, maintenance=self.maintenance)
        self.access = DeviceAccess(credentials=self.credentials, profiles=self.profiles, ingest=self.ingest,
                                   registry=self.registry, metrics=self.metrics,
                                   allow_anonymous=settings.broker.allow_anonymous)
        self.supervisor = Supervisor(self.metrics)
        self.health = Health(self)
        # local alerts, automations and schedules: registers itself as an observer of ingest
        # (every committed reading) and of the registry (every online/offline transition)
        self.rules = Rules(cfg=settings.rules, timezone=settings.gateway.timezone, gateway_id=settings.gateway.id,
                           db=self.db, registry=self.registry, ingest=self.ingest, commander=self.commander,
                           events=self.events, outbox=self.outbox, profiles=self.profiles, metrics=self.metrics,
                           clock=self.clock, health_snapshot=self.health.snapshot)
        self.ca = GatewayCA(settings.data_dir / "tls", settings.gateway.id)
        self.ota = OtaService(self)
        self.ble = BleService(self)
        self.broker: EmbeddedBroker | ExternalBroker | None = None
        self.audit = Audit(self.db)
        self.setup_code: str | None = None
        # what first boot found wrong with the boot-partition config (gateway.firstboot); shown on /setup
        self.setup_error: str | None = None
        self.web_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._extra_stops: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # a half-started gateway must not leave the broker listening or the store open
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def _start(self) -> None:
        st = self.settings
        st.data_dir.mkdir(parents=True, exist_ok=True)
        await self.db.open()
        for component, report in (("store_salvage", self.db.salvage_report),
                                  ("history_salvage", self.db.history_salvage_report)):
            if report is not None:  # a corrupt file was set aside: say so until restart
                salvaged = report.as_dict()
                self.health.register(component, lambda s=salvaged: {"ok": False, **s})
                await self.events.record("store.salvaged", None, salvaged)
        await self.registry.load()
        await self.credentials.load()
        await self.commander.load()
        await self.maintenance.load()
        await self.rules.load()  # before the broker starts: open alerts are known before any reading
        # readings of this boot stamped by an unsynchronised clock can be corrected at sync
        self.maintenance.first_boot_id = self.db._next_id
        self.metrics.clock_synced.set(1 if self.clock_monitor.synced else 0)
        if st.broker.allow_anonymous:
            log.warning("broker.anonymous_enabled",
                        note="ANONYMOUS MQTT ACCESS IS ON: any client on the LAN may publish. Development only.")

        ssl_ctx = None
        if st.broker.tls_port is not None or st.web.tls:
            await asyncio.to_thread(self.ca.ensure)
            ssl_ctx = self.ca.server_context()
        if st.broker.mode == "external":
            # an MQTT client library (aiomqtt, paho) only for the broker mode that needs one
            from gateway.broker.external import ExternalBroker, subscription_filters

            topics = [r.topic for p in self.profiles.profiles.values() for r in p.routes]
            self.broker = ExternalBroker(st.broker, self.access, subscription_filters(topics),
                                         client_id=f"siteward-{st.gateway.id}")
        else:
            self.broker = EmbeddedBroker(st.broker, self.access,
                                         ssl_context=ssl_ctx if st.broker.tls_port is not None else None)
        await self.broker.start()
        self.credentials.on_revoke = self.broker.disconnect_client

        sup = self.supervisor
        sup.start("devices.housekeeping", lambda: self.registry.run_housekeeping(
            min(self.settings.devices.last_seen_flush_s, self.settings.devices.offline_after_s / 4)))
        sup.start("commands.timeouts", self.commander.run_timeouts)
        sup.start("commands.queue", self.commander.run_queue)
        if st.cloud.enabled:
            # the uplink's figures (backlog, connected) on /metrics and /healthz, read from
            # the store so they hold even while the sync process is down
            from cloud_sync.status import GatewaySyncGauges

            self.sync_gauges = GatewaySyncGauges(st.db_path, self.metrics.registry,
                                                 status_interval_s=st.cloud.status_interval_s)
            sup.start("sync.figures", self.sync_gauges.run)
            self.health.register("cloud_sync", self.sync_gauges.probe)
        sup.start("store.maintenance", self._maintenance_loop)
        sup.start("store.checkpoint", lambda: self.db.run_checkpoints(CHECKPOINT_INTERVAL_S, WAL_TRUNCATE_BYTES))
        sup.start("clock.monitor", self.clock_monitor.run)
        sup.start("broker.stats", self._broker_stats_loop)
        self.rules.start(sup)
        self.health.register("rules", self.rules.health)
        await self.ota.start()

        await self._start_ble()
        await self._start_web(ssl_ctx if st.web.tls else None)

    # -- BLE (gateway/ble) ------------------------------------------------------------------
    async def _start_ble(self) -> None:
        """Scans where BlueZ has an adapter; otherwise /healthz says "unavailable" and nothing
        else changes. A failure here must not keep the rest of the gateway from running."""
        try:
            await self.ble.start()
        except Exception as exc:
            self.ble.state, self.ble.reason = "failed", f"{type(exc).__name__}: {exc}"[:200]
            log.error("ble.start_failed", error=self.ble.reason, exc_info=exc)

    async def _start_web(self, ssl_ctx: Any) -> None:
        from gateway.auth.setup import ensure_first_admin
        from gateway.web.app import build_web_app

        self.setup_code = await ensure_first_admin(self)
        app = build_web_app(self)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.web.host, self.settings.web.port, ssl_context=ssl_ctx)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.web_port = sockets[0].getsockname()[1] if sockets else self.settings.web.port
        log.info("web.listening", port=self.web_port, tls=ssl_ctx is not None)

    def on_stop(self, fn: Any) -> None:
        """Register an async callable run first at stop (simulators, BLE, ...)."""
        self._extra_stops.append(fn)

    async def stop(self) -> None:
        for fn in reversed(self._extra_stops):
            with contextlib.suppress(Exception):
                await fn()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.broker is not None:
            await self.broker.stop()
        await self.supervisor.stop()
        await self.rules.close()
        with contextlib.suppress(Exception):
            await self.registry.flush_last_seen()
        await self.db.close()

    # -- wiring ------------------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes) -> None:
        assert self.broker is not None
        await self.broker.publish(topic, payload, qos=1)

    async def _on_clock_sync(self, step_s: float) -> None:
        self.timekeeper.synced = True
        self.metrics.clock_synced.set(1)
        corrected = 0
        if abs(step_s) > 0.5:
            corrected = await self.maintenance.correct_clock(step_s, self.maintenance.first_boot_id)
        # from_id and corrected tell the cloud sync which readings moved (docs/cloud-contract.md)
        await self.events.record("gateway.clock_synchronised", None, {
            "step_s": step_s, "from_id": self.maintenance.first_boot_id, "corrected": corrected})

    async def _maintenance_loop(self) -> None:
        while True:
            await self.maintenance.run_once()
            await asyncio.sleep(self.settings.store.maintenance_interval_s)

    async def _broker_stats_loop(self) -> None:
        while True:
            assert self.broker is not None
            for k, v in self.broker.stats().items():
                self.metrics.broker_stat.labels(stat=k).set(v)
            self.metrics.connected_clients.set(self.broker.stats().get("connected_clients", 0))
            self.metrics.queue_depth.set(self.db.queue_depth())
            self.metrics.db_bytes.set(self.db.size_bytes())
            await self.credentials.refresh()
            await asyncio.sleep(2.0)
