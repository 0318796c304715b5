"""Per-device MQTT credentials: minted at adoption or provisioning, revocable.

Owns ``device_credentials``. Device secrets are 144-bit random tokens, never chosen by a
person, so a single SHA-256 is enough to make the stored hash useless to a thief
(brute force is out of reach whatever the hash speed); a slow password hash such as
argon2 is for human passwords and would cost ~50 ms of CPU and 64 MiB per CONNECT,
which a site of a hundred nodes reconnecting after a power cut cannot afford.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.store.database import Database


@dataclass(frozen=True, slots=True)
class DeviceLogin:
    device_id: str
    profiles: tuple[str, ...]


def _hash(secret: str) -> str:
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


class Credentials:
    def __init__(self, db: Database) -> None:
        self._db = db
        # username -> (hash, profiles, revoked); small (one row per device) and read on every CONNECT
        self._cache: dict[str, tuple[str, tuple[str, ...], bool]] = {}
        self.on_revoke: Callable[[str], Awaitable[None]] | None = None

    async def load(self) -> None:
        rows = await self._db.fetchall(
            "SELECT username, password_hash, profiles, revoked_at FROM device_credentials")
        self._cache = {r[0]: (r[1], tuple(json.loads(r[2])), r[3] is not None) for r in rows}

    async def refresh(self) -> None:
        """Pick up changes made by another process (``siteward device add/revoke``)."""
        before = self._cache
        await self.load()
        for user, (_, _, revoked) in self._cache.items():
            was = before.get(user)
            if revoked and was is not None and not was[2] and self.on_revoke is not None:
                await self.on_revoke(user)

    async def verify_fresh(self, username: str | None, password: str | None) -> DeviceLogin | None:
        """``verify``, re-reading the row once on a miss: it may have just been minted by the CLI."""
        login = self.verify(username, password)
        if login is None and username:
            row = await self._db.fetchone(
                "SELECT password_hash, profiles, revoked_at FROM device_credentials WHERE username = ?",
                (username,))
            if row is not None:
                self._cache[username] = (row[0], tuple(json.loads(row[1])), row[2] is not None)
                login = self.verify(username, password)
        return login

    async def mint(self, device_id: str, profiles: tuple[str, ...] | list[str] = ("native",)) -> str:
        """Create (or replace) the device's credentials; the plaintext is returned once."""
        secret = secrets.token_urlsafe(18)
        h = _hash(secret)
        profs = tuple(profiles) or ("native",)
        now = time.time()
        await self._db.write(lambda c: c.execute(
            "INSERT INTO device_credentials (device_id, username, password_hash, profiles, created_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(device_id) DO UPDATE SET password_hash=excluded.password_hash,"
            " profiles=excluded.profiles, created_at=excluded.created_at, revoked_at=NULL",
            (device_id, device_id, h, json.dumps(list(profs)), now)))
        self._cache[device_id] = (h, profs, False)
        return secret

    async def revoke(self, device_id: str) -> bool:
        if device_id not in self._cache:
            return False
        await self._db.write(lambda c: c.execute(
            "UPDATE device_credentials SET revoked_at = ? WHERE device_id = ?", (time.time(), device_id)))
        h, profs, _ = self._cache[device_id]
        self._cache[device_id] = (h, profs, True)
        if self.on_revoke is not None:
            await self.on_revoke(device_id)
        return True

    def verify(self, username: str | None, password: str | None) -> DeviceLogin | None:
        if not username or password is None:
            return None
        entry = self._cache.get(username)
        if entry is None or entry[2]:
            # compare anyway so an unknown user costs the same as a wrong password
            hmac.compare_digest(_hash(password), _hash(""))
            return None
        if not hmac.compare_digest(entry[0], _hash(password)):
            return None
        return DeviceLogin(username, entry[1])

    def has(self, device_id: str) -> bool:
        e = self._cache.get(device_id)
        return e is not None and not e[2]

    def list(self) -> list[dict[str, object]]:
        return [{"device": u, "profiles": list(p), "revoked": r} for u, (_, p, r) in sorted(self._cache.items())]
