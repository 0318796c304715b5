"""Flash an ESP32 over USB serial by running esptool as a separate program.

esptool is GPL-2.0: Siteward (Apache-2.0) never imports it, it runs it as a subprocess
and reads what it prints. This module builds the command line, turns esptool's progress
lines into percentages, and its failures into one clear sentence for an installer.

Where the file goes: an app image (what OTA uses) is written to the app partition
(0x10000 by default); a merged full-flash image (bootloader + partition table + app, as
MicroPython releases ship) goes to the chip's bootloader offset (0x1000 on the ESP32,
0x0 on the newer chips). The chip named in the image header is passed as ``--chip`` so a
board of another model is refused before anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firmware.tools.image import CHIP_IDS, IMAGE_MAGIC, ImageRejected, validate_app_image

APP_OFFSET = 0x10000
BOOTLOADER_OFFSET = {"esp32": 0x1000, "esp32s2": 0x1000}  # 0x0 for every newer chip
DEFAULT_CONNECT_ATTEMPTS = 3

_PROGRESS = re.compile(r"Writing at 0x([0-9a-fA-F]+)\D*?(\d{1,3}(?:\.\d+)?) ?%")
_STAGES = (
    ("Connecting", "connecting"),
    ("Connected to", "connected"),
    ("Uploading stub", "stub"),
    ("Stub flasher running", "stub"),
    ("Erasing flash", "erasing"),
    ("Flash will be erased", "erasing"),
    ("Compressed ", "writing"),
    ("Verifying written data", "verifying"),
    ("Hash of data verified", "verified"),
    ("Hard resetting", "resetting"),
)

def _rx(p: str) -> re.Pattern[str]:
    return re.compile(p, re.I)


_WRONG_CHIP = _rx(r"This chip is [A-Z0-9-]+,? not [A-Z0-9-]+|Wrong --chip argument|Unexpected chip ID")
_VERIFY = _rx(r"MD5 of file does not match|Hash of data did not match|verify failed")
_LOST = _rx(r"Lost connection|could not open port|readiness to read but returned no data|Input/output error|"
            r"device disconnected")
_STALLED = _rx(r"No more data to read|Timed out waiting for packet|Packet content transfer stopped|"
               r"Failed to write .*flash|Failed to .*compressed")
_BUSY = _rx(r"could not exclusively lock port|Resource busy|Device or resource busy|Permission denied")
_MISSING = _rx(r"could not open port|No such file or directory")
_NO_CHIP = _rx(r"Failed to connect to|No serial data received|Invalid head of packet|Wrong boot mode")
_TOO_BIG = _rx(r"will not fit|exceeds flash size")

MESSAGES = {
    "wrong_chip": "the board is a different chip model than the firmware is built for ({detail})",
    "verify_failed": "the flash did not verify after writing (bad cable, power or flash chip): try again",
    "port_vanished": "the serial port disappeared while flashing (cable pulled or board reset): "
                     "reconnect and flash again; the board keeps its bootloader and can be reflashed",
    "write_failed": "the chip stopped answering while writing the flash: check power and cable, then retry",
    "port_busy": "the serial port {port} is in use by another program (close serial monitors) or not accessible",
    "port_missing": "no serial port at {port}: is the board plugged in, and is this the right port?",
    "no_chip": "no chip answered on {port}: hold BOOT, tap RESET (EN), release BOOT, then try again",
    "too_large": "the firmware does not fit this board's flash",
}


class FlashError(Exception):
    def __init__(self, code: str, message: str, output: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.output = output


@dataclass(slots=True)
class FlashPlan:
    chip: str
    offset: int
    kind: str  # "app" | "merged" | "raw"
    version: str | None = None
    project: str | None = None
    args: list[str] = field(default_factory=list)


def plan(path: Path, *, offset: int | None = None, chip: str | None = None) -> FlashPlan:
    """Decide chip and offset from the file; FlashError if it is not something to flash."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FlashError("no_file", f"cannot read {path}: {exc.strerror}") from None
    if not data:
        raise FlashError("no_file", f"{path} is empty")
    try:
        img = validate_app_image(data, chip=chip, require_hash=False)
        return FlashPlan(img.chip, APP_OFFSET if offset is None else offset, "app", img.version, img.project)
    except ImageRejected as exc:
        if exc.code == "wrong_chip":
            raise FlashError("wrong_chip", exc.message) from None
        if exc.code not in ("merged_image", "bootloader"):
            raise FlashError("bad_image", f"{path.name}: {exc.message}") from None
    # a merged image: the bootloader header names the chip
    at = 0x1000 if data[0] != IMAGE_MAGIC and len(data) > 0x1000 and data[0x1000] == IMAGE_MAGIC else 0
    if data[at] != IMAGE_MAGIC:
        raise FlashError("bad_image", f"{path.name} is not an ESP32 image")
    chip_id = int.from_bytes(data[at + 12:at + 14], "little")
    found = CHIP_IDS.get(chip_id)
    if found is None:
        raise FlashError("bad_image", f"{path.name} names an unknown chip id {chip_id}")
    if chip is not None and found != chip:
        raise FlashError("wrong_chip", f"image is built for {found}, not {chip}")
    boot = BOOTLOADER_OFFSET.get(found, 0)
    return FlashPlan(found, (boot - at) if offset is None else offset, "merged")


def esptool_command(port: str, path: Path, fp: FlashPlan, *, erase: bool = False, baud: int | None = None,
                    esptool: list[str] | None = None, before: str = "default-reset",
                    connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS, stub: bool = True,
                    compress: bool = True) -> list[str]:
    cmd = list(esptool or [sys.executable, "-m", "esptool"])
    cmd += ["--chip", fp.chip, "--port", port, "--before", before, "--after", "hard-reset",
            "--connect-attempts", str(connect_attempts)]
    if baud is not None:
        cmd += ["--baud", str(baud)]
    if not stub:
        cmd += ["--no-stub"]  # the ROM loader alone: slower, for boards where the stub will not start
    cmd += ["write-flash"]
    if erase:
        cmd += ["--erase-all"]
    if not compress:
        cmd += ["--no-compress"]
    cmd += [f"0x{fp.offset:x}", str(path)]
    return cmd


def parse_line(line: str) -> tuple[str | None, float | None]:
    """(stage, percent) one line of esptool's output tells, either may be None."""
    m = _PROGRESS.search(line)
    if m:
        return "writing", min(100.0, float(m.group(2)))
    for needle, stage in _STAGES:
        if needle in line:
            return stage, None
    return None, None


def diagnose(output: str, port: str) -> FlashError:
    """One clear sentence for esptool's failure; what happened depends on how far it got."""
    writing = "Writing at" in output or "Compressed " in output
    m = _WRONG_CHIP.search(output)
    code: str | None = None
    if m:
        code = "wrong_chip"
    elif _VERIFY.search(output):
        code = "verify_failed"
    elif writing and _LOST.search(output):
        code = "port_vanished"
    elif writing and _STALLED.search(output):
        code = "write_failed"
    elif _BUSY.search(output):
        code = "port_busy"
    elif _MISSING.search(output):
        code = "port_missing"
    elif _NO_CHIP.search(output):
        code = "no_chip"
    elif _TOO_BIG.search(output):
        code = "too_large"
    if code is not None:
        return FlashError(code, MESSAGES[code].format(port=port, detail=m.group(0) if m else ""), output)
    tail = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    return FlashError("esptool_failed", f"esptool failed: {tail[0][:200]}", output)


Progress = Callable[[str, float | None], None]


def _port_exists(port: str) -> bool:
    # network ports (pyserial URL handlers) cannot be checked before connecting
    return port.startswith(("socket://", "rfc2217://")) or os.path.exists(port)


async def run_esptool(cmd: list[str], *, port: str, on_progress: Progress | None = None,
                      timeout_s: float = 600.0) -> str:
    """Run esptool; report (stage, percent) as lines arrive; return its output or raise FlashError."""
    if not _port_exists(port):
        raise FlashError("port_missing", MESSAGES["port_missing"].format(port=port))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120"}
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                                                env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    last = -1.0

    async def pump() -> None:
        nonlocal last
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                break
            buf += chunk
            # progress bars redraw with \r on a terminal and \n otherwise: split on both
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for raw in parts:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                lines.append(line)
                stage, pct = parse_line(line)
                if on_progress is not None and stage is not None and (pct is None or pct != last):
                    if pct is not None:
                        last = pct
                    on_progress(stage, pct)
        if buf.strip():
            lines.append(buf.decode("utf-8", "replace"))

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    output = "\n".join(lines)
    if proc.returncode != 0:
        raise diagnose(output, port)
    return output


async def flash(port: str, path: Path, *, erase: bool = False, offset: int | None = None, chip: str | None = None,
                baud: int | None = None, esptool: list[str] | None = None, before: str = "default-reset",
                connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS, on_progress: Progress | None = None,
                stub: bool = True, compress: bool = True) -> FlashPlan:
    fp = await asyncio.to_thread(plan, path, offset=offset, chip=chip)
    cmd = esptool_command(port, path, fp, erase=erase, baud=baud, esptool=esptool, before=before,
                          connect_attempts=connect_attempts, stub=stub, compress=compress)
    fp.args = cmd
    await run_esptool(cmd, port=port, on_progress=on_progress)
    return fp


async def write_raw(port: str, items: list[tuple[int, Path]], *, chip: str = "esp32", esptool: list[str] | None = None,
                    before: str = "default-reset", connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                    on_progress: Progress | None = None) -> None:
    """Write data files at fixed offsets (an NVS partition at 0x9000, ...)."""
    cmd = list(esptool or [sys.executable, "-m", "esptool"])
    cmd += ["--chip", chip, "--port", port, "--before", before, "--after", "hard-reset",
            "--connect-attempts", str(connect_attempts), "write-flash"]
    for off, p in items:
        cmd += [f"0x{off:x}", str(p)]
    await run_esptool(cmd, port=port, on_progress=on_progress)
