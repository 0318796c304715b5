"""The firmware registry: every image the gateway will serve, checked before it is accepted.

Owns ``ota_firmware`` and the image files under ``<data_dir>/firmware/``. An upload is
refused with a precise reason unless it is a complete ESP32 app image (or a Siteward
file bundle); a version is registered once (one project+version, one content), and can
be blocked so that no campaign rolls it out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from firmware.tools.bundle import read_bundle_header
from firmware.tools.image import ImageRejected, validate_app_image
from firmware.tools.manifest import VERSION_PATTERN
from gateway.store.database import Database


class FirmwareRefused(ValueError):
    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Firmware(BaseModel):
    sha256: str
    kind: Literal["app", "files"]
    project: str
    version: str
    chip: str | None
    size: int
    filename: str | None
    info: dict[str, Any]
    presigned: bool
    source: str
    uploaded_by: str
    created_at: float
    blocked: bool
    blocked_reason: str | None


_COLS = ("sha256, kind, project, version, chip, size, filename, info, envelope, source, uploaded_by, created_at,"
         " blocked, blocked_reason")


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Firmware:
    return Firmware(sha256=r[0], kind=r[1], project=r[2], version=r[3], chip=r[4], size=r[5], filename=r[6],
                    info=json.loads(r[7]), presigned=r[8] is not None, source=r[9], uploaded_by=r[10],
                    created_at=r[11], blocked=bool(r[12]), blocked_reason=r[13])


def inspect(data: bytes, *, max_bytes: int) -> tuple[Literal["app", "files"], str, str, str | None, dict[str, Any]]:
    """(kind, project, version, chip, info) of an upload, or FirmwareRefused with the reason."""
    import re

    if len(data) > max_bytes:
        raise FirmwareRefused("too_large", f"{len(data)} bytes exceeds the {max_bytes} byte limit", 413)
    if data.startswith(b"SWB1\n"):
        try:
            hdr = read_bundle_header(data)
        except ValueError as exc:
            raise FirmwareRefused("bad_bundle", str(exc)) from None
        kind: Literal["app", "files"] = "files"
        project, version, chip = hdr.project, hdr.version, None
        info: dict[str, Any] = {"files": [{"path": p, "size": s} for p, s, _ in hdr.files]}
    else:
        try:
            img = validate_app_image(data)
        except ImageRejected as exc:
            raise FirmwareRefused(exc.code, exc.message) from None
        kind = "app"
        project, version, chip = img.project or "", img.version or "", img.chip
        info = img.summary()
    if not project:
        raise FirmwareRefused("no_project", "the image names no project (app description project_name)")
    if not re.match(VERSION_PATTERN, version):
        raise FirmwareRefused("bad_version",
                              f"version {version!r} is not dotted numbers (e.g. 1.4.2): nodes could not order it")
    return kind, project, version, chip, info


class FirmwareRegistry:
    def __init__(self, db: Database, directory: Path, *, max_bytes: int) -> None:
        self._db = db
        self.dir = directory
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.bin"

    async def add(self, data: bytes, *, filename: str | None, actor: str, source: str = "upload",
                  envelope: str | None = None, expect: tuple[str, str] | None = None) -> tuple[Firmware, bool]:
        """Check and store an image; returns (firmware, created). Same content again is not an error."""
        import hashlib

        kind, project, version, chip, info = await asyncio.to_thread(inspect, data, max_bytes=self.max_bytes)
        if expect is not None and expect != (project, version):
            raise FirmwareRefused("manifest_mismatch",
                                  f"image is {project} {version}, the manifest says {expect[0]} {expect[1]}")
        sha = hashlib.sha256(data).hexdigest()
        existing = await self.get(sha)
        if existing is not None:
            return existing, False
        same = await self._db.fetchone("SELECT sha256 FROM ota_firmware WHERE project = ? AND version = ?",
                                       (project, version))
        if same is not None:
            raise FirmwareRefused("version_exists",
                                  f"{project} {version} is already registered with different content "
                                  f"({same[0][:12]}…): give the new build a new version", 409)
        await asyncio.to_thread(self._write_file, sha, data)
        now = time.time()
        await self._db.write(lambda c: c.execute(
            f"INSERT INTO ota_firmware ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)",
            (sha, kind, project, version, chip, len(data), filename, json.dumps(info), envelope, source, actor, now)))
        fw = await self.get(sha)
        assert fw is not None
        return fw, True

    def _write_file(self, sha: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{sha}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(sha))

    async def get(self, sha256: str) -> Firmware | None:
        r = await self._db.fetchone(f"SELECT {_COLS} FROM ota_firmware WHERE sha256 = ?", (sha256,))
        return _row(r) if r is not None else None

    async def find(self, ref: str) -> Firmware | None:
        """By full sha256, a unique sha256 prefix of 8+ characters, or 'project@version'."""
        if "@" in ref:
            project, _, version = ref.partition("@")
            r = await self._db.fetchone(f"SELECT {_COLS} FROM ota_firmware WHERE project = ? AND version = ?",
                                        (project, version))
            return _row(r) if r is not None else None
        if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
            rows = await self._db.fetchall(f"SELECT {_COLS} FROM ota_firmware WHERE sha256 LIKE ?", (ref + "%",))
            return _row(rows[0]) if len(rows) == 1 else None
        return None

    async def envelope(self, sha256: str) -> str | None:
        r = await self._db.fetchone("SELECT envelope FROM ota_firmware WHERE sha256 = ?", (sha256,))
        return r[0] if r is not None else None

    async def list(self) -> list[Firmware]:
        rows = await self._db.fetchall(f"SELECT {_COLS} FROM ota_firmware ORDER BY created_at DESC")
        return [_row(r) for r in rows]

    async def set_blocked(self, sha256: str, blocked: bool, reason: str | None) -> Firmware | None:
        await self._db.write(lambda c: c.execute(
            "UPDATE ota_firmware SET blocked = ?, blocked_reason = ? WHERE sha256 = ?",
            (int(blocked), reason if blocked else None, sha256)))
        return await self.get(sha256)

    async def blocked_versions(self, project: str) -> set[str]:
        rows = await self._db.fetchall("SELECT version FROM ota_firmware WHERE project = ? AND blocked = 1",
                                       (project,))
        return {r[0] for r in rows}
