"""USB flashing: the real esptool (run as a program) against the simulated ESP32 ROM loader."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from firmware.tools import flash as fl
from firmware.tools.image import build_app_image, build_bootloader_image, build_partition_table
from tests.firmware.romsim import RomLoader

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def app_bin(tmp_path: Path) -> Path:
    p = tmp_path / "siteward-node-1.4.0.bin"
    p.write_bytes(build_app_image(version="1.4.0", payload_len=200_000))
    return p


@pytest.fixture
def sims() -> Iterator[list[RomLoader]]:
    started: list[RomLoader] = []
    yield started
    for s in started:
        s.stop()


def start(sims: list[RomLoader], **kw: object) -> RomLoader:
    sim = RomLoader(**kw)  # type: ignore[arg-type]
    sim.start()
    sims.append(sim)
    return sim


@pytest.mark.parametrize("transport", ["pty", "socket"])
async def test_flash_app_image_writes_and_verifies(transport: str, app_bin: Path, sims: list[RomLoader]) -> None:
    sim = start(sims, transport=transport)
    data = app_bin.read_bytes()  # noqa: ASYNC240 - a test fixture file
    seen: list[tuple[str, float | None]] = []
    fp = await fl.flash(sim.port, app_bin, on_progress=lambda s, p: seen.append((s, p)))
    assert (fp.chip, fp.offset, fp.version, fp.project) == ("esp32", 0x10000, "1.4.0", "siteward-node")
    assert bytes(sim.flash[0x10000:0x10000 + len(data)]) == data
    # the protocol as esptool drove it: ROM sync, stub upload, SPI setup, compressed writes, MD5 verify
    for cmd in ("SYNC", "READ_REG", "MEM_BEGIN", "MEM_END", "SPI_SET_PARAMS", "FLASH_DEFL_BEGIN",
                "FLASH_DEFL_DATA", "SPI_FLASH_MD5"):
        assert cmd in sim.commands, cmd
    percents = [p for s, p in seen if p is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0 and len(percents) >= 5
    stages = [s for s, _ in seen]
    assert stages.index("connected") < stages.index("writing") < stages.index("verified")


async def test_rom_loader_without_stub_uncompressed(app_bin: Path, sims: list[RomLoader]) -> None:
    sim = start(sims)
    data = app_bin.read_bytes()  # noqa: ASYNC240 - a test fixture file
    await fl.flash(sim.port, app_bin, stub=False, compress=False, baud=230400)
    assert bytes(sim.flash[0x10000:0x10000 + len(data)]) == data
    assert not sim.stub and "MEM_BEGIN" not in sim.commands
    for cmd in ("SPI_ATTACH", "CHANGE_BAUDRATE", "FLASH_BEGIN", "FLASH_DATA", "SPI_FLASH_MD5"):
        assert cmd in sim.commands, cmd


async def test_erase_and_faster_baud(app_bin: Path, sims: list[RomLoader]) -> None:
    sim = start(sims)
    sim.flash[0x300000:0x300010] = b"old data here..."
    await fl.flash(sim.port, app_bin, erase=True, baud=460800)
    assert "ERASE_FLASH" in sim.commands and sim.baud_changes == [460800]
    assert bytes(sim.flash[0x300000:0x300010]) == b"\xff" * 16


async def test_merged_image_goes_to_the_bootloader_offset(tmp_path: Path, sims: list[RomLoader]) -> None:
    # as MicroPython releases ship them: bootloader at 0x1000, partition table at 0x8000, app at 0x10000
    merged = bytearray(b"\xff" * (0x10000 - 0x1000))
    boot = build_bootloader_image()
    merged[0:len(boot)] = boot
    table = build_partition_table()
    merged[0x7000:0x7000 + len(table)] = table
    merged += build_app_image(version="1.22.0", project="micropython", payload_len=50_000)
    path = tmp_path / "ESP32_GENERIC-v1.22.0.bin"
    path.write_bytes(bytes(merged))
    sim = start(sims)
    fp = await fl.flash(sim.port, path)
    assert (fp.kind, fp.offset) == ("merged", 0x1000)
    assert bytes(sim.flash[0x1000:0x1000 + len(merged)]) == bytes(merged)


@pytest.mark.parametrize(("sim_kw", "code"), [
    ({"no_sync": True}, "no_chip"),
    ({"bad_md5": True}, "verify_failed"),
    ({"silent_after": 4}, "write_failed"),
    ({"vanish_after": 4}, "port_vanished"),
    ({"chip": "esp32s3"}, "wrong_chip"),
])
async def test_failures_have_one_clear_message(sim_kw: dict[str, object], code: str, app_bin: Path,
                                               sims: list[RomLoader]) -> None:
    sim = start(sims, **sim_kw)
    with pytest.raises(fl.FlashError) as err:
        await fl.flash(sim.port, app_bin, connect_attempts=1)
    assert err.value.code == code, err.value.output[-800:]
    assert "esptool" not in err.value.message.lower() and len(err.value.message) < 200


async def test_missing_and_busy_ports(app_bin: Path, sims: list[RomLoader]) -> None:
    with pytest.raises(fl.FlashError) as err:
        await fl.flash("/dev/ttyUSB-siteward-none", app_bin)
    assert err.value.code == "port_missing" and "/dev/ttyUSB-siteward-none" in err.value.message
    sim = start(sims)
    # a serial monitor holding the port with an exclusive lock, as most do
    holder = serial.Serial(sim.port, exclusive=True)
    try:
        with pytest.raises(fl.FlashError) as err:
            await fl.flash(sim.port, app_bin, connect_attempts=1)
        assert err.value.code == "port_busy", err.value.output[-500:]
    finally:
        holder.close()


async def test_refuses_what_is_not_firmware(tmp_path: Path, sims: list[RomLoader]) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(fl.FlashError) as err:
        await fl.flash("/dev/null", junk)
    assert err.value.code == "bad_image"


def test_cli_node_flash(app_bin: Path, sims: list[RomLoader], tmp_path: Path) -> None:
    sim = start(sims)
    env = {**os.environ, "SITEWARD_GATEWAY__DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "node", "flash", "--port", sim.port, "--firmware",
                        str(app_bin)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "flashed siteward-node 1.4.0" in r.stdout and "100.0%" in r.stderr
    sim.stop()
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "node", "flash", "--port", sim.port, "--firmware",
                        str(app_bin)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "port_missing" in r.stderr
