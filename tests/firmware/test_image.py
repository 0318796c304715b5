"""ESP32 app image checks and Ed25519 manifests: each bad upload named precisely."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.tools import manifest as mf
from firmware.tools.bundle import make_bundle, read_bundle_header
from firmware.tools.image import (
    ImageRejected,
    build_app_image,
    build_bootloader_image,
    build_partition_table,
    validate_app_image,
)

GOOD = build_app_image(version="2.3.4", payload_len=40_000)


def test_good_image_and_its_description() -> None:
    img = validate_app_image(GOOD)
    assert (img.chip, img.version, img.project, img.idf_version) == ("esp32", "2.3.4", "siteward-node", "v5.2.2")
    assert img.sha256 == hashlib.sha256(GOOD).hexdigest() and img.hash_appended and len(img.segments) == 3


def test_esptool_agrees_the_built_image_is_valid(tmp_path: Path) -> None:
    """The images these tests build are what ESP-IDF builds, as esptool reads them."""
    p = tmp_path / "app.bin"
    p.write_bytes(GOOD)
    r = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "image-info", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Checksum: 0x" in r.stdout and "(valid)" in r.stdout and "App version: 2.3.4" in r.stdout


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize(("data", "code"), [
    (b"", "empty"),
    (build_partition_table(), "partition_table"),
    (build_bootloader_image(), "bootloader"),
    (b"\xff" * 0x1000 + build_bootloader_image() + b"\xff" * 0x8000, "merged_image"),
    (GOOD[:len(GOOD) // 2], "truncated"),
    (GOOD[:10], "truncated"),
    (GOOD[:-10], "truncated"),
    (_flip(GOOD, 20_000), "checksum_mismatch"),
    (_flip(GOOD, len(GOOD) - 5), "sha256_mismatch"),
    (b"\x7fELF" + GOOD[4:], "bad_magic"),
    (build_app_image(version="1.0.0", hash_appended=False), "no_hash"),
    (GOOD + b"extra bytes!", "trailing_data"),
])
def test_rejections_name_the_problem(data: bytes, code: str) -> None:
    with pytest.raises(ImageRejected) as err:
        validate_app_image(data)
    assert err.value.code == code, err.value.message


def test_wrong_chip() -> None:
    s3 = build_app_image(version="1.0.0", chip="esp32s3")
    assert validate_app_image(s3).chip == "esp32s3"
    with pytest.raises(ImageRejected) as err:
        validate_app_image(s3, chip="esp32")
    assert err.value.code == "wrong_chip" and "esp32s3" in err.value.message
    unknown = bytearray(GOOD)
    struct.pack_into("<H", unknown, 12, 0x7777)
    with pytest.raises(ImageRejected) as err:
        validate_app_image(bytes(unknown))
    assert err.value.code in ("wrong_chip", "sha256_mismatch")


def test_every_single_byte_flip_in_the_header_and_tail_is_caught() -> None:
    # the gateway must never serve an image that differs from what was built
    for at in [*range(0, 24), *range(len(GOOD) - 48, len(GOOD))]:
        with pytest.raises(ImageRejected):
            validate_app_image(_flip(GOOD, at))


def test_manifest_sign_verify_and_tamper() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    m = mf.new_manifest(project="siteward-node", version="2.3.4", data=GOOD, chip="esp32", device="node-1")
    env = mf.sign(m, key, url="/ota/v1/images/x.bin")
    assert mf.verify(env, [other.public_key(), key.public_key()]) == m
    with pytest.raises(mf.ManifestError) as err:
        mf.verify(env, [other.public_key()])
    assert err.value.code == "bad_signature"
    forged = env.model_copy(update={"manifest": env.manifest.replace("node-1", "node-2")})
    with pytest.raises(mf.ManifestError) as err:
        mf.verify(forged, [key.public_key()])
    assert err.value.code == "bad_signature"
    # the URL is transport: changing it does not touch what is signed
    moved = env.model_copy(update={"url": "http://elsewhere/x.bin"})
    assert mf.verify(moved, [key.public_key()]).sha256 == hashlib.sha256(GOOD).hexdigest()


def test_versions_order_numerically() -> None:
    assert mf.is_newer("1.10.0", "1.9.9") and not mf.is_newer("1.2.0", "1.2.0") and not mf.is_newer("0.9", "1.0")
    assert mf.is_newer("2.0.0-rc1", "1.9.0")


def test_signing_key_file_is_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "ota" / "signing.key"
    key = mf.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert mf.key_id(mf.load_or_create_key(path).public_key()) == mf.key_id(key.public_key())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        mf.load_or_create_key(path)


def test_release_pipeline_cli_signs_and_verifies(tmp_path: Path) -> None:
    img = tmp_path / "app.bin"
    img.write_bytes(GOOD)
    key = tmp_path / "release.key"
    run = lambda *a: subprocess.run([sys.executable, "-m", "firmware.tools.manifest", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    pub = run("keygen", str(key)).stdout.strip()
    signed = run("sign", "--key", str(key), "--image", str(img))
    assert signed.returncode == 0, signed.stderr
    (tmp_path / "env.json").write_text(signed.stdout)
    ok = run("verify", str(tmp_path / "env.json"), "--public", pub)
    assert ok.returncode == 0 and '"version":"2.3.4"' in ok.stdout
    img.write_bytes(build_partition_table())
    refused = run("sign", "--key", str(key), "--image", str(img))
    assert refused.returncode == 1 and "partition table" in refused.stderr


def test_bundle_round_trip_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "siteward").mkdir()
    (tmp_path / "siteward" / "a.py").write_text("A = 1\n")
    (tmp_path / "siteward" / "b.py").write_text("B = 2\n")
    b = make_bundle(tmp_path, project="siteward-node", version="1.1.0")
    hdr = read_bundle_header(b)
    assert [p for p, _, _ in hdr.files] == ["siteward/a.py", "siteward/b.py"]
    with pytest.raises(ValueError, match="truncated"):
        read_bundle_header(b[:-3])
    with pytest.raises(ValueError, match="SHA-256"):
        read_bundle_header(b[:-1] + b"3")
    evil = b.replace(b"siteward/a.py", b"../../boot.py"[:13])
    with pytest.raises(ValueError, match="not allowed"):
        read_bundle_header(evil)
