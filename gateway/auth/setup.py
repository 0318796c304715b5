"""First start: the first admin, never a default password.

At start, :func:`ensure_first_admin` runs once. If no user exists yet:

* ``[web] admin_password_hash`` (an argon2 hash, the form an installer should put on
  the boot partition) or ``[web] admin_password`` / ``SITEWARD_WEB__ADMIN_PASSWORD``
  creates the user ``admin`` from it;
* otherwise a one-time setup code is made, shown on the console by the caller, and
  ``POST /setup`` exchanges it for the first admin with a password of the user's
  choosing. Until then the API answers 503 ``setup_required``.

The code is random (about 59 bits, typed from a console, so no look-alike characters)
and stored only as its SHA-256 in the ``meta`` table. Using it, checking that there is
still no user and creating the admin happen in one transaction, so two browsers racing
through setup cannot both win. A restart before setup replaces the code with a new
one (the old plaintext is gone), so the console always shows the code that works.
"""

from __future__ import annotations

import hmac
import secrets
import sqlite3
import time
from typing import TYPE_CHECKING

import structlog

from gateway.audit import Audit
from gateway.auth.errors import Conflict, InvalidInput, SetupError
from gateway.auth.passwords import PasswordPolicyError, Passwords, check_policy, is_argon2_hash
from gateway.auth.principal import Role
from gateway.auth.sessions import digest
from gateway.auth.users import User, UserStore, normalise_username
from gateway.store.database import Database

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

META_KEY = "web.setup_code_sha256"
FIRST_ADMIN = "admin"
SYSTEM_ACTOR = "system"
_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
_GROUPS, _GROUP_LEN = 3, 4


class WrongSetupCode(InvalidInput):
    status = 403
    code = "wrong_setup_code"


def new_setup_code() -> str:
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(_GROUPS * _GROUP_LEN))
    return "-".join(chars[i : i + _GROUP_LEN] for i in range(0, len(chars), _GROUP_LEN))


def _normalise_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch not in "- \t")


async def setup_required(db: Database) -> bool:
    return await db.fetchone("SELECT 1 FROM users LIMIT 1") is None


async def ensure_first_admin(gw: Gateway) -> str | None:
    """Create the first admin from the configuration, or make a setup code.

    Returns the setup code (to print on the console) if one was made, else None.
    Raises :class:`SetupError` for an unusable configured password or hash: starting
    without any way in would be worse than not starting.
    """
    db: Database = gw.db
    web = gw.settings.web
    passwords = Passwords()
    users = UserStore(db, passwords)
    configured = web.admin_password_hash is not None or web.admin_password is not None

    if not await setup_required(db):
        await _clear_code(db)
        if configured:
            log.info("web.first_admin_config_ignored", reason="users already exist")
        return None

    if web.admin_password_hash is not None:
        if web.admin_password is not None:
            log.warning("web.admin_password_ignored", reason="admin_password_hash is set too; the hash wins")
        if not is_argon2_hash(web.admin_password_hash):
            raise SetupError(
                "web.admin_password_hash is not an argon2 hash "
                "(make one with: python -m gateway.auth.passwords)"
            )
        password_hash = web.admin_password_hash
        source = "config_hash"
    elif web.admin_password is not None:
        plain = web.admin_password.get_secret_value()
        try:
            check_policy(plain, username=FIRST_ADMIN)
        except PasswordPolicyError as exc:
            raise SetupError(f"web.admin_password: {exc}") from None
        password_hash = await passwords.hash(plain)
        source = "config_password"
    else:
        code = new_setup_code()
        await db.write(
            lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (META_KEY, digest(_normalise_code(code))),
            )
        )
        log.warning(
            "web.setup_required", hint="open /setup in a browser and enter the setup code from the console"
        )
        return code

    try:
        await users.create_with_hash(
            FIRST_ADMIN,
            password_hash,
            Role.ADMIN,
            actor=SYSTEM_ACTOR,
            audit_detail={"source": source},
            only_if_no_users=True,
        )
    except Conflict:
        return None  # someone else created a user meanwhile: nothing to do
    await _clear_code(db)
    log.info("web.first_admin_created", username=FIRST_ADMIN, source=source)
    return None


async def _clear_code(db: Database) -> None:
    await db.write(lambda conn: conn.execute("DELETE FROM meta WHERE key = ?", (META_KEY,)))


async def complete_setup(
    db: Database, passwords: Passwords, *, code: str, username: str, password: str, address: str
) -> User:
    """Exchange the setup code for the first admin account."""
    name = normalise_username(username)
    try:
        check_policy(password, username=name)
    except PasswordPolicyError as exc:
        raise InvalidInput(str(exc)) from None
    if not await setup_required(db):
        raise SetupError("setup is already done")
    # hashed before the transaction: argon2 on the writer thread would stall every write
    password_hash = await passwords.hash(password)
    offered = digest(_normalise_code(code))
    now = time.time()

    def consume(conn: sqlite3.Connection) -> User:
        if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
            raise SetupError("setup is already done")
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_KEY,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], offered):
            raise WrongSetupCode("wrong setup code")
        conn.execute(
            "INSERT INTO users (username, password_hash, role, created_at, disabled) VALUES (?, ?, ?, ?, 0)",
            (name, password_hash, Role.ADMIN.value, now),
        )
        conn.execute("DELETE FROM meta WHERE key = ?", (META_KEY,))
        Audit.insert(conn, name, "setup.complete", name, {"role": Role.ADMIN.value, "address": address})
        return User(username=name, role=Role.ADMIN, created_at=now, disabled=False)

    return await db.write(consume)
