"""Rollout campaigns: which nodes get a firmware, in what order, and what became of each.

Owns ``ota_campaigns``, ``ota_nodes`` and ``ota_history``. A campaign is a state machine
over its nodes; this module decides, the service (``service.py``) acts (publishes
manifests, reads the registry). Every transition is persisted with a history row before
it is acted on, so a gateway restart resumes a campaign where it stood.

Per node::

    pending ─dispatch─▶ sent ─STARTED─▶ started ─IN_PROGRESS─▶ in_progress ─100 %─▶ rebooting
       │                 │                 │                       │                  │
       │                 └──── timeout ────┴───── timeout ─────────┴──── timeout ─────┤ (never confirmed)
       │                                                                              ▼
       ├─▶ skipped (already at/above the version)            success ◀─ SUCCESS / health fw = target
       └─▶ aborted (campaign aborted before it was sent)     failed  ◀─ FAILED / timeout / back on old fw

A campaign runs canaries first (the rest wait until every canary succeeded), never has
more than ``max_concurrent`` nodes in flight, and pauses itself when failures exceed
``max_failures`` (or any canary fails). Resuming acknowledges the failures so far.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.store.database import Database


class NodeState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    STARTED = "started"
    IN_PROGRESS = "in_progress"
    REBOOTING = "rebooting"
    SUCCESS = "success"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"


class CampaignState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


TERMINAL = frozenset({NodeState.SUCCESS, NodeState.FAILED, NodeState.ABORTED, NodeState.SKIPPED})
IN_FLIGHT = frozenset({NodeState.SENT, NodeState.STARTED, NodeState.IN_PROGRESS, NodeState.REBOOTING})
OPEN_CAMPAIGN = frozenset({CampaignState.RUNNING, CampaignState.PAUSED})


class CampaignError(ValueError):
    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class NodeRun:
    device: str
    state: NodeState = NodeState.PENDING
    progress: float | None = None
    reason: str | None = None
    from_version: str | None = None
    canary: bool = False
    since: float = field(default_factory=time.time)
    deadline: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "state": self.state.value, "progress": self.progress, "reason": self.reason,
                "from_version": self.from_version, "canary": self.canary, "since": self.since,
                "deadline": self.deadline}


@dataclass
class Campaign:
    id: str
    firmware: str
    project: str
    version: str
    target: dict[str, Any]
    canary: int
    max_concurrent: int
    max_failures: int
    state: CampaignState
    created_by: str
    created_at: float
    updated_at: float
    reason: str | None = None
    failures_ack: int = 0
    nodes: dict[str, NodeRun] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in NodeState}
        for n in self.nodes.values():
            out[n.state.value] += 1
        return out

    def failures(self) -> int:
        return sum(1 for n in self.nodes.values() if n.state is NodeState.FAILED)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "firmware": self.firmware, "project": self.project, "version": self.version,
                "target": self.target, "canary": self.canary, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures, "state": self.state.value, "reason": self.reason,
                "created_by": self.created_by, "created_at": self.created_at, "updated_at": self.updated_at,
                "counts": self.counts()}

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "nodes": [n.as_dict() for n in sorted(self.nodes.values(),
                                                                          key=lambda n: (not n.canary, n.device))]}


@dataclass(frozen=True, slots=True)
class Timeouts:
    start_s: float
    progress_s: float
    confirm_s: float


class Campaigns:
    """Open campaigns in memory (the ones that still need decisions), all of them on disk."""

    def __init__(self, db: Database, timeouts: Timeouts) -> None:
        self._db = db
        self.timeouts = timeouts
        self.open: dict[str, Campaign] = {}

    # -- persistence --------------------------------------------------------------------------
    async def load(self) -> None:
        rows = await self._db.fetchall(
            "SELECT c.id, c.firmware, f.project, f.version, c.target, c.canary, c.max_concurrent, c.max_failures,"
            " c.state, c.created_by, c.created_at, c.updated_at, c.reason, c.failures_ack"
            " FROM ota_campaigns c JOIN ota_firmware f ON f.sha256 = c.firmware WHERE c.state IN (?, ?)",
            (CampaignState.RUNNING.value, CampaignState.PAUSED.value))
        for r in rows:
            c = self._campaign_row(r)
            for n in await self._db.fetchall(
                    "SELECT device_id, state, progress, reason, from_version, canary, since, deadline"
                    " FROM ota_nodes WHERE campaign_id = ?", (c.id,)):
                c.nodes[n[0]] = NodeRun(n[0], NodeState(n[1]), n[2], n[3], n[4], bool(n[5]), n[6], n[7])
            self.open[c.id] = c

    @staticmethod
    def _campaign_row(r: Any) -> Campaign:
        return Campaign(id=r[0], firmware=r[1], project=r[2], version=r[3], target=json.loads(r[4]), canary=r[5],
                        max_concurrent=r[6], max_failures=r[7], state=CampaignState(r[8]), created_by=r[9],
                        created_at=r[10], updated_at=r[11], reason=r[12], failures_ack=r[13])

    async def get(self, campaign_id: str) -> Campaign | None:
        if campaign_id in self.open:
            return self.open[campaign_id]
        r = await self._db.fetchone(
            "SELECT c.id, c.firmware, f.project, f.version, c.target, c.canary, c.max_concurrent, c.max_failures,"
            " c.state, c.created_by, c.created_at, c.updated_at, c.reason, c.failures_ack"
            " FROM ota_campaigns c JOIN ota_firmware f ON f.sha256 = c.firmware WHERE c.id = ?", (campaign_id,))
        if r is None:
            return None
        c = self._campaign_row(r)
        for n in await self._db.fetchall(
                "SELECT device_id, state, progress, reason, from_version, canary, since, deadline"
                " FROM ota_nodes WHERE campaign_id = ?", (c.id,)):
            c.nodes[n[0]] = NodeRun(n[0], NodeState(n[1]), n[2], n[3], n[4], bool(n[5]), n[6], n[7])
        return c

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._db.fetchall("SELECT id FROM ota_campaigns ORDER BY created_at DESC LIMIT ?", (limit,))
        out = []
        for r in rows:
            c = await self.get(r[0])
            if c is not None:
                out.append(c.summary())
        return out

    async def history(self, campaign_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self._db.fetchall(
            "SELECT id, ts, device_id, state, progress, reason FROM ota_history WHERE campaign_id = ?"
            " ORDER BY id LIMIT ?", (campaign_id, limit))
        return [{"id": r[0], "ts": r[1], "device": r[2], "state": r[3], "progress": r[4], "reason": r[5]}
                for r in rows]

    async def _save_campaign(self, c: Campaign, *, insert: bool = False, note: str | None = None) -> None:
        c.updated_at = time.time()
        nodes = list(c.nodes.values()) if insert else []

        def fn(conn: sqlite3.Connection) -> None:
            if insert:
                conn.execute(
                    "INSERT INTO ota_campaigns (id, firmware, target, canary, max_concurrent, max_failures, state,"
                    " reason, failures_ack, created_by, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (c.id, c.firmware, json.dumps(c.target), c.canary, c.max_concurrent, c.max_failures,
                     c.state.value, c.reason, c.failures_ack, c.created_by, c.created_at, c.updated_at))
                for n in nodes:
                    conn.execute(
                        "INSERT INTO ota_nodes (campaign_id, device_id, state, progress, reason, from_version,"
                        " canary, since, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (c.id, n.device, n.state.value, n.progress, n.reason, n.from_version, int(n.canary),
                         n.since, n.deadline))
            else:
                conn.execute("UPDATE ota_campaigns SET state = ?, reason = ?, failures_ack = ?, updated_at = ?"
                             " WHERE id = ?", (c.state.value, c.reason, c.failures_ack, c.updated_at, c.id))
            conn.execute("INSERT INTO ota_history (ts, campaign_id, device_id, state, progress, reason)"
                         " VALUES (?, ?, NULL, ?, NULL, ?)", (c.updated_at, c.id, f"campaign.{c.state.value}",
                                                             note or c.reason))

        await self._db.write(fn)

    async def _save_node(self, c: Campaign, n: NodeRun) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE ota_nodes SET state = ?, progress = ?, reason = ?, from_version = ?, since = ?,"
                         " deadline = ? WHERE campaign_id = ? AND device_id = ?",
                         (n.state.value, n.progress, n.reason, n.from_version, n.since, n.deadline, c.id,
                          n.device))
            conn.execute("INSERT INTO ota_history (ts, campaign_id, device_id, state, progress, reason)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (time.time(), c.id, n.device, n.state.value, n.progress,
                                                        n.reason))

        await self._db.write(fn)

    # -- decisions ------------------------------------------------------------------------------
    def campaign_of(self, device: str) -> tuple[Campaign, NodeRun] | None:
        """The open campaign that has ``device`` still to do or in flight."""
        for c in self.open.values():
            n = c.nodes.get(device)
            if n is not None and n.state not in TERMINAL:
                return c, n
        return None

    async def create(self, *, firmware: str, project: str, version: str, devices: list[str],
                     target: dict[str, Any], canary: int, max_concurrent: int, max_failures: int,
                     actor: str) -> Campaign:
        if not devices:
            raise CampaignError("no_targets", "the target selects no device", 422)
        busy = sorted(d for d in devices if self.campaign_of(d) is not None)
        if busy:
            shown = ", ".join(f"{d} ({self.campaign_of(d)[0].id})" for d in busy[:10])  # type: ignore[index]
            raise CampaignError("node_busy", f"already in an open campaign: {shown}")
        now = time.time()
        c = Campaign(id="c-" + secrets.token_hex(6), firmware=firmware, project=project, version=version,
                     target=target, canary=min(canary, len(devices)), max_concurrent=max_concurrent,
                     max_failures=max_failures, state=CampaignState.RUNNING, created_by=actor, created_at=now,
                     updated_at=now)
        for i, d in enumerate(sorted(devices)):
            c.nodes[d] = NodeRun(d, canary=i < c.canary, since=now)
        await self._save_campaign(c, insert=True, note="created")
        self.open[c.id] = c
        return c

    async def set_state(self, c: Campaign, state: CampaignState, reason: str | None) -> None:
        c.state = state
        c.reason = reason
        if state is CampaignState.RUNNING:
            c.failures_ack = c.failures()  # resuming accepts the failures so far
        if state is CampaignState.ABORTED:
            for n in c.nodes.values():
                if n.state is NodeState.PENDING:
                    await self.transition(c, n, NodeState.ABORTED, reason="campaign aborted")
        await self._save_campaign(c)
        if state not in OPEN_CAMPAIGN or (state is CampaignState.ABORTED):
            self._close_if_done(c)

    def _close_if_done(self, c: Campaign) -> None:
        if c.state in (CampaignState.ABORTED, CampaignState.COMPLETED) and all(
                n.state in TERMINAL for n in c.nodes.values()):
            self.open.pop(c.id, None)

    async def transition(self, c: Campaign, n: NodeRun, state: NodeState, *, progress: float | None = None,
                         reason: str | None = None, deadline: float | None = None) -> None:
        n.state = state
        n.since = time.time()
        if progress is not None:
            n.progress = progress
        n.reason = reason
        n.deadline = deadline
        await self._save_node(c, n)

    def deadline_for(self, state: NodeState, now: float) -> float | None:
        t = self.timeouts
        return {NodeState.SENT: now + t.start_s, NodeState.STARTED: now + t.progress_s,
                NodeState.IN_PROGRESS: now + t.progress_s, NodeState.REBOOTING: now + t.confirm_s}.get(state)

    def due(self, c: Campaign, online: set[str]) -> list[NodeRun]:
        """Nodes to dispatch now: canaries first, within the concurrency limit, online only."""
        if c.state is not CampaignState.RUNNING:
            return []
        in_flight = sum(1 for n in c.nodes.values() if n.state in IN_FLIGHT)
        room = c.max_concurrent - in_flight
        if room <= 0:
            return []
        canaries = [n for n in c.nodes.values() if n.canary]
        # a failed canary holds the rest back until a technician resumes (which acknowledges it)
        canary_failed = any(n.state is NodeState.FAILED for n in canaries) and c.failures() > c.failures_ack
        canaries_done = all(n.state in TERMINAL for n in canaries) and not canary_failed
        pool = [n for n in c.nodes.values() if n.state is NodeState.PENDING and (n.canary or canaries_done)]
        pool.sort(key=lambda n: (not n.canary, n.device))
        return [n for n in pool if n.device in online][:room]

    async def check(self, c: Campaign, now: float) -> list[tuple[NodeRun, str]]:
        """Time out stuck nodes, then pause or complete the campaign; returns the nodes timed out."""
        timed_out = []
        for n in c.nodes.values():
            if n.state in IN_FLIGHT and n.deadline is not None and now >= n.deadline:
                what = {NodeState.SENT: "never started (no STARTED)",
                        NodeState.STARTED: "no progress", NodeState.IN_PROGRESS: "no progress",
                        NodeState.REBOOTING: "never confirmed the new firmware"}[n.state]
                reason = f"timeout: {what}"
                await self.transition(c, n, NodeState.FAILED, reason=reason)
                timed_out.append((n, reason))
        await self.evaluate(c)
        return timed_out

    async def evaluate(self, c: Campaign) -> None:
        if c.state is CampaignState.RUNNING:
            failed_canary = next((n for n in c.nodes.values() if n.canary and n.state is NodeState.FAILED), None)
            new_failures = c.failures() - c.failures_ack
            if failed_canary is not None and new_failures > 0:
                await self.set_state(c, CampaignState.PAUSED,
                                     f"canary {failed_canary.device} failed: {failed_canary.reason}")
            elif new_failures > c.max_failures:
                await self.set_state(c, CampaignState.PAUSED,
                                     f"{new_failures} failure(s) exceed the threshold of {c.max_failures}")
            elif all(n.state in TERMINAL for n in c.nodes.values()):
                await self.set_state(c, CampaignState.COMPLETED, None)
        elif c.state is CampaignState.ABORTED:
            self._close_if_done(c)
