"""Automations: the commands alert rules and schedules send, each audited, its result recorded.

Owns the ``automation_runs`` table, which is both the record and the durable to-do list:
a decision to send a command is written as a ``pending`` row (a schedule writes it in the
same transaction that moves its high-water mark, so a crash can neither lose nor repeat
it); the supervised actions task sends pending rows through the
:class:`~gateway.devices.commands.Commander` (which publishes, and records ``command.*``
events), marks them ``sent`` with an audit entry in the same transaction, and follows each
command until the device confirms it or it times out.

Run states: ``pending`` → ``sent`` → ``confirmed`` | ``timed_out`` | ``failed``; or
``refused`` (unknown or ignored device, publish failed), ``skipped`` (cooldown), ``expired``
(still pending ``PENDING_MAX_AGE_S`` after it was decided: the gateway was down, and a
stale "relay on" is worse than none; schedules catch up on their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ValidationError

from gateway.audit import Audit
from gateway.clock import Clock
from gateway.devices.commands import Commander, CommandRefused
from gateway.devices.registry import UnknownDevice
from gateway.metrics import Metrics
from gateway.models import CommandRequest, CommandState
from gateway.rules.alerts import Alert
from gateway.rules.models import MAX_DURATION_S, AlertRule
from gateway.store.database import Database
from gateway.store.filters import Where

log = structlog.get_logger(__name__)

PENDING_MAX_AGE_S = 600.0
FOLLOW_INTERVAL_S = 0.25

Origin = Literal["rule", "schedule"]
_COLS = ("id, origin, origin_id, action_key, alert_id, trigger, device_id, command, args, timeout_s, state, "
         "command_id, detail, created_at, updated_at")


@dataclass(slots=True)
class Job:
    origin: Origin
    origin_id: str
    action_key: str
    trigger: str  # fire, clear, schedule, override, resume
    device: str
    command: str
    args: dict[str, Any]
    timeout_s: float | None = None
    alert_id: int | None = None
    state: str = "pending"
    detail: dict[str, Any] = field(default_factory=dict)
    id: int = 0
    created_at: float = 0.0
    command_id: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.origin}:{self.origin_id}"


class Run(BaseModel):
    id: int
    origin: str
    origin_id: str
    action_key: str
    alert_id: int | None
    trigger: str
    device: str
    command: str
    args: dict[str, Any]
    timeout_s: float | None
    state: str
    command_id: str | None
    detail: dict[str, Any]
    created_at: float
    updated_at: float


def _run(r: sqlite3.Row | Sequence[Any]) -> Run:
    return Run(id=r[0], origin=r[1], origin_id=r[2], action_key=r[3], alert_id=r[4], trigger=r[5], device=r[6],
               command=r[7], args=json.loads(r[8]), timeout_s=r[9], state=r[10], command_id=r[11],
               detail=json.loads(r[12]), created_at=r[13], updated_at=r[14])


class Actuator:
    def __init__(self, db: Database, commander: Commander, metrics: Metrics, clock: Clock) -> None:
        self._db = db
        self._commander = commander
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[Job] = deque()
        self._sent: dict[int, Job] = {}
        # (origin, origin id, action key, device) -> when it last ran (cooldowns)
        self._last: dict[tuple[str, str, str, str], float] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        rows = await self._db.fetchall(
            f"SELECT {_COLS} FROM automation_runs WHERE state IN ('pending', 'sent') ORDER BY id")
        for r in rows:
            run = _run(r)
            job = Job(origin=run.origin, origin_id=run.origin_id, action_key=run.action_key,  # type: ignore[arg-type]
                      trigger=run.trigger, device=run.device, command=run.command, args=run.args,
                      timeout_s=run.timeout_s, alert_id=run.alert_id, state=run.state, id=run.id,
                      created_at=run.created_at, command_id=run.command_id)
            if run.state == "pending":
                self._queue.append(job)
            else:
                self._sent[job.id] = job
        since = self._clock.wall() - MAX_DURATION_S
        for r in await self._db.fetchall(
                "SELECT origin, origin_id, action_key, device_id, max(created_at) FROM automation_runs"
                " WHERE state != 'skipped' AND created_at >= ? GROUP BY origin, origin_id, action_key, device_id",
                (since,)):
            self._last[(r[0], r[1], r[2], r[3])] = r[4]
        if self._queue:
            self._wake.set()

    # -- deciding ---------------------------------------------------------------------------------
    @staticmethod
    def insert(conn: sqlite3.Connection, jobs: Sequence[Job], now: float) -> None:
        """Write ``jobs`` inside the caller's transaction (on the writer thread); sets their ids."""
        for j in jobs:
            cur = conn.execute(
                "INSERT INTO automation_runs (origin, origin_id, action_key, alert_id, trigger, device_id, command,"
                " args, timeout_s, state, detail, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (j.origin, j.origin_id, j.action_key, j.alert_id, j.trigger, j.device, j.command,
                 json.dumps(j.args, separators=(",", ":")), j.timeout_s, j.state,
                 json.dumps(j.detail, separators=(",", ":"), default=str), now, now))
            j.id = int(cur.lastrowid or 0)
            j.created_at = now

    def accept(self, jobs: Sequence[Job]) -> None:
        """Queue committed jobs for sending (call after the transaction that inserted them)."""
        for j in jobs:
            if j.state == "pending":
                self._last[(j.origin, j.origin_id, j.action_key, j.device)] = j.created_at
                self._queue.append(j)
            else:
                self._metrics.automation_runs.labels(origin=j.origin, state=j.state).inc()
        if self._queue:
            self._wake.set()

    def in_cooldown(self, origin: str, origin_id: str, action_key: str, device: str, cooldown_s: float,
                    now: float) -> float | None:
        last = self._last.get((origin, origin_id, action_key, device))
        return last if last is not None and 0 <= now - last < cooldown_s else None

    async def for_alert(self, trigger: str, rule: AlertRule | None, alert: Alert) -> list[Job]:
        """The engine's listener: plan the rule's actions for this transition."""
        if rule is None or not rule.actions:
            return []
        now = self._clock.wall()
        jobs: list[Job] = []
        for i, a in enumerate(rule.actions):
            device = a.device or alert.device
            if a.when != trigger or device is None:
                continue
            job = Job(origin="rule", origin_id=rule.id, action_key=str(i), trigger=trigger, device=device,
                      command=a.command, args=dict(a.args), timeout_s=a.timeout_s, alert_id=alert.id)
            last = self.in_cooldown("rule", rule.id, job.action_key, device, a.cooldown_s, now)
            if last is not None:
                job.state = "skipped"
                job.detail = {"reason": "cooldown", "last_run_at": last, "cooldown_s": a.cooldown_s}
            jobs.append(job)
        if jobs:
            await self._db.write(lambda c: self.insert(c, jobs, now))
            self.accept(jobs)
        return jobs

    # -- doing --------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The supervised actions task."""
        while True:
            # idle until something is queued; while commands await their result, look often
            # (one primary-key read per command) so a confirmation is recorded promptly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FOLLOW_INTERVAL_S if self._sent else None)
            self._wake.clear()
            await self.drain()

    async def drain(self) -> None:
        """Send everything queued, then look once at the commands still waiting for a result."""
        async with self._lock:
            while self._queue:
                await self._send(self._queue[0])
                self._queue.popleft()
            await self._follow()

    async def _send(self, job: Job) -> None:
        now = self._clock.wall()
        error: str | None = None
        if job.command_id is None:  # not sent by an earlier attempt that failed to record it
            if now - job.created_at > PENDING_MAX_AGE_S:
                job.state, error = "expired", f"still pending {now - job.created_at:.0f} s after it was decided"
            else:
                try:
                    req = CommandRequest(command=job.command, args=job.args, timeout_s=job.timeout_s)
                    cmd = await self._commander.send(job.device, req, actor=job.actor)
                except UnknownDevice:
                    job.state, error = "refused", f"unknown device {job.device}"
                except CommandRefused as exc:
                    job.state, error = "refused", str(exc)
                except ValidationError as exc:
                    job.state, error = "failed", f"invalid command: {exc.errors()[0]['msg']}"
                else:
                    job.command_id, job.state = cmd.id, "sent"
        detail = {**job.detail, **({"error": error} if error else {})}
        audit = {"run_id": job.id, "trigger": job.trigger, "alert_id": job.alert_id, "command": job.command,
                 "args": job.args, "state": job.state, "command_id": job.command_id, "error": error}

        def record(c: sqlite3.Connection) -> None:
            c.execute("UPDATE automation_runs SET state = ?, command_id = ?, detail = ?, updated_at = ? WHERE id = ?",
                      (job.state, job.command_id, json.dumps(detail, default=str), now, job.id))
            # the change and its audit entry commit together or not at all
            Audit.insert(c, job.actor, f"{job.origin}.command", job.device, audit)

        await self._db.write(record)
        if job.state == "sent":
            self._sent[job.id] = job
        else:
            self._metrics.automation_runs.labels(origin=job.origin, state=job.state).inc()
            log.warning("automation.not_sent", run_id=job.id, actor=job.actor, device=job.device, state=job.state,
                        error=error)

    async def _follow(self) -> None:
        for run_id, job in list(self._sent.items()):
            assert job.command_id is not None
            cmd = await self._commander.get(job.command_id)
            if cmd is not None and cmd.state == CommandState.SENT:
                continue
            state = cmd.state.value if cmd is not None else "failed"
            result = cmd.result if cmd is not None else {"error": "command record missing"}
            now = self._clock.wall()
            await self._db.write(lambda c, s=state, res=result, rid=run_id, t=now: c.execute(
                "UPDATE automation_runs SET state = ?, detail = json_set(detail, '$.result', json(?)), updated_at = ?"
                " WHERE id = ?", (s, json.dumps(res, default=str), t, rid)))
            self._sent.pop(run_id, None)
            self._metrics.automation_runs.labels(origin=job.origin, state=state).inc()

    # -- reading ----------------------------------------------------------------------------------------
    async def runs(self, *, origin: str | None = None, origin_id: str | None = None, alert_id: int | None = None,
                   device: str | None = None, before_id: int | None = None, limit: int = 100) -> list[Run]:
        where = Where()
        where.given("origin = ?", origin)
        where.given("origin_id = ?", origin_id)
        where.given("alert_id = ?", alert_id)
        where.given("device_id = ?", device)
        where.given("id < ?", before_id)
        sql = f"SELECT {_COLS} FROM automation_runs" + where.sql() + " ORDER BY id DESC LIMIT ?"
        return [_run(r) for r in await self._db.fetchall(sql, [*where.params, max(1, min(limit, 1000))])]

    async def prune(self, older_than: float) -> int:
        return int(await self._db.write(lambda c: c.execute(
            "DELETE FROM automation_runs WHERE created_at < ? AND state NOT IN ('pending', 'sent')",
            (older_than,)).rowcount))

    def health(self) -> dict[str, Any]:
        return {"queued": len(self._queue), "awaiting_result": len(self._sent), "at": time.time()}
