"""The rules room, composed: what :class:`gateway.app.Gateway` wires in and the web views use.

Rules and schedules come from two places: the config file (read-only here; the file is
the installer's) and the API (stored in SQLite). Both run the same way. Every change made
through this class is audited, in the same transaction where the change is a row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container
from typing import Any, Literal

import structlog

from gateway.audit import Audit
from gateway.clock import Clock
from gateway.devices.commands import Commander
from gateway.devices.registry import DeviceRegistry
from gateway.ingest.pipeline import Ingest
from gateway.ingest.profiles import ProfileSet
from gateway.metrics import Metrics
from gateway.rules.alerts import Alert, AlertStore
from gateway.rules.automations import Actuator
from gateway.rules.definitions import Definitions
from gateway.rules.engine import Engine, GatewayFacts
from gateway.rules.models import AlertRule, RulesConfig, Schedule, parse_rule
from gateway.rules.schedules import ScheduleError, Scheduler
from gateway.rules.targets import Targets
from gateway.rules.webhook import Webhook
from gateway.store.database import Database
from gateway.store.events import EventLog
from gateway.store.readings import Outbox, ReadingsQuery
from gateway.supervisor import Supervisor

log = structlog.get_logger(__name__)

Source = Literal["config", "api"]

ALERT_RETENTION_DAYS = 365
RUN_RETENTION_DAYS = 90
PRUNE_INTERVAL_S = 3600.0


class RulesError(Exception):
    status = 400


class NotFound(RulesError):
    status = 404


class Conflict(RulesError):
    status = 409


def _check_put(noun: str, item_id: str, config: Container[str], api: Container[str], *, create: bool) -> None:
    """Refuse to create (``create``) or replace an API-defined rule/schedule where that cannot be done."""
    if item_id in config:
        raise Conflict(f"{noun} {item_id!r} is defined in the config file; change it there")
    exists = item_id in api
    if create and exists:
        raise Conflict(f"a {noun} {item_id!r} exists already")
    if not create and not exists:
        raise NotFound(f"no {noun} {item_id!r}")


def _check_delete(noun: str, item_id: str, config: Container[str], api: Container[str]) -> None:
    """Refuse to delete a rule/schedule of the config file, or one that does not exist."""
    if item_id in config:
        raise Conflict(f"{noun} {item_id!r} is defined in the config file; remove it there")
    if item_id not in api:
        raise NotFound(f"no {noun} {item_id!r}")


class Rules:
    def __init__(self, *, cfg: RulesConfig, timezone: str, gateway_id: str, db: Database,
                 registry: DeviceRegistry, ingest: Ingest, commander: Commander, events: EventLog,
                 outbox: Outbox, profiles: ProfileSet, metrics: Metrics, clock: Clock,
                 health_snapshot: Callable[[], dict[str, Any]]) -> None:
        self.cfg = cfg
        self._db = db
        self._outbox = outbox
        self._readings = ReadingsQuery(db)
        self._profiles = profiles
        self._clock = clock
        self._snapshot = health_snapshot
        self._audit = Audit(db)
        self.targets = Targets(registry)
        self.alerts = AlertStore(db, events, metrics)
        self.actuator = Actuator(db, commander, metrics, clock)
        self.engine = Engine(registry=registry, targets=self.targets, alerts=self.alerts, metrics=metrics,
                             clock=clock, facts=self.gateway_facts)
        self.scheduler = Scheduler(db=db, actuator=self.actuator, targets=self.targets, metrics=metrics,
                                   clock=clock, timezone=timezone)
        self.webhook = Webhook(cfg.webhook, gateway_id, metrics) if cfg.webhook is not None else None
        self.definitions = Definitions(db)
        self._config_rules: dict[str, AlertRule] = {r.id: r for r in cfg.rules()}
        self._config_schedules: dict[str, Schedule] = {s.id: s for s in cfg.schedule}
        self._api_rules: dict[str, AlertRule] = {}
        self._api_schedules: dict[str, Schedule] = {}
        self._api_groups: dict[str, list[str]] = {}
        self.engine.add_listener(self._on_transition)
        if cfg.enabled:
            ingest.add_observer(self.engine.on_readings)
            registry.add_observer(self.engine.on_online)
        self._last_prune = 0.0
        self._changes = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def load(self) -> None:
        rules, schedules, groups = await self.definitions.load()
        # an id the config file now uses too: the file wins (it is the installer's word)
        for r in rules:
            if r.id in self._config_rules:
                log.warning("rules.stored_rule_shadowed", rule=r.id, note="the config file defines this id")
            else:
                self._api_rules[r.id] = r
        self._api_schedules = {s.id: s for s in schedules if s.id not in self._config_schedules}
        self._api_groups = {k: v for k, v in groups.items() if k not in self.cfg.groups}
        self._apply()
        await self.engine.load()
        await self.actuator.load()
        await self.scheduler.load()

    def start(self, supervisor: Supervisor) -> None:
        if not self.cfg.enabled:
            log.info("rules.disabled")
            return
        supervisor.start("rules.transitions", self.engine.run)
        supervisor.start("rules.tick", self._tick_loop)
        supervisor.start("rules.gateway", self._gateway_loop)
        supervisor.start("rules.actions", self.actuator.run)
        supervisor.start("rules.schedules", self.scheduler.run)
        if self.webhook is not None:
            supervisor.start("rules.webhook", self.webhook.run)

    async def close(self) -> None:
        """Persist decided transitions and send what is queued before the store closes."""
        try:
            await self.engine.flush()
        except Exception as exc:  # stopping anyway: what is lost is re-decided from the next readings
            log.warning("rules.flush_failed", error=f"{type(exc).__name__}: {exc}")

    async def settle(self) -> None:
        """Until nothing decided is left unpersisted or unsent (tests; no sleeping)."""
        await self.engine.flush()
        await self.actuator.drain()

    async def _tick_loop(self) -> None:
        while True:
            await self.engine.tick()
            await asyncio.sleep(self.cfg.tick_s)

    async def _gateway_loop(self) -> None:
        while True:
            await self.engine.check_gateway()
            if self._clock.mono() - self._last_prune >= PRUNE_INTERVAL_S:
                self._last_prune = self._clock.mono()
                now = self._clock.wall()
                await self.alerts.prune(now - ALERT_RETENTION_DAYS * 86400)
                await self.actuator.prune(now - RUN_RETENTION_DAYS * 86400)
            await asyncio.sleep(self.cfg.check_interval_s)

    async def _on_transition(self, trigger: str, rule: AlertRule | None, alert: Alert) -> None:
        await self.actuator.for_alert(trigger, rule, alert)
        if self.webhook is not None:
            self.webhook.offer("raised" if trigger == "fire" else "cleared", alert)

    async def gateway_facts(self) -> GatewayFacts:
        facts = GatewayFacts()
        disk = self._snapshot().get("components", {}).get("disk") or {}
        if disk.get("total_bytes"):
            facts.disk_free_percent = 100.0 * disk["free_bytes"] / disk["total_bytes"]
        oldest = await self._outbox.oldest_unacknowledged_ts()
        if oldest is not None:
            facts.backlog_age_s = max(0.0, self._clock.wall() - oldest)
        return facts

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True, "enabled": self.cfg.enabled, **self.engine.health(),
                               "actions": self.actuator.health(), **self.scheduler.health()}
        if self.webhook is not None:
            out["webhook"] = self.webhook.health()
        return out

    def _apply(self) -> None:
        self.targets.set_groups(self.cfg.groups, self._api_groups)
        self.engine.set_rules(self.all_rules())
        self.scheduler.set_schedules(self.all_schedules())

    # -- rules ------------------------------------------------------------------------------------------
    def all_rules(self) -> list[AlertRule]:
        return [*self._config_rules.values(), *self._api_rules.values()]

    def rule(self, rule_id: str) -> tuple[AlertRule, Source] | None:
        if rule_id in self._config_rules:
            return self._config_rules[rule_id], "config"
        if rule_id in self._api_rules:
            return self._api_rules[rule_id], "api"
        return None

    async def known_metrics(self) -> frozenset[str]:
        """What an API rule may name besides the catalogue: [rules] known_metrics, what the
        profiles declare, and what devices have actually sent."""
        names = set(self.cfg.known_metrics)
        for p in self._profiles.profiles.values():
            for route in p.routes:
                names.update(route.units)
                names.update(f.metric for f in route.fields.values())
        names.update(await self._readings.all_metrics())
        return frozenset(names)

    async def parse_rule(self, body: Any) -> AlertRule:
        """Validate an API body; raises ``pydantic.ValidationError`` or ``models.UnknownKind``."""
        return parse_rule(body, metrics=await self.known_metrics())

    async def put_rule(self, rule: AlertRule, *, by: str, via: dict[str, Any], create: bool) -> AlertRule:
        async with self._changes:
            _check_put("rule", rule.id, self._config_rules, self._api_rules, create=create)
            await self.definitions.put("alert_rules", rule.id, rule.model_dump(mode="json"), by=by, created=create,
                                       audit={**via, "kind": rule.kind, "rule": rule.model_dump(mode="json")})
            self._api_rules[rule.id] = rule
            self._apply()
            await self.engine.sweep()
        return rule

    async def delete_rule(self, rule_id: str, *, by: str, via: dict[str, Any]) -> None:
        async with self._changes:
            _check_delete("rule", rule_id, self._config_rules, self._api_rules)
            await self.definitions.delete("alert_rules", rule_id, by=by, audit=dict(via))
            del self._api_rules[rule_id]
            self._apply()
            await self.engine.sweep()

    # -- alerts -------------------------------------------------------------------------------------------
    async def acknowledge(self, alert_id: int, *, by: str, via: dict[str, Any]) -> Alert:
        alert = await self.alerts.acknowledge(alert_id, by, audit=dict(via))
        self.engine.note_acknowledged(alert)
        if self.webhook is not None:
            self.webhook.offer("acknowledged", alert)
        return alert

    # -- schedules --------------------------------------------------------------------------------------
    def all_schedules(self) -> list[Schedule]:
        return [*self._config_schedules.values(), *self._api_schedules.values()]

    def schedule(self, schedule_id: str) -> tuple[Schedule, Source] | None:
        if schedule_id in self._config_schedules:
            return self._config_schedules[schedule_id], "config"
        if schedule_id in self._api_schedules:
            return self._api_schedules[schedule_id], "api"
        return None

    async def put_schedule(self, sched: Schedule, *, by: str, via: dict[str, Any], create: bool) -> Schedule:
        async with self._changes:
            _check_put("schedule", sched.id, self._config_schedules, self._api_schedules, create=create)
            spec = sched.model_dump(mode="json")
            await self.definitions.put("schedules", sched.id, spec, by=by, created=create,
                                       audit={**via, "schedule": spec})
            self._api_schedules[sched.id] = sched
            self._apply()
        return sched

    async def delete_schedule(self, schedule_id: str, *, by: str, via: dict[str, Any]) -> None:
        async with self._changes:
            _check_delete("schedule", schedule_id, self._config_schedules, self._api_schedules)
            await self.definitions.delete("schedules", schedule_id, by=by, audit=dict(via))
            del self._api_schedules[schedule_id]
            self._apply()
            await self.scheduler.forget(schedule_id)

    async def override(self, schedule_id: str, *, state: str | None, until: float | None, by: str,
                       via: dict[str, Any]) -> dict[str, Any]:
        if self.schedule(schedule_id) is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        try:
            ov = await self.scheduler.set_override(schedule_id, state=state, until=until, by=by)
        except ScheduleError as exc:
            raise Conflict(str(exc)) from None
        await self._audit.record(by, "schedule.override", schedule_id, {**via, "state": state, "until": ov.until})
        return self.scheduler.status(schedule_id)

    async def cancel_override(self, schedule_id: str, *, by: str, via: dict[str, Any]) -> dict[str, Any]:
        if self.schedule(schedule_id) is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        if not await self.scheduler.clear_override(schedule_id, by=by):
            raise NotFound(f"schedule {schedule_id!r} has no override")
        await self._audit.record(by, "schedule.override_cancel", schedule_id, dict(via))
        return self.scheduler.status(schedule_id)

    # -- groups ---------------------------------------------------------------------------------------------
    def groups(self) -> dict[str, tuple[list[str], Source]]:
        out: dict[str, tuple[list[str], Source]] = {k: (list(v), "config") for k, v in self.cfg.groups.items()}
        out.update({k: (list(v), "api") for k, v in self._api_groups.items()})
        return out

    async def put_group(self, name: str, devices: list[str], *, by: str, via: dict[str, Any]) -> None:
        async with self._changes:
            if name in self.cfg.groups:
                raise Conflict(f"group {name!r} is defined in the config file; change it there")
            await self.definitions.put_group(name, devices, by=by, audit=dict(via))
            self._api_groups[name] = list(devices)
            self._apply()
            await self.engine.sweep()

    async def delete_group(self, name: str, *, by: str, via: dict[str, Any]) -> None:
        async with self._changes:
            if name in self.cfg.groups:
                raise Conflict(f"group {name!r} is defined in the config file; remove it there")
            if not await self.definitions.delete_group(name, by=by, audit=dict(via)):
                raise NotFound(f"no group {name!r}")
            self._api_groups.pop(name, None)
            self._apply()
            await self.engine.sweep()
