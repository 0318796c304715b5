"""Alerts: raised → acknowledged (by whom) → cleared, persisted, each transition an event.

Owns the ``alerts`` table. The unique index ``alerts_open`` lets the database itself
refuse a second open alert for the same rule and device, so neither a restart nor a race
can raise a duplicate: :meth:`AlertStore.raise_` then returns the alert already open.

Every transition is an event (``alert.raised``, ``alert.acknowledged``,
``alert.cleared``), which is what the cloud sync's events lane sends upstream and what
live viewers see. The event is written with :meth:`EventLog.insert` inside the same
transaction as the alert row: the two commit together or not at all, so the cloud never
misses a transition the gateway shows, nor hears of one it does not.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from pydantic import BaseModel

from gateway.audit import Audit
from gateway.metrics import Metrics
from gateway.store.database import Database
from gateway.store.events import EventLog
from gateway.store.filters import Where

log = structlog.get_logger(__name__)

AlertState = Literal["active", "acknowledged", "cleared"]

_COLS = ("id, rule_id, device_id, kind, severity, state, message, value, raised_at, acked_at, acked_by, "
         "cleared_at, clear_reason, clear_value, data")


class Alert(BaseModel):
    id: int
    rule_id: str
    device: str | None  # None: about the gateway itself (disk, cloud backlog)
    kind: str
    severity: str
    state: AlertState
    message: str
    value: float | None = None
    raised_at: float
    acked_at: float | None = None
    acked_by: str | None = None
    cleared_at: float | None = None
    clear_reason: str | None = None
    clear_value: float | None = None
    data: dict[str, Any] = {}

    @property
    def open(self) -> bool:
        return self.state != "cleared"

    def event_data(self, transition: str) -> dict[str, Any]:
        d: dict[str, Any] = {"alert_id": self.id, "rule_id": self.rule_id, "rule_kind": self.kind,
                             "severity": self.severity, "state": self.state, "message": self.message,
                             "value": self.value, "raised_at": self.raised_at}
        if transition == "acknowledged":
            d |= {"by": self.acked_by, "acked_at": self.acked_at}
        elif transition == "cleared":
            d |= {"reason": self.clear_reason, "clear_value": self.clear_value, "cleared_at": self.cleared_at,
                  "acked_by": self.acked_by}
        return d


class AlertError(Exception):
    pass


class AlertNotFound(AlertError):
    pass


class AlertConflict(AlertError):
    """The transition does not apply to the alert's current state (already acknowledged, cleared)."""


def _with_event(c: sqlite3.Connection, alert_id: int, transition: str, ts: float) -> tuple[Alert, int]:
    """Read the alert back and write its transition's event, inside the caller's transaction."""
    alert = _row(c.execute(f"SELECT {_COLS} FROM alerts WHERE id = ?", (alert_id,)).fetchone())
    return alert, EventLog.insert(c, f"alert.{transition}", alert.device, alert.event_data(transition), ts)


def _row(r: sqlite3.Row | Sequence[Any]) -> Alert:
    return Alert(id=r[0], rule_id=r[1], device=r[2] or None, kind=r[3], severity=r[4], state=r[5], message=r[6],
                 value=r[7], raised_at=r[8], acked_at=r[9], acked_by=r[10], cleared_at=r[11], clear_reason=r[12],
                 clear_value=r[13], data=json.loads(r[14]) if r[14] else {})


class AlertStore:
    def __init__(self, db: Database, events: EventLog, metrics: Metrics) -> None:
        self._db = db
        self._events = events
        self._metrics = metrics

    # -- transitions -----------------------------------------------------------------------
    async def raise_(self, *, rule_id: str, device: str | None, kind: str, severity: str, message: str,
                     value: float | None, data: dict[str, Any] | None = None,
                     ts: float | None = None) -> tuple[Alert, bool]:
        """Open an alert; returns (alert, True), or (the alert already open, False)."""
        now = time.time() if ts is None else ts
        body = json.dumps(data or {}, separators=(",", ":"), default=str)

        def insert(c: sqlite3.Connection) -> tuple[Alert, int | None]:
            try:
                cur = c.execute(
                    "INSERT INTO alerts (rule_id, device_id, kind, severity, state, message, value, raised_at, data)"
                    " VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                    (rule_id, device or "", kind, severity, message, value, now, body))
            except sqlite3.IntegrityError:
                row = c.execute(f"SELECT {_COLS} FROM alerts WHERE rule_id = ? AND device_id = ?"
                                " AND state != 'cleared'", (rule_id, device or "")).fetchone()
                return _row(row), None
            return _with_event(c, int(cur.lastrowid or 0), "raised", now)

        alert, eid = await self._db.write(insert)
        created = eid is not None
        if eid is not None:
            self._metrics.alert_transitions.labels(transition="raised", severity=severity).inc()
            self._events.announce(eid, "alert.raised", alert.device, alert.event_data("raised"), now)
            log.warning("alert.raised", alert_id=alert.id, rule=rule_id, device=device, severity=severity,
                        message=message)
        return alert, created

    async def acknowledge(self, alert_id: int, by: str, audit: dict[str, Any] | None = None) -> Alert:
        """``by`` acknowledges the alert; with ``audit``, the audit entry commits together with it."""
        now = time.time()

        def ack(c: sqlite3.Connection) -> tuple[Alert | None, int | None]:
            cur = c.execute("UPDATE alerts SET state = 'acknowledged', acked_at = ?, acked_by = ?"
                            " WHERE id = ? AND state = 'active'", (now, by, alert_id))
            if cur.rowcount == 1:
                if audit is not None:
                    Audit.insert(c, by, "alert.acknowledge", str(alert_id), audit)
                return _with_event(c, alert_id, "acknowledged", now)
            row = c.execute(f"SELECT {_COLS} FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            return (_row(row) if row else None), None

        alert, eid = await self._db.write(ack)
        if alert is None:
            raise AlertNotFound(f"no alert {alert_id}")
        if eid is None:
            if alert.state == "cleared":
                raise AlertConflict(f"alert {alert_id} is already cleared")
            raise AlertConflict(f"alert {alert_id} was already acknowledged by {alert.acked_by}")
        self._metrics.alert_transitions.labels(transition="acknowledged", severity=alert.severity).inc()
        self._events.announce(eid, "alert.acknowledged", alert.device, alert.event_data("acknowledged"), now)
        log.info("alert.acknowledged", alert_id=alert_id, by=by)
        return alert

    async def clear(self, alert_id: int, *, reason: str, value: float | None = None) -> Alert | None:
        """Clear an open alert; None if it was not open (nothing happens then)."""
        now = time.time()

        def clear(c: sqlite3.Connection) -> tuple[Alert, int] | None:
            cur = c.execute("UPDATE alerts SET state = 'cleared', cleared_at = ?, clear_reason = ?, clear_value = ?"
                            " WHERE id = ? AND state != 'cleared'", (now, reason, value, alert_id))
            if cur.rowcount == 0:
                return None
            return _with_event(c, alert_id, "cleared", now)

        done = await self._db.write(clear)
        if done is None:
            return None
        alert, eid = done
        self._metrics.alert_transitions.labels(transition="cleared", severity=alert.severity).inc()
        self._events.announce(eid, "alert.cleared", alert.device, alert.event_data("cleared"), now)
        log.info("alert.cleared", alert_id=alert_id, rule=alert.rule_id, device=alert.device, reason=reason)
        return alert

    # -- reading ------------------------------------------------------------------------------------
    async def open_alerts(self) -> list[Alert]:
        rows = await self._db.fetchall(f"SELECT {_COLS} FROM alerts WHERE state != 'cleared' ORDER BY id")
        return [_row(r) for r in rows]

    async def get(self, alert_id: int) -> Alert | None:
        r = await self._db.fetchone(f"SELECT {_COLS} FROM alerts WHERE id = ?", (alert_id,))
        return _row(r) if r else None

    async def query(self, *, state: str | None = None, rule_id: str | None = None, device: str | None = None,
                    severity: str | None = None, since: float | None = None, before_id: int | None = None,
                    limit: int = 200) -> list[Alert]:
        """Newest first. ``state`` is one of the states or ``"open"`` (active or acknowledged)."""
        where = Where()
        if state == "open":
            where.add("state != 'cleared'")
        else:
            where.given("state = ?", state)
        where.given("rule_id = ?", rule_id)
        where.given("device_id = ?", device)
        where.given("severity = ?", severity)
        where.given("raised_at >= ?", since)
        where.given("id < ?", before_id)
        sql = f"SELECT {_COLS} FROM alerts" + where.sql() + " ORDER BY id DESC LIMIT ?"
        return [_row(r) for r in await self._db.fetchall(sql, [*where.params, max(1, min(limit, 10_000))])]

    async def counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT severity, count(*) FROM alerts WHERE state != 'cleared'"
                                       " GROUP BY severity")
        return {r[0]: int(r[1]) for r in rows}

    async def prune(self, older_than: float) -> int:
        """Forget alerts cleared before ``older_than`` (their events stay in the events table)."""
        return int(await self._db.write(lambda c: c.execute(
            "DELETE FROM alerts WHERE state = 'cleared' AND cleared_at < ?", (older_than,)).rowcount))
