"""What BLE must remember across restarts: adopted and ignored sensors, their bindkeys,
and the last accepted counter of each encrypted sensor.

Owns the ``ble_sensors`` and ``ble_replay`` tables (migration "BLE sensors"). Bindkeys are
secrets: they are sealed with AES-GCM under a key kept in a 0600 file in the data
directory, so a copy of the database (a support bundle, a backup) does not carry them in
the clear, and they never appear in logs, events or the audit trail.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway.ble.const import BINDKEY_FILE
from gateway.store.database import Database

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = structlog.get_logger(__name__)

_NONCE = 12


@dataclass(slots=True)
class SensorRecord:
    address: str
    state: str  # "adopted" | "ignored"
    family: str | None = None
    model: str | None = None
    bindkey: bytes | None = None


class Sealer:
    """Seals bindkeys with a per-gateway key that only the gateway's user can read.

    The cipher (cryptography, ~8 MB of RSS) is made when a bindkey is first sealed or
    opened: a gateway without encrypted sensors never needs it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None
        self._cipher: AESGCM | None = None

    def load(self) -> None:
        """Read the key, creating it (0600, exclusively) on first use. Blocking: run in a thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = self.path.read_bytes()
        else:
            key = secrets.token_bytes(32)  # what AESGCM.generate_key(bit_length=256) returns
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
        if len(key) != 32:
            raise RuntimeError(f"{self.path}: not a 256-bit key; refusing to guess")
        self._key = key

    def _aead(self) -> AESGCM:
        if self._cipher is None:
            assert self._key is not None, "Sealer.load() first"
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._cipher = AESGCM(self._key)
        return self._cipher

    def seal(self, address: str, bindkey: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        # the address as associated data: a sealed key moved to another row does not open
        return nonce + self._aead().encrypt(nonce, bindkey, address.encode())

    def open(self, address: str, sealed: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead().decrypt(sealed[:_NONCE], sealed[_NONCE:], address.encode())
        except (InvalidTag, ValueError):
            return None


class BleStore:
    def __init__(self, db: Database, data_dir: Path) -> None:
        self._db = db
        self.sealer = Sealer(data_dir / BINDKEY_FILE)

    async def load(self) -> tuple[dict[str, SensorRecord], dict[tuple[str, str], int]]:
        await asyncio.to_thread(self.sealer.load)
        records: dict[str, SensorRecord] = {}
        for r in await self._db.fetchall("SELECT address, state, family, model, bindkey FROM ble_sensors"):
            key = None
            if r["bindkey"] is not None:
                key = self.sealer.open(r["address"], bytes(r["bindkey"]))
                if key is None:
                    log.error("ble.bindkey_unreadable", address=r["address"],
                              hint="the bindkey file was replaced; enter the sensor's bindkey again")
            records[r["address"]] = SensorRecord(r["address"], r["state"], r["family"], r["model"], key)
        counters = {(r["address"], r["family"]): int(r["counter"])
                    for r in await self._db.fetchall("SELECT address, family, counter FROM ble_replay")}
        return records, counters

    async def save(self, rec: SensorRecord, *, reset_counters: bool = False) -> None:
        sealed = self.sealer.seal(rec.address, rec.bindkey) if rec.bindkey else None
        now = time.time()

        def write(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO ble_sensors (address, state, family, model, bindkey, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET state = excluded.state,"
                " family = excluded.family, model = excluded.model, bindkey = excluded.bindkey,"
                " updated_at = excluded.updated_at",
                (rec.address, rec.state, rec.family, rec.model, sealed, now))
            if reset_counters:
                c.execute("DELETE FROM ble_replay WHERE address = ?", (rec.address,))

        await self._db.write(write)

    async def save_counters(self, counters: dict[tuple[str, str], int]) -> None:
        if not counters:
            return
        now = time.time()
        rows = [(a, f, c, now) for (a, f), c in counters.items()]
        await self._db.write(lambda c: c.executemany(
            "INSERT INTO ble_replay (address, family, counter, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (address, family) DO UPDATE SET counter = excluded.counter,"
            " updated_at = excluded.updated_at", rows))
