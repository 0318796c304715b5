"""Rules, schedules and groups made through the API: owns ``alert_rules``, ``schedules`` and
``rule_groups``. Each change commits together with its audit entry."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import structlog
from pydantic import ValidationError

from gateway.audit import Audit
from gateway.rules.models import AlertRule, Schedule, UnknownKind, parse_rule
from gateway.store.database import Database

log = structlog.get_logger(__name__)


class Definitions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> tuple[list[AlertRule], list[Schedule], dict[str, list[str]]]:
        rules: list[AlertRule] = []
        for r in await self._db.fetchall("SELECT id, spec FROM alert_rules ORDER BY id"):
            try:
                rules.append(parse_rule(json.loads(r[1]), metrics=None))
            except (ValidationError, UnknownKind, ValueError) as exc:
                # a stored rule that a newer Siteward no longer accepts must not stop the gateway
                log.error("rules.stored_rule_invalid", rule=r[0], error=str(exc))
        schedules: list[Schedule] = []
        for r in await self._db.fetchall("SELECT id, spec FROM schedules ORDER BY id"):
            try:
                schedules.append(Schedule.model_validate_json(r[1]))
            except ValidationError as exc:
                log.error("rules.stored_schedule_invalid", schedule=r[0], error=str(exc))
        groups = {r[0]: json.loads(r[1]) for r in await self._db.fetchall("SELECT name, devices FROM rule_groups")}
        return rules, schedules, groups

    async def put(self, table: str, item_id: str, spec: dict[str, Any], *, by: str, created: bool,
                  audit: dict[str, Any]) -> None:
        assert table in ("alert_rules", "schedules")
        now = time.time()
        text = json.dumps(spec, separators=(",", ":"), sort_keys=True)
        what = "rule" if table == "alert_rules" else "schedule"

        def put(c: sqlite3.Connection) -> None:
            c.execute(f"INSERT INTO {table} (id, spec, created_at, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)"
                      " ON CONFLICT(id) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at,"
                      " updated_by = excluded.updated_by", (item_id, text, now, now, by))
            Audit.insert(c, by, f"{what}.{'create' if created else 'update'}", item_id, audit)

        await self._db.write(put)

    async def delete(self, table: str, item_id: str, *, by: str, audit: dict[str, Any]) -> bool:
        assert table in ("alert_rules", "schedules")
        what = "rule" if table == "alert_rules" else "schedule"

        def delete(c: sqlite3.Connection) -> bool:
            n = c.execute(f"DELETE FROM {table} WHERE id = ?", (item_id,)).rowcount
            if n:
                Audit.insert(c, by, f"{what}.delete", item_id, audit)
            return bool(n)

        return bool(await self._db.write(delete))

    async def meta(self, table: str) -> dict[str, dict[str, Any]]:
        assert table in ("alert_rules", "schedules")
        rows = await self._db.fetchall(f"SELECT id, created_at, updated_at, updated_by FROM {table}")
        return {r[0]: {"created_at": r[1], "updated_at": r[2], "updated_by": r[3]} for r in rows}

    async def put_group(self, name: str, devices: list[str], *, by: str, audit: dict[str, Any]) -> None:
        now = time.time()

        def put(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO rule_groups (name, devices, updated_at, updated_by) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT(name) DO UPDATE SET devices = excluded.devices,"
                      " updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                      (name, json.dumps(devices), now, by))
            Audit.insert(c, by, "rule_group.put", name, {**audit, "devices": devices})

        await self._db.write(put)

    async def delete_group(self, name: str, *, by: str, audit: dict[str, Any]) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            n = c.execute("DELETE FROM rule_groups WHERE name = ?", (name,)).rowcount
            if n:
                Audit.insert(c, by, "rule_group.delete", name, audit)
            return bool(n)

        return bool(await self._db.write(delete))
