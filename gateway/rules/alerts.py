"""Alerts: raised → acknowledged (by whom) → cleared, persisted, each transition an event.

Owns the ``alerts`` table. The unique index ``alerts_open`` lets the database itself
refuse a second open alert for the same rule and device, so neither a restart nor a race
can raise a duplicate: :meth:`AlertStore.raise_` then returns the alert already open.

Every transition is recorded through :class:`~gateway.store.events.EventLog`
(``alert.raised``, ``alert.acknowledged``, ``alert.cleared``), which is what the cloud
sync's events lane sends upstream and what live viewers see. The event is written right
after the alert row; should the process die between the two commits, :meth:`reconcile`
records the missing event at the next start, with the transition's own time.
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

log = structlog.get_logger(__name__)

AlertState = Literal["active", "acknowledged", "cleared"]
# how far back reconcile() looks for transitions whose event may be missing
RECONCILE_WINDOW_S = 86400.0

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

        def insert(c: sqlite3.Connection) -> tuple[Any, bool]:
            try:
                cur = c.execute(
                    "INSERT INTO alerts (rule_id, device_id, kind, severity, state, message, value, raised_at, data)"
                    " VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                    (rule_id, device or "", kind, severity, message, value, now, body))
            except sqlite3.IntegrityError:
                row = c.execute(f"SELECT {_COLS} FROM alerts WHERE rule_id = ? AND device_id = ?"
                                " AND state != 'cleared'", (rule_id, device or "")).fetchone()
                return row, False
            return c.execute(f"SELECT {_COLS} FROM alerts WHERE id = ?", (cur.lastrowid,)).fetchone(), True

        row, created = await self._db.write(insert)
        alert = _row(row)
        if created:
            self._metrics.alert_transitions.labels(transition="raised", severity=severity).inc()
            await self._events.record("alert.raised", alert.device, alert.event_data("raised"), ts=now)
            log.warning("alert.raised", alert_id=alert.id, rule=rule_id, device=device, severity=severity,
                        message=message)
        return alert, created

    async def acknowledge(self, alert_id: int, by: str, audit: dict[str, Any] | None = None) -> Alert:
        """``by`` acknowledges the alert; with ``audit``, the audit entry commits together with it."""
        now = time.time()

        def ack(c: sqlite3.Connection) -> tuple[Any, bool]:
            cur = c.execute("UPDATE alerts SET state = 'acknowledged', acked_at = ?, acked_by = ?"
                            " WHERE id = ? AND state = 'active'", (now, by, alert_id))
            if cur.rowcount == 1 and audit is not None:
                Audit.insert(c, by, "alert.acknowledge", str(alert_id), audit)
            return c.execute(f"SELECT {_COLS} FROM alerts WHERE id = ?", (alert_id,)).fetchone(), cur.rowcount == 1

        row, changed = await self._db.write(ack)
        if row is None:
            raise AlertNotFound(f"no alert {alert_id}")
        alert = _row(row)
        if not changed:
            if alert.state == "cleared":
                raise AlertConflict(f"alert {alert_id} is already cleared")
            raise AlertConflict(f"alert {alert_id} was already acknowledged by {alert.acked_by}")
        self._metrics.alert_transitions.labels(transition="acknowledged", severity=alert.severity).inc()
        await self._events.record("alert.acknowledged", alert.device, alert.event_data("acknowledged"), ts=now)
        log.info("alert.acknowledged", alert_id=alert_id, by=by)
        return alert

    async def clear(self, alert_id: int, *, reason: str, value: float | None = None) -> Alert | None:
        """Clear an open alert; None if it was not open (nothing happens then)."""
        now = time.time()

        def clear(c: sqlite3.Connection) -> Any:
            cur = c.execute("UPDATE alerts SET state = 'cleared', cleared_at = ?, clear_reason = ?, clear_value = ?"
                            " WHERE id = ? AND state != 'cleared'", (now, reason, value, alert_id))
            if cur.rowcount == 0:
                return None
            return c.execute(f"SELECT {_COLS} FROM alerts WHERE id = ?", (alert_id,)).fetchone()

        row = await self._db.write(clear)
        if row is None:
            return None
        alert = _row(row)
        self._metrics.alert_transitions.labels(transition="cleared", severity=alert.severity).inc()
        await self._events.record("alert.cleared", alert.device, alert.event_data("cleared"), ts=now)
        log.info("alert.cleared", alert_id=alert_id, rule=alert.rule_id, device=alert.device, reason=reason)
        return alert

    # -- after a restart --------------------------------------------------------------------------
    async def reconcile(self, now: float | None = None) -> int:
        """Record the event of any recent transition whose event did not make it to the store."""
        now = time.time() if now is None else now
        since = now - RECONCILE_WINDOW_S
        rows = await self._db.fetchall(
            f"SELECT {_COLS} FROM alerts WHERE raised_at >= ? OR acked_at >= ? OR cleared_at >= ?",
            (since, since, since))
        if not rows:
            return 0
        seen: set[tuple[str, int]] = set()
        for kind in ("alert.raised", "alert.acknowledged", "alert.cleared"):
            for ev in await self._events.query(kind=kind, since=since - 60, limit=100_000):
                aid = ev.data.get("alert_id")
                if isinstance(aid, int):
                    seen.add((kind, aid))
        added = 0
        for r in rows:
            a = _row(r)
            for transition, at in (("raised", a.raised_at), ("acknowledged", a.acked_at), ("cleared", a.cleared_at)):
                if at is not None and at >= since and (f"alert.{transition}", a.id) not in seen:
                    await self._events.record(f"alert.{transition}", a.device, a.event_data(transition), ts=at)
                    added += 1
        if added:
            log.warning("alerts.events_reconciled", added=added)
        return added

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
        where: list[str] = []
        params: list[Any] = []
        if state == "open":
            where.append("state != 'cleared'")
        elif state is not None:
            where.append("state = ?")
            params.append(state)
        for col, v in (("rule_id", rule_id), ("device_id", device), ("severity", severity)):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        if since is not None:
            where.append("raised_at >= ?")
            params.append(since)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        sql = f"SELECT {_COLS} FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(max(1, min(limit, 10_000)))
        return [_row(r) for r in await self._db.fetchall(sql, params)]

    async def counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT severity, count(*) FROM alerts WHERE state != 'cleared'"
                                       " GROUP BY severity")
        return {r[0]: int(r[1]) for r in rows}

    async def prune(self, older_than: float) -> int:
        """Forget alerts cleared before ``older_than`` (their events stay in the events table)."""
        return int(await self._db.write(lambda c: c.execute(
            "DELETE FROM alerts WHERE state = 'cleared' AND cleared_at < ?", (older_than,)).rowcount))
