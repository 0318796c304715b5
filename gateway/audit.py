"""The audit trail: who changed what, when.

Every change made through the web API (logins, user and device changes, credentials,
commands) is recorded here, in the same SQLite file as the data it describes, so the
trail survives restarts and is committed together with the gateway's other writes.

Secrets must never reach the trail: callers pass only what identifies a change, and
:func:`scrub` removes anything that looks like a secret anyway, because one careless
``detail=body.model_dump()`` would otherwise keep a password forever.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

import structlog
from pydantic import BaseModel

from gateway.store.database import Database
from gateway.store.filters import Where

log = structlog.get_logger(__name__)

# Matched against lower-cased key names anywhere in a detail dict.
_SECRET_MARKERS = (
    "password",
    "passwd",
    "secret",
    "token",
    "csrf",
    "cookie",
    "authorization",
    "hash",
    "bindkey",
    "private",
    "setup_code",
    "code",
)
# Whole keys that contain a marker yet name no secret.
_ALLOWED_KEYS = frozenset({"token_id", "token_name", "country_code", "status_code"})
REDACTED = "[redacted]"
_MAX_DETAIL_CHARS = 8192


class AuditEntry(BaseModel):
    id: int
    ts: float
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any]


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    if k in _ALLOWED_KEYS:
        return False
    return any(marker in k for marker in _SECRET_MARKERS)


def scrub(value: Any) -> Any:
    """Return ``value`` with every secret-looking key's value replaced by ``[redacted]``."""
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if _is_secret_key(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class Audit:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self, actor: str, action: str, target: str | None = None, detail: Mapping[str, Any] | None = None
    ) -> int:
        """Append one entry once it is committed; returns its id."""
        entry_id = await self.db.write(lambda conn: self.insert(conn, actor, action, target, detail))
        return entry_id

    @staticmethod
    def insert(
        conn: sqlite3.Connection,
        actor: str,
        action: str,
        target: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Write one entry inside the caller's transaction (on the writer thread).

        Stores that change something use this from their own ``db.write`` function so the
        change and its audit entry commit together or not at all.
        """
        text = json.dumps(scrub(detail or {}), separators=(",", ":"), sort_keys=True)
        if len(text) > _MAX_DETAIL_CHARS:
            # detail can carry user input (device names, command args): keep rows bounded
            text = json.dumps({"truncated": True, "chars": len(text)})
        cur = conn.execute(
            "INSERT INTO audit (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, text),
        )
        log.info("audit", actor=actor, action=action, target=target)
        return int(cur.lastrowid or 0)

    async def query(
        self,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        limit: int = 200,
        *,
        target: str | None = None,
        until: float | None = None,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """Newest first. ``action`` ending in ``.*`` matches a family (``user.*``);
        ``before_id`` pages backwards through a long trail."""
        where = Where()
        where.given("actor = ?", actor)
        if action is not None:
            if action.endswith(".*"):
                family = action[:-2]
                where.add(
                    "(action = ? OR action LIKE ? ESCAPE '\\')",
                    family,
                    family.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ".%",
                )
            else:
                where.add("action = ?", action)
        where.given("target = ?", target)
        where.given("ts >= ?", since)
        where.given("ts < ?", until)
        where.given("id < ?", before_id)
        sql = "SELECT id, ts, actor, action, target, detail FROM audit" + where.sql() + " ORDER BY id DESC LIMIT ?"
        rows = await self.db.fetchall(sql, [*where.params, max(1, min(int(limit), 10_000))])
        out = []
        for r in rows:
            try:
                detail = json.loads(r["detail"])
            except ValueError:
                detail = {"unreadable": True}
            out.append(
                AuditEntry(
                    id=r["id"],
                    ts=r["ts"],
                    actor=r["actor"],
                    action=r["action"],
                    target=r["target"],
                    detail=detail if isinstance(detail, dict) else {},
                )
            )
        return out
