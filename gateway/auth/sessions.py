"""Server-side browser sessions in ``web_sessions``.

The cookie carries 256 random bits; the table keeps only their SHA-256, so a copy of
the database (a backup, a pulled SD card) does not let anyone log in. A slow hash is
not needed: the value is random, not a guessable password. Each session has its own
CSRF token, which the page echoes on every state-changing request.

Expiry is absolute (``session_ttl_s`` after login), not sliding: a phone left logged in
on site does not stay logged in forever by being used now and then. The user's role
and enabled flag are read on every request, so demoting or disabling someone takes
effect at once.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit import Audit
from gateway.auth.principal import AuthMethod, Principal, Role
from gateway.store.database import Database

COOKIE_NAME = "siteward_session"
# a script logging in in a loop must not grow the table without bound
MAX_SESSIONS_PER_USER = 20


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class NewSession:
    cookie_value: str  # goes to the browser once; never stored
    csrf: str
    expires_at: float


class SessionStore:
    def __init__(self, db: Database, ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.clock = clock

    async def create(self, username: str, *, audit_detail: dict[str, object] | None = None) -> NewSession:
        """Start a session; the login is audited in the same transaction."""
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        expires = now + self.ttl_s

        def insert(conn: sqlite3.Connection) -> None:
            # expired rows are cleared here too, so the table stays small without a timer
            conn.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (now,))
            conn.execute(
                "DELETE FROM web_sessions WHERE username = ? AND id_hash NOT IN (SELECT id_hash FROM web_sessions"
                " WHERE username = ? ORDER BY created_at DESC LIMIT ?)",
                (username, username, MAX_SESSIONS_PER_USER - 1),
            )
            conn.execute(
                "INSERT INTO web_sessions (id_hash, username, csrf, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (digest(sid), username, csrf, now, expires),
            )
            Audit.insert(conn, username, "login", username, audit_detail)

        await self.db.write(insert)
        return NewSession(cookie_value=sid, csrf=csrf, expires_at=expires)

    async def resolve(self, cookie_value: str) -> Principal | None:
        if not cookie_value or len(cookie_value) > 128:
            return None
        row = await self.db.fetchone(
            "SELECT s.id_hash, s.username, s.csrf, s.expires_at, u.role FROM web_sessions s "
            "JOIN users u ON u.username = s.username WHERE s.id_hash = ? AND u.disabled = 0",
            (digest(cookie_value),),
        )
        if row is None or row["expires_at"] <= self.clock():
            return None
        return Principal(
            username=row["username"],
            role=Role(row["role"]),
            method=AuthMethod.SESSION,
            csrf=row["csrf"],
            session_id_hash=row["id_hash"],
            session_expires_at=row["expires_at"],
        )

    async def still_valid(self, principal: Principal) -> bool:
        """For long-lived connections (the live feed): is this session still on?"""
        if principal.session_id_hash is None:
            return False
        row = await self.db.fetchone(
            "SELECT s.expires_at FROM web_sessions s JOIN users u ON u.username = s.username "
            "WHERE s.id_hash = ? AND u.disabled = 0 AND u.role = ?",
            (principal.session_id_hash, principal.role.value),
        )
        return row is not None and row["expires_at"] > self.clock()

    async def end(self, principal: Principal, *, audit_detail: dict[str, object] | None = None) -> None:
        """Log out: the session row goes, with an audit entry."""
        id_hash = principal.session_id_hash

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,))
            Audit.insert(conn, principal.username, "logout", principal.username, audit_detail)

        await self.db.write(delete)

    async def purge_expired(self) -> int:
        now = self.clock()
        return await self.db.write(
            lambda conn: conn.execute("DELETE FROM web_sessions WHERE expires_at <= ?", (now,)).rowcount
        )
