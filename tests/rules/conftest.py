"""Rules tests: the real components (SQLite file, ingest, registry, commander, events, alerts,
scheduler) under a clock the test moves, so durations, DST and clock jumps are decided by
the test and never by waiting."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.bus import LiveBus
from gateway.clock import Clock
from gateway.devices.commands import Commander
from gateway.devices.registry import DeviceRegistry
from gateway.ingest.pipeline import Ingest, Timekeeper
from gateway.ingest.profiles import load_profiles
from gateway.metrics import Metrics
from gateway.models import Source
from gateway.rules.engine import GatewayFacts
from gateway.rules.models import RulesConfig
from gateway.rules.service import Rules
from gateway.settings import TimeSection
from gateway.store.database import Database
from gateway.store.events import EventLog
from gateway.store.readings import Maintenance, Outbox


class FakeClock(Clock):
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self, wall: float | None = None) -> None:
        self.t = time.time() if wall is None else wall
        self.m = 1000.0

    def wall(self) -> float:
        return self.t

    def mono(self) -> float:
        return self.m

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move."""
        self.t += seconds
        self.m += seconds

    def step(self, seconds: float) -> None:
        """NTP steps the wall clock; the monotonic clock does not move."""
        self.t += seconds


class Site:
    """The gateway's rooms that rules touch, without broker or web server."""

    def __init__(self, path: Path, clock: FakeClock, cfg: RulesConfig, timezone: str = "UTC",
                 facts: GatewayFacts | None = None) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self.db = Database(path, self.metrics, commit_interval_ms=0)
        self.bus = LiveBus(self.metrics)
        self.events = EventLog(self.db, self.bus)
        self.profiles = load_profiles()
        self.registry = DeviceRegistry(self.db, self.events, self.bus, self.metrics, require_adoption=False,
                                       offline_after_s=180)
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.commander = Commander(self.db, self.registry, self.profiles, self.events, self.metrics, self._publish,
                                   default_timeout_s=30)
        self.maintenance = Maintenance(self.db, self.metrics, retention_days=30, quota_mb=1024,
                                       quota_policy="drop_oldest")
        self.ingest = Ingest(db=self.db, profiles=self.profiles, registry=self.registry, commander=self.commander,
                             events=self.events, bus=self.bus, metrics=self.metrics,
                             timekeeper=Timekeeper(clock, TimeSection(source="assume_synced")),
                             maintenance=self.maintenance)
        self.outbox = Outbox(self.db)
        self.facts = facts or GatewayFacts()
        self.rules = Rules(cfg=cfg, timezone=timezone, gateway_id="gw-test", db=self.db, registry=self.registry,
                           ingest=self.ingest, commander=self.commander, events=self.events, outbox=self.outbox,
                           profiles=self.profiles, metrics=self.metrics, clock=clock, health_snapshot=lambda: {})
        # gateway facts come from the test (disk usage and cloud backlog are not ours to fill)
        self.rules.engine._facts = self._facts

    async def _facts(self) -> GatewayFacts:
        return self.facts

    async def _publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, json.loads(payload)))

    async def start(self) -> None:
        await self.db.open()
        await self.registry.load()
        await self.commander.load()
        await self.rules.load()

    async def stop(self) -> None:
        await self.rules.close()
        await self.db.close()

    # -- driving ------------------------------------------------------------------------------------
    async def send(self, device: str, kind: str = "node", **values: float) -> None:
        """A device reports: the whole ingest path (registry, store commit, observers)."""
        await self.ingest.ingest_values(device, [(k, float(v), "") for k, v in values.items()],
                                        source=Source.SIMULATOR, profile="native", kind=kind)
        await self.rules.settle()

    async def tick(self, now: float | None = None) -> None:
        await self.rules.engine.tick(now)
        await self.rules.settle()

    async def alerts(self, **kw: Any) -> list[Any]:
        return await self.rules.alerts.query(**kw)

    async def events_of(self, kind: str) -> list[Any]:
        return await self.events.query(kind=kind, limit=1000)

    async def runs(self, **kw: Any) -> list[Any]:
        return await self.rules.actuator.runs(**kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_site(tmp_path: Path, clock: FakeClock) -> Callable[..., Any]:
    """``async with open_site(threshold=[...]) as site:``; opening twice on the same file is a restart."""

    @contextlib.asynccontextmanager
    async def open_(timezone: str = "UTC", facts: GatewayFacts | None = None, **rules: Any) -> AsyncIterator[Site]:
        site = Site(tmp_path / "siteward.db", clock, RulesConfig.model_validate(rules), timezone, facts)
        await site.start()
        try:
            yield site
        finally:
            await site.stop()

    return open_


def threshold(rule_id: str = "warm", device: str = "fr-1", **kw: Any) -> dict[str, Any]:
    return {"id": rule_id, "target": {"device": device}, "metric": "temperature", **kw}
