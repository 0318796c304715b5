"""Local users: admin / technician / viewer, argon2 password hashes in ``users``.

Every change is written together with its audit entry in one transaction. Whatever the
order of requests, the gateway always keeps at least one enabled admin: the last one
can be neither demoted, disabled nor deleted (that would lock the site out for good,
with no recovery short of re-flashing).
"""

from __future__ import annotations

import re
import sqlite3
import time

from pydantic import BaseModel

from gateway.audit import Audit
from gateway.auth.errors import Conflict, InvalidInput, LastAdmin, NotFound
from gateway.auth.passwords import PasswordPolicyError, Passwords, check_policy
from gateway.auth.principal import Role
from gateway.store.database import Database

USERNAME_PATTERN = r"^[a-z0-9][a-z0-9_.@-]{0,63}$"
_USERNAME_RE = re.compile(USERNAME_PATTERN)


class User(BaseModel):
    username: str
    role: Role
    created_at: float
    disabled: bool


def normalise_username(username: str) -> str:
    """User names are case-insensitive: ``Admin`` and ``admin`` are one account."""
    name = username.strip().lower()
    if not _USERNAME_RE.fullmatch(name):
        raise InvalidInput("user name must be 1-64 characters: letters, digits, '_', '.', '@', '-'")
    return name


def _row_to_user(row: sqlite3.Row | tuple) -> User:
    return User(username=row[0], role=Role(row[1]), created_at=row[2], disabled=bool(row[3]))


def _enabled_admins_except(conn: sqlite3.Connection, username: str) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0 AND username != ?",
            (username,),
        ).fetchone()[0]
    )


def _drop_credentials(conn: sqlite3.Connection, username: str, *, keep_session: str | None = None) -> None:
    # a disabled, deleted or re-passworded account must not stay logged in anywhere
    conn.execute("DELETE FROM web_sessions WHERE username = ? AND id_hash IS NOT ?", (username, keep_session))


class UserStore:
    def __init__(self, db: Database, passwords: Passwords) -> None:
        self.db = db
        self.passwords = passwords

    # -- reading ------------------------------------------------------------------------
    async def count(self) -> int:
        row = await self.db.fetchone("SELECT count(*) FROM users")
        return int(row[0]) if row else 0

    async def get(self, username: str) -> User | None:
        row = await self.db.fetchone(
            "SELECT username, role, created_at, disabled FROM users WHERE username = ?",
            (username.strip().lower(),),
        )
        return _row_to_user(row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self.db.fetchall(
            "SELECT username, role, created_at, disabled FROM users ORDER BY username"
        )
        return [_row_to_user(r) for r in rows]

    async def authenticate(self, username: str, password: str) -> User | None:
        """The user if the password is right and the account enabled, else None.

        Takes as long for an unknown user as for a wrong password. A hash made with
        weaker parameters than today's is upgraded on the way.
        """
        try:
            name = normalise_username(username)
        except InvalidInput:
            name = None
        row = None
        if name is not None:
            row = await self.db.fetchone(
                "SELECT username, role, created_at, disabled, password_hash FROM users WHERE username = ?",
                (name,),
            )
        ok, new_hash = await self.passwords.verify(row["password_hash"] if row else None, password)
        if not ok or row is None or row["disabled"]:
            return None
        if new_hash is not None:
            old_hash = row["password_hash"]

            def rehash(conn: sqlite3.Connection) -> None:
                # only if nobody changed the password meanwhile
                conn.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                    (new_hash, row["username"], old_hash),
                )

            await self.db.write(rehash)
        return _row_to_user(row)

    # -- changing -----------------------------------------------------------------------
    async def create(
        self,
        username: str,
        password: str,
        role: Role | str,
        *,
        actor: str,
        audit_detail: dict[str, object] | None = None,
    ) -> User:
        name = normalise_username(username)
        role = _role(role)
        try:
            check_policy(password, username=name)
        except PasswordPolicyError as exc:
            raise InvalidInput(str(exc)) from None
        return await self.create_with_hash(
            name, await self.passwords.hash(password), role, actor=actor, audit_detail=audit_detail
        )

    async def create_with_hash(
        self,
        username: str,
        password_hash: str,
        role: Role | str,
        *,
        actor: str,
        audit_detail: dict[str, object] | None = None,
        only_if_no_users: bool = False,
    ) -> User:
        name = normalise_username(username)
        role = _role(role)
        now = time.time()

        def insert(conn: sqlite3.Connection) -> User:
            if only_if_no_users and conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                raise Conflict("a user already exists")
            try:
                conn.execute(
                    "INSERT INTO users (username, password_hash, role, created_at, disabled) "
                    "VALUES (?, ?, ?, ?, 0)",
                    (name, password_hash, role.value, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"user {name!r} already exists") from None
            Audit.insert(conn, actor, "user.create", name, {"role": role.value, **(audit_detail or {})})
            return User(username=name, role=role, created_at=now, disabled=False)

        return await self.db.write(insert)

    async def update(
        self, username: str, *, actor: str, role: Role | str | None = None, disabled: bool | None = None
    ) -> User:
        name = username.strip().lower()
        new_role = _role(role) if role is not None else None

        def change(conn: sqlite3.Connection) -> User:
            row = conn.execute(
                "SELECT username, role, created_at, disabled FROM users WHERE username = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no user {name!r}")
            user = _row_to_user(row)
            after_role = new_role or user.role
            after_disabled = user.disabled if disabled is None else disabled
            loses_admin = (
                user.role is Role.ADMIN
                and not user.disabled
                and (after_role is not Role.ADMIN or after_disabled)
            )
            if loses_admin and _enabled_admins_except(conn, name) == 0:
                raise LastAdmin("the last enabled admin cannot be demoted or disabled")
            changes: dict[str, object] = {}
            if after_role is not user.role:
                changes["role"] = {"from": user.role.value, "to": after_role.value}
            if after_disabled != user.disabled:
                changes["disabled"] = after_disabled
            if not changes:
                return user
            conn.execute(
                "UPDATE users SET role = ?, disabled = ? WHERE username = ?",
                (after_role.value, int(after_disabled), name),
            )
            if after_disabled:
                _drop_credentials(conn, name)
            Audit.insert(conn, actor, "user.update", name, changes)
            return User(username=name, role=after_role, created_at=user.created_at, disabled=after_disabled)

        return await self.db.write(change)

    async def set_password(
        self, username: str, password: str, *, actor: str, keep_session: str | None = None
    ) -> None:
        """Set a new password and end every other session of that user."""
        name = username.strip().lower()
        try:
            check_policy(password, username=name)
        except PasswordPolicyError as exc:
            raise InvalidInput(str(exc)) from None
        new_hash = await self.passwords.hash(password)

        def change(conn: sqlite3.Connection) -> None:
            cur = conn.execute("UPDATE users SET password_hash = ? WHERE username = ?", (new_hash, name))
            if cur.rowcount == 0:
                raise NotFound(f"no user {name!r}")
            _drop_credentials(conn, name, keep_session=keep_session)
            Audit.insert(conn, actor, "user.password", name, {"self": actor == name})

        await self.db.write(change)

    async def delete(self, username: str, *, actor: str) -> None:
        name = username.strip().lower()

        def remove(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT role, disabled FROM users WHERE username = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no user {name!r}")
            if row[0] == Role.ADMIN.value and not row[1] and _enabled_admins_except(conn, name) == 0:
                raise LastAdmin("the last enabled admin cannot be deleted")
            conn.execute("DELETE FROM users WHERE username = ?", (name,))
            _drop_credentials(conn, name)
            # tokens are revoked, not deleted: the audit trail keeps naming them
            conn.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE username = ? AND revoked_at IS NULL",
                (time.time(), name),
            )
            Audit.insert(conn, actor, "user.delete", name, {"role": row[0]})

        await self.db.write(remove)


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidInput(f"role must be one of {', '.join(r.value for r in Role)}") from None
