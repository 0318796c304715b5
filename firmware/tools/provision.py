"""Provision a node over USB serial: write its configuration, two ways.

* ``nvs``: the configuration as one JSON blob (namespace ``siteward``, key ``config``) in an NVS
  partition image made by Espressif's ``esp-idf-nvs-partition-gen``, written at the NVS partition
  offset (0x9000 in the default partition tables) by esptool. Works on any firmware that reads
  NVS, before or after the application is flashed; survives a filesystem wipe.
* ``repl``: ``config.json`` (and optionally the application files) copied over the MicroPython
  raw REPL with ``mpremote``, then a reset. For boards that already run MicroPython.

Both tools run as programs (esptool is GPL; the others keep the same shape). The node reads the
file first, then NVS (firmware/node/siteward/config.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from firmware.tools import flash as fl

NVS_NAMESPACE = "siteward"
NVS_KEY = "config"
NVS_OFFSET = 0x9000
NVS_SIZE = 0x6000
MAX_CONFIG_BYTES = 4000  # the node reads the blob into a buffer of this size
FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "node"


class ProvisionError(Exception):
    def __init__(self, code: str, message: str, output: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.output = output


def node_config(*, device_id: str, password: str, gateway_host: str, mqtt_port: int, http_port: int,
                ota_keys: list[str], wifi_ssid: str | None = None, wifi_password: str | None = None,
                **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "id": device_id,
        "mqtt": {"host": gateway_host, "port": mqtt_port, "user": device_id, "password": password},
        "http_port": http_port,
        "ota_keys": ota_keys,
    }
    if wifi_ssid:
        cfg["wifi"] = {"ssid": wifi_ssid, "password": wifi_password or ""}
    cfg.update(extra)
    return cfg


def config_bytes(cfg: dict[str, Any]) -> bytes:
    data = json.dumps(cfg, separators=(",", ":")).encode()
    if len(data) > MAX_CONFIG_BYTES:
        raise ProvisionError("config_too_large", f"configuration is {len(data)} bytes, the node reads "
                                                 f"at most {MAX_CONFIG_BYTES}")
    return data


async def _run(cmd: list[str], *, timeout_s: float = 120.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ProvisionError("timeout", f"{Path(cmd[2] if len(cmd) > 2 else cmd[0]).name} did not finish "
                                        f"within {timeout_s:.0f} s") from None
    return proc.returncode or 0, out.decode("utf-8", "replace")


async def make_nvs_partition(cfg: dict[str, Any], out: Path, *, size: int = NVS_SIZE) -> Path:
    """An NVS partition image holding the configuration blob."""
    blob = base64.b64encode(config_bytes(cfg)).decode()
    csv = out.with_suffix(".csv")
    # the CSV holds the secret only for the moment the generator runs
    csv.write_text(f"key,type,encoding,value\n{NVS_NAMESPACE},namespace,,\n{NVS_KEY},data,base64,{blob}\n")
    try:
        rc, output = await _run([sys.executable, "-m", "esp_idf_nvs_partition_gen", "generate", str(csv), str(out),
                                 hex(size)])
    finally:
        csv.unlink(missing_ok=True)
    if rc != 0 or not await asyncio.to_thread(out.exists):
        raise ProvisionError("nvs_failed", f"NVS partition generator failed: {output.strip()[-300:]}", output)
    return out


async def provision_nvs(port: str, cfg: dict[str, Any], *, chip: str = "esp32", offset: int = NVS_OFFSET,
                        esptool: list[str] | None = None, before: str = "default-reset",
                        on_progress: fl.Progress | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="siteward-nvs-") as tmp:
        image = await make_nvs_partition(cfg, Path(tmp) / "nvs.bin")
        try:
            await fl.write_raw(port, [(offset, image)], chip=chip, esptool=esptool, before=before,
                               on_progress=on_progress)
        except fl.FlashError as exc:
            raise ProvisionError(exc.code, exc.message, exc.output) from None


def _mpremote(port: str, *args: str) -> list[str]:
    # "resume": no soft reset on connect; the board's program is interrupted, not restarted
    return [sys.executable, "-m", "mpremote", "connect", port, "resume", *args]


async def provision_repl(port: str, cfg: dict[str, Any], *, install_app: bool = False, reset: bool = True) -> None:
    if not fl._port_exists(port):
        raise ProvisionError("port_missing", fl.MESSAGES["port_missing"].format(port=port))
    with tempfile.TemporaryDirectory(prefix="siteward-repl-") as tmp:
        local = Path(tmp) / "config.json"
        local.write_bytes(config_bytes(cfg))
        steps = [("fs", "cp", str(local), ":config.json")]
        if install_app:
            steps += [("fs", "cp", str(FIRMWARE_DIR / "main.py"), ":main.py"),
                      ("fs", "cp", "-r", str(FIRMWARE_DIR / "siteward"), ":")]
        for step in steps:
            rc, out = await _run(_mpremote(port, *step))
            if rc != 0:
                code = "no_repl" if "raw repl" in out.lower() or "could not enter" in out.lower() else "repl_failed"
                if "could not" in out.lower() and "port" in out.lower():
                    code = "port_missing"
                raise ProvisionError(code, f"mpremote {' '.join(step[:2])} failed: {out.strip()[-300:]}", out)
    if reset:
        # the connection drops as the board resets: mpremote's exit status says nothing here
        await _run(_mpremote(port, "exec", "import machine; machine.reset()"), timeout_s=20)
