"""OTA manifests: what a node may install, signed with Ed25519.

What travels on ``devices/{id}/ota`` is an *envelope*::

    {"manifest": "<manifest JSON text>", "sig": "<base64 Ed25519 signature of that text>",
     "key": "<key id>", "url": "<where to download>", "campaign": "<id>"}

The signature covers the manifest *text* exactly as sent, so a node verifies the bytes it
received and only then parses them: no canonical-JSON rules to get wrong on two platforms.
``url`` and ``campaign`` are outside the signature on purpose: they are transport details
(the gateway's address, a download token) and changing them can at worst make a download
fail, because size and SHA-256 of the image are signed.

Manifest fields (docs/firmware.md has the full table)::

    v        1
    type     "app" (an ESP-IDF app image for the inactive OTA partition) | "files" (an
             application-file bundle for builds without OTA partitions)
    project  the firmware's project name: a node refuses another project's firmware
    version  dotted numbers; a node refuses anything not newer than what it runs
    size     bytes, sha256  hex digest of the download
    chip     "esp32", "esp32s3", ... (type app)
    device   optional: only this node may install it (gateway-signed manifests always set it)
    issued   unix seconds when signed
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# cryptography is imported by the functions that sign, verify or load keys: the gateway
# imports this module for the manifest models, and loading cryptography costs its process
# ~8 MB of RSS, which it should pay only once it signs or verifies something.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION_PATTERN = r"^\d{1,5}(\.\d{1,5}){0,3}([-+][0-9A-Za-z.-]{1,32})?$"
_VERSION_RE = re.compile(VERSION_PATTERN)
MAX_ENVELOPE_BYTES = 4096


class ManifestError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    type: Literal["app", "files"] = "app"
    project: str = Field(min_length=1, max_length=31, pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(pattern=VERSION_PATTERN, max_length=31)
    size: int = Field(gt=0, le=16 * 1024 * 1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chip: str | None = Field(default=None, max_length=16)
    device: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    issued: int = Field(ge=0)

    def text(self) -> str:
        # sorted keys and no spaces: stable bytes for the same content (only for
        # readability and caching: nodes verify whatever text they are given)
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(max_length=2048)
    sig: str = Field(max_length=128)
    key: str | None = Field(default=None, max_length=32)
    url: str | None = Field(default=None, max_length=1024)
    campaign: str | None = Field(default=None, max_length=64)


def version_tuple(v: str) -> tuple[int, ...]:
    """Numeric part of a version for ordering ("1.10.0-rc1" -> (1, 10, 0))."""
    if not _VERSION_RE.match(v):
        raise ValueError(f"not a version: {v!r}")
    core = re.split(r"[-+]", v, maxsplit=1)[0]
    return tuple(int(p) for p in core.split("."))


def is_newer(candidate: str, current: str | None) -> bool:
    if not current:
        return True
    try:
        return version_tuple(candidate) > version_tuple(current)
    except ValueError:
        return True  # a node reporting an unparsable version can only move forward


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_b64(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def load_public_b64(text: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ManifestError("bad_key", f"not a base64 Ed25519 public key: {exc}") from None


def check_key_file(path: Path) -> bool:
    """Whether the signing key file exists; PermissionError if others can read it.

    The cheap part of :func:`load_or_create_key` (no cryptography), for a check at start.
    """
    if not path.exists():
        return False
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    return True


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The gateway's signing key: PKCS#8 PEM, created 0600 on first use, refused if others can read it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if check_key_file(path):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # the gateway makes its key on first use, so `siteward node provision` may make it at the
    # same moment: a private temporary file, then an exclusive link, so the first key made
    # is the only one, and the other process reads it instead of replacing it
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.link(tmp, path)
    except FileExistsError:
        return load_or_create_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def sign(manifest: Manifest, key: Ed25519PrivateKey, *, url: str | None = None,
         campaign: str | None = None) -> Envelope:
    text = manifest.text()
    sig = base64.b64encode(key.sign(text.encode())).decode()
    return Envelope(manifest=text, sig=sig, key=key_id(key.public_key()), url=url, campaign=campaign)


def verify(envelope: Envelope, keys: list[Ed25519PublicKey]) -> Manifest:
    """The manifest, if one of ``keys`` signed it; ManifestError otherwise."""
    from cryptography.exceptions import InvalidSignature

    try:
        sig = base64.b64decode(envelope.sig, validate=True)
    except ValueError:
        raise ManifestError("bad_signature", "signature is not base64") from None
    data = envelope.manifest.encode()
    for k in keys:
        try:
            k.verify(sig, data)
            break
        except InvalidSignature:
            continue
    else:
        raise ManifestError("bad_signature", "manifest signature does not verify with any trusted key")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ManifestError("bad_manifest",
                            f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def new_manifest(*, project: str, version: str, data: bytes, type: Literal["app", "files"] = "app",
                 chip: str | None = None, device: str | None = None) -> Manifest:
    return Manifest(type=type, project=project, version=version, size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(), chip=chip, device=device, issued=int(time.time()))


def main(argv: list[str] | None = None) -> int:
    """``python -m firmware.tools.manifest sign|verify|keygen``: for release pipelines."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m firmware.tools.manifest")
    sub = p.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="create an Ed25519 signing key (0600) and print its public key")
    kg.add_argument("key", type=Path)
    sg = sub.add_parser("sign", help="sign a manifest for an image; prints the envelope JSON")
    sg.add_argument("--key", type=Path, required=True)
    sg.add_argument("--image", type=Path, required=True)
    sg.add_argument("--type", choices=["app", "files"], default="app")
    sg.add_argument("--device", default=None)
    vf = sub.add_parser("verify", help="verify an envelope file against a base64 public key")
    vf.add_argument("envelope", type=Path)
    vf.add_argument("--public", required=True)
    a = p.parse_args(argv)
    if a.cmd == "keygen":
        k = load_or_create_key(a.key)
        print(public_b64(k.public_key()))
        return 0
    if a.cmd == "sign":
        from firmware.tools.bundle import read_bundle_header
        from firmware.tools.image import ImageRejected, validate_app_image

        data = a.image.read_bytes()
        try:
            if a.type == "app":
                img = validate_app_image(data)
                project, version, chip = img.project or "", img.version or "", img.chip
            else:
                hdr = read_bundle_header(data)
                project, version, chip = hdr.project, hdr.version, None
        except (ImageRejected, ValueError) as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
        m = new_manifest(project=project, version=version, data=data, type=a.type, chip=chip, device=a.device)
        print(sign(m, load_or_create_key(a.key)).model_dump_json(exclude_none=True))
        return 0
    env = Envelope.model_validate_json(a.envelope.read_bytes())
    try:
        m = verify(env, [load_public_b64(a.public)])
    except ManifestError as exc:
        print(f"refused: {exc.message}", file=sys.stderr)
        return 1
    print(m.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
