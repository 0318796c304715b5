"""``siteward node provision``: credentials minted, configuration written to the board (NVS via the
real esptool and the simulated ROM loader, or config.json via mpremote and the MicroPython REPL),
then the node comes online with it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware.tools.provision import NVS_OFFSET, NVS_SIZE, make_nvs_partition
from tests.firmware.mpnode import MicroNode, ReplPort, install_firmware, micropython_binary
from tests.firmware.romsim import RomLoader

pytestmark = pytest.mark.timeout(120)


def cli_env(gw: Any, tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "siteward.toml"
    cfg.write_text(f'[gateway]\nid = "gw-test"\ndata_dir = "{gw.settings.data_dir}"\n'
                   f'[logging]\nlevel = "warning"\nformat = "console"\n')
    return {**os.environ, "SITEWARD_CONFIG": str(cfg)}


async def run_cli(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def until(pred: Callable[[], bool], within: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def test_nvs_partition_round_trips_through_the_node_shim(tmp_path: Path) -> None:
    """What esp-idf-nvs-partition-gen writes, the node's NVS reader (shim of esp32.NVS) reads back."""
    cfg = {"id": "n-7", "mqtt": {"host": "10.0.0.1", "user": "n-7", "password": "p" * 24}, "ota_keys": ["k" * 44]}
    image = await make_nvs_partition(cfg, tmp_path / "nvs.bin")
    assert image.stat().st_size == NVS_SIZE
    root = tmp_path / "node"
    install_firmware(root)
    (root / "flash" / "nvs.bin").write_bytes(image.read_bytes())
    proc = await asyncio.create_subprocess_exec(
        micropython_binary(), "-c", "from siteward import config; import json; print(json.dumps(config.load()))",
        cwd=root, env={**os.environ, "MICROPYPATH": str(Path(__file__).parent / "shims")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert got["source"] == "nvs" and got["mqtt"] == {**cfg["mqtt"], "port": 1883, "keepalive": 60}


async def test_provision_nvs_with_esptool_then_node_comes_online(gw: Any, tmp_path: Path,
                                                                 nodes: list[MicroNode]) -> None:
    flash_file = tmp_path / "board-flash.bin"
    sim = RomLoader(flash_file=flash_file)
    sim.start()
    try:
        proc = await run_cli(cli_env(gw, tmp_path), "node", "provision", "--port", sim.port, "--id", "node-9",
                             "--method", "nvs", "--gateway-host", "127.0.0.1", "--mqtt-port", str(gw.broker.port),
                             "--http-port", str(gw.web_port), "--wait", "60")
        # the board boots once the NVS partition is written and verified
        assert await until(lambda: "SPI_FLASH_MD5" in sim.commands, 60), sim.commands[-5:]
        sim.save()
        flash = flash_file.read_bytes()
        root = tmp_path / "node-9"
        install_firmware(root)  # firmware flashed earlier; no config.json: NVS is all it has
        (root / "flash" / "nvs.bin").write_bytes(flash[NVS_OFFSET:NVS_OFFSET + NVS_SIZE])
        node = MicroNode(root).start()
        nodes.append(node)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, (err.decode()[-2000:], node.output())
        assert b"node-9 is online" in out
    finally:
        sim.stop()
    dev = await gw.registry.get("node-9")
    assert dev is not None and dev.online
    assert gw.credentials.has("node-9")
    audit = await gw.audit.query(action="node.provision")
    assert audit and audit[0].target == "node-9" and "password" not in json.dumps(audit[0].detail)


async def test_provision_over_raw_repl_with_mpremote_then_node_comes_online(gw: Any, tmp_path: Path,
                                                                           nodes: list[MicroNode]) -> None:
    root = tmp_path / "node-r"
    install_firmware(root)
    repl = ReplPort(root)
    try:
        proc = await run_cli(cli_env(gw, tmp_path), "node", "provision", "--port", repl.port, "--id", "node-r",
                             "--method", "repl", "--gateway-host", "127.0.0.1", "--mqtt-port", str(gw.broker.port),
                             "--http-port", str(gw.web_port), "--wait", "60")
        # mpremote copies config.json, then resets the board: the REPL process ends as a reboot
        rc = await asyncio.to_thread(repl.wait_exit, 60)
        assert rc == 77, "board was not reset after provisioning"
        cfg = json.loads((root / "config.json").read_text())
        assert cfg["id"] == "node-r" and cfg["mqtt"]["user"] == "node-r"
        assert cfg["ota_keys"][0] == await gw.ota.public_key()
        node = MicroNode(root).start()  # the board boots main.py with its new configuration
        nodes.append(node)
        _, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, (err.decode()[-2000:], node.output())
    finally:
        repl.close()
    assert (await gw.registry.get("node-r")).online


async def test_provision_to_a_missing_port_fails_clearly(gw: Any, tmp_path: Path) -> None:
    proc = await run_cli(cli_env(gw, tmp_path), "node", "provision", "--port", "/dev/ttyUSB-none", "--id", "node-x",
                         "--method", "repl", "--wait", "0")
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"port_missing" in err
