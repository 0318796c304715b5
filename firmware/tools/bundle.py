"""Application-file bundles: OTA for MicroPython builds without OTA partitions.

A bundle is one download a node can stream to its filesystem without holding it in RAM::

    SWB1\\n
    {"project": "...", "version": "...", "files": [{"path": "...", "size": N, "sha256": "..."}]}\\n
    <file 1 bytes><file 2 bytes>...

The header is one JSON line; the file bodies follow in the order listed. The whole
bundle's SHA-256 is what the signed manifest carries; per-file hashes let the node check
each staged file again before it swaps the application directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SWB1\n"
MAX_HEADER = 8192
MAX_FILES = 64
_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}){0,3}$")


@dataclass(frozen=True, slots=True)
class BundleHeader:
    project: str
    version: str
    files: tuple[tuple[str, int, str], ...]
    body_offset: int


def make_bundle(root: Path, *, project: str, version: str, pattern: str = "**/*.py") -> bytes:
    files = sorted(p for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    entries, bodies = [], []
    for p in files:
        data = p.read_bytes()
        rel = p.relative_to(root).as_posix()
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        bodies.append(data)
    header = json.dumps({"project": project, "version": version, "files": entries}, separators=(",", ":"))
    return MAGIC + header.encode() + b"\n" + b"".join(bodies)


def read_bundle_header(data: bytes) -> BundleHeader:
    """Parse and fully check a bundle (paths, sizes, hashes); ValueError names the problem."""
    if not data.startswith(MAGIC):
        raise ValueError("not a Siteward file bundle (missing SWB1 magic)")
    nl = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if nl < 0:
        raise ValueError("bundle header line missing or longer than 8 KiB")
    try:
        hdr = json.loads(data[len(MAGIC):nl])
        project, version, files = str(hdr["project"]), str(hdr["version"]), hdr["files"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("bundle header is not the expected JSON object") from None
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise ValueError(f"bundle must list 1..{MAX_FILES} files")
    pos = nl + 1
    out = []
    for f in files:
        path, size, digest = f.get("path"), f.get("size"), f.get("sha256")
        if not isinstance(path, str) or not _PATH_RE.match(path) or ".." in path.split("/"):
            raise ValueError(f"bundle file path {path!r} is not allowed")
        if not isinstance(size, int) or size < 0 or pos + size > len(data):
            raise ValueError(f"bundle is truncated inside {path}")
        if hashlib.sha256(data[pos:pos + size]).hexdigest() != digest:
            raise ValueError(f"bundle file {path} does not match its SHA-256")
        out.append((path, size, str(digest)))
        pos += size
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} unexpected bytes after the last bundle file")
    return BundleHeader(project, version, tuple(out), nl + 1)
