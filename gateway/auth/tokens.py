"""Bearer API tokens for scripts and HTTP-only devices.

A token is ``swt_<id>_<secret>``: the id names it in lists and the audit trail, the
secret (256 random bits) is shown once at creation and stored only as its SHA-256.
A token acts as the user it belongs to, with that user's current role: disabling or
deleting the user stops every one of their tokens at once.

``last_used`` is written at most once a minute per token, so a device posting every
second through HTTP ingest does not add a database write per request.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from gateway.audit import Audit
from gateway.auth.errors import InvalidInput, NotFound
from gateway.auth.principal import AuthMethod, Principal, Role
from gateway.auth.sessions import digest
from gateway.store.database import Database
from gateway.store.filters import Where

PREFIX = "swt_"
_TOKEN_RE = re.compile(r"^swt_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_LAST_USED_EVERY_S = 60.0
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class TokenInfo(BaseModel):
    id: str
    username: str
    name: str
    created_at: float
    last_used: float | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class NewToken:
    info: TokenInfo
    token: str  # plaintext, returned once


def _row_to_info(row: sqlite3.Row) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        username=row["username"],
        name=row["name"],
        created_at=row["created_at"],
        last_used=row["last_used"],
        revoked_at=row["revoked_at"],
    )


class TokenStore:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._last_used_written: dict[str, float] = {}

    async def create(self, username: str, name: str, *, actor: str) -> NewToken:
        name = name.strip()
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise InvalidInput("token name must be 1-64 printable characters")
        token_id = "".join(secrets.choice(_ALNUM) for _ in range(12))
        token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = self.clock()

        def insert(conn: sqlite3.Connection) -> TokenInfo:
            if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone() is None:
                raise NotFound(f"no user {username!r}")
            conn.execute(
                "INSERT INTO api_tokens (id, token_hash, username, name, created_at) VALUES (?, ?, ?, ?, ?)",
                (token_id, digest(token), username, name, now),
            )
            Audit.insert(conn, actor, "token.create", username, {"token_id": token_id, "token_name": name})
            return TokenInfo(
                id=token_id, username=username, name=name, created_at=now, last_used=None, revoked_at=None
            )

        return NewToken(info=await self.db.write(insert), token=token)

    async def resolve(self, token: str) -> Principal | None:
        m = _TOKEN_RE.fullmatch(token.strip())
        if m is None:
            return None
        row = await self.db.fetchone(
            "SELECT t.id, t.username, u.role FROM api_tokens t JOIN users u ON u.username = t.username "
            "WHERE t.token_hash = ? AND t.revoked_at IS NULL AND u.disabled = 0",
            (digest(token.strip()),),
        )
        if row is None:
            return None
        await self._touch(row["id"])
        return Principal(
            username=row["username"], role=Role(row["role"]), method=AuthMethod.TOKEN, token_id=row["id"]
        )

    async def still_valid(self, principal: Principal) -> bool:
        row = await self.db.fetchone(
            "SELECT 1 FROM api_tokens t JOIN users u ON u.username = t.username "
            "WHERE t.id = ? AND t.revoked_at IS NULL AND u.disabled = 0 AND u.role = ?",
            (principal.token_id, principal.role.value),
        )
        return row is not None

    async def _touch(self, token_id: str) -> None:
        now = self.clock()
        if now - self._last_used_written.get(token_id, 0.0) < _LAST_USED_EVERY_S:
            return
        if len(self._last_used_written) > 10_000:
            self._last_used_written.clear()
        self._last_used_written[token_id] = now
        await self.db.write(
            lambda conn: conn.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))
        )

    async def get(self, token_id: str) -> TokenInfo | None:
        row = await self.db.fetchone("SELECT * FROM api_tokens WHERE id = ?", (token_id,))
        return _row_to_info(row) if row else None

    async def list_tokens(
        self, username: str | None = None, *, include_revoked: bool = False
    ) -> list[TokenInfo]:
        where = Where()
        where.given("username = ?", username)
        if not include_revoked:
            where.add("revoked_at IS NULL")
        rows = await self.db.fetchall("SELECT * FROM api_tokens" + where.sql() + " ORDER BY created_at", where.params)
        return [_row_to_info(r) for r in rows]

    async def revoke(self, token_id: str, *, actor: str) -> TokenInfo:
        now = self.clock()

        def update(conn: sqlite3.Connection) -> TokenInfo:
            row = conn.execute(
                "SELECT id, username, name, created_at, last_used, revoked_at FROM api_tokens WHERE id = ?",
                (token_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no token {token_id!r}")
            info = TokenInfo(
                id=row[0],
                username=row[1],
                name=row[2],
                created_at=row[3],
                last_used=row[4],
                revoked_at=row[5],
            )
            if info.revoked_at is not None:
                return info
            conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
            Audit.insert(conn, actor, "token.revoke", info.username, {"token_id": token_id})
            return info.model_copy(update={"revoked_at": now})

        return await self.db.write(update)
