"""The node firmware in the real MicroPython interpreter against the real gateway.

Broker, HTTP server, ingest, store and OTA service are the gateway's own; only the
chip's peripherals are shims (tests/firmware/shims). Waits are bounded polls on what the
gateway recorded, never sleeps sized to a machine's speed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware.tools import manifest as mf
from firmware.tools.bundle import make_bundle
from firmware.tools.image import build_app_image
from gateway.models import CommandRequest
from gateway.ota.service import CampaignRequest, Target
from tests.firmware.mpnode import FIRMWARE
from tests.helpers import count_readings, eventually

pytestmark = pytest.mark.timeout(120)


def record_mqtt(gw: Any) -> list[tuple[str, bytes]]:
    """Every message the broker hands to ingest, in order (the real path still runs)."""
    seen: list[tuple[str, bytes]] = []
    inner = gw.ingest.on_mqtt

    async def spy(principal: str | None, topic: str, payload: bytes) -> list[int]:
        seen.append((topic, payload))
        return await inner(principal, topic, payload)

    gw.ingest.on_mqtt = spy
    return seen


def ota_statuses(seen: list[tuple[str, bytes]], device: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in seen if t == f"devices/{device}/ota/status"]


async def latest(gw: Any, device: str, metric: str) -> float | None:
    v = gw.registry.latest(device).get(metric)
    return None if v is None else v["value"]


async def test_connects_and_publishes_sensor_telemetry_and_health(gw: Any, start_node: Callable[..., Any]) -> None:
    hw = {"sht3x": {"temperature": 23.4, "humidity": 51.2},
          "bme280": {"temperature": 22.8, "pressure": 987.65, "humidity": 47.5}}
    node = await start_node("node-1", hw=hw)
    n = await eventually(lambda: count_readings(gw, "node-1"), lambda n: n >= 8, within=20)
    assert n >= 8, node.output()
    latest_values = gw.registry.latest("node-1")
    assert latest_values["temperature"]["value"] == pytest.approx(23.4, abs=0.02)
    assert latest_values["humidity"]["value"] == pytest.approx(51.2, abs=0.02)
    # the BME280 path: Bosch's float compensation on the node, their integer one in the shim
    assert latest_values["bme_temperature"]["value"] == pytest.approx(22.8, abs=0.02)
    assert latest_values["pressure"]["value"] == pytest.approx(987.65, abs=0.05)
    assert latest_values["bme_humidity"]["value"] == pytest.approx(47.5, abs=0.1)
    dev = await eventually(lambda: gw.registry.get("node-1"), lambda d: d.firmware is not None)
    assert dev.online and dev.firmware == "1.0.0" and dev.attributes.get("model") == "siteward-node"
    assert "heap" in latest_values and "uptime" in latest_values and latest_values["rssi"]["value"] == -58


async def test_sensor_missing_does_not_stop_the_others(gw: Any, start_node: Callable[..., Any]) -> None:
    node = await start_node("node-1", hw={"sht3x": None, "bme280": {"temperature": 19.0}})
    latest_values = await eventually(lambda: asyncio.sleep(0, gw.registry.latest("node-1")),
                                     lambda v: "bme_temperature" in v, within=20)
    assert "bme_temperature" in latest_values and "temperature" not in latest_values, node.output()


async def test_last_will_on_power_cut(gw: Any, start_node: Callable[..., Any]) -> None:
    seen = record_mqtt(gw)
    node = await start_node("node-1")
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.online, within=20)
    assert ("devices/node-1/status", b"online") in seen
    node.kill()  # no DISCONNECT: the broker notices and publishes the will
    await eventually(lambda: asyncio.sleep(0, seen), lambda s: ("devices/node-1/status", b"offline") in s,
                     within=30)
    assert ("devices/node-1/status", b"offline") in seen
    dev = await gw.registry.get("node-1")
    assert not dev.online


async def test_command_round_trip(gw: Any, start_node: Callable[..., Any]) -> None:
    node = await start_node("node-1")
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.online, within=20)
    cmd = await gw.commander.send("node-1", CommandRequest(command="relay", args={"state": "on"}), actor="test")
    done = await eventually(lambda: gw.commander.get(cmd.id), lambda c: c.state.value != "sent", within=10)
    assert done.state.value == "confirmed", node.output()
    pins = json.loads((node.root / "pins.json").read_text())
    assert pins["26"] == 1  # the relay GPIO really went high

    cmd = await gw.commander.send("node-1", CommandRequest(command="set_interval", args={"seconds": 5}),
                                  actor="test")
    done = await eventually(lambda: gw.commander.get(cmd.id), lambda c: c.state.value != "sent", within=10)
    assert done.state.value == "confirmed"
    assert (await gw.registry.get("node-1")).attributes["status"]["interval_s"] == 5

    cmd = await gw.commander.send("node-1", CommandRequest(command="identify"), actor="test")
    done = await eventually(lambda: gw.commander.get(cmd.id), lambda c: c.state.value != "sent", within=10)
    assert done.state.value == "confirmed"

    cmd = await gw.commander.send("node-1", CommandRequest(command="self_destruct"), actor="test")
    done = await eventually(lambda: gw.commander.get(cmd.id), lambda c: c.state.value != "sent", within=10)
    assert done.state.value == "failed" and "unknown" in json.dumps(done.result)

    boots = node.boots
    cmd = await gw.commander.send("node-1", CommandRequest(command="reboot"), actor="test")
    await eventually(lambda: asyncio.sleep(0, node.boots), lambda b: b > boots, within=10)
    assert node.boots == boots + 1
    dev = await eventually(lambda: gw.registry.get("node-1"), lambda d: d.online, within=20)
    assert dev.online


async def _upload(gw: Any, data: bytes) -> Any:
    fw, created = await gw.ota.upload(data, filename="fw.bin", actor="test")
    assert created
    return fw


async def _campaign(gw: Any, fw: Any, device: str = "node-1") -> Any:
    return await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device=device)),
                                        actor="test")


async def _node_state(gw: Any, cid: str, device: str = "node-1") -> Any:
    c = await gw.ota.campaigns.get(cid)
    return c.nodes[device]


async def test_ota_app_image_success(gw: Any, start_node: Callable[..., Any]) -> None:
    seen = record_mqtt(gw)
    node = await start_node("node-1")
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    fw = await _upload(gw, build_app_image(version="1.1.0", payload_len=200_000, seed=7))
    c = await _campaign(gw, fw)
    n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"), within=60)
    assert n.state.value == "success", (n, node.output())
    states = [s["state"] for s in ota_statuses(seen, "node-1")]
    assert states[0] == "STARTED" and states[-1] == "SUCCESS" and "IN_PROGRESS" in states
    progress = [s["progress"] for s in ota_statuses(seen, "node-1") if s["state"] == "IN_PROGRESS"]
    assert progress == sorted(progress) and progress[-1] == 100
    dev = await eventually(lambda: gw.registry.get("node-1"), lambda d: d.firmware == "1.1.0", within=10)
    assert dev.firmware == "1.1.0"
    otadata = json.loads((node.root / "flash" / "otadata.json").read_text())
    assert otadata == {"boot": "ota_1", "state": {"ota_0": "valid", "ota_1": "valid"}}
    assert (node.root / "flash" / "ota_1.bin").read_bytes()[:fw.size] == gw.ota.registry.path(fw.sha256).read_bytes()
    done = await eventually(lambda: gw.ota.campaigns.get(c.id), lambda c: c.state.value == "completed")
    assert done.state.value == "completed"


async def test_ota_tampered_image_is_rejected_and_old_firmware_keeps_running(
        gw: Any, start_node: Callable[..., Any]) -> None:
    node = await start_node("node-1")
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    fw = await _upload(gw, build_app_image(version="1.1.0", payload_len=100_000))
    # the file served is altered after it was checked and signed (disk corruption, an attacker)
    path = gw.ota.registry.path(fw.sha256)
    data = bytearray(path.read_bytes())
    data[50_000] ^= 0x01
    path.write_bytes(bytes(data))
    c = await _campaign(gw, fw)
    n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"), within=60)
    assert n.state.value == "failed" and "sha256_mismatch" in (n.reason or ""), (n, node.output())
    otadata = json.loads((node.root / "flash" / "otadata.json").read_text())
    assert otadata["boot"] == "ota_0"
    before = await count_readings(gw, "node-1")
    await eventually(lambda: count_readings(gw, "node-1"), lambda k: k > before + 2, within=10)
    assert (await gw.registry.get("node-1")).firmware == "1.0.0"


async def test_ota_manifest_refusals(gw: Any, start_node: Callable[..., Any]) -> None:
    """Wrong signature, another node's manifest, a downgrade, a replay, garbage: all refused."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seen = record_mqtt(gw)
    node = await start_node("node-1", chip="esp32")
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    image = build_app_image(version="1.1.0", payload_len=20_000)
    fw = await _upload(gw, image)
    url = gw.ota.download_url("node-1", fw.sha256)

    def manifest(**kw: Any) -> mf.Manifest:
        base = {"project": "siteward-node", "version": "1.1.0", "data": image, "chip": "esp32", "device": "node-1"}
        base.update(kw)
        return mf.new_manifest(**base)

    rogue = Ed25519PrivateKey.generate()
    key = await gw.ota.signing_key()
    cases = [
        (mf.sign(manifest(), rogue, url=url), "bad_signature"),
        (mf.sign(manifest(device="node-2"), key, url=url), "wrong_device"),
        (mf.sign(manifest(version="0.9.0"), key, url=url), "not_newer"),
        (mf.sign(manifest(project="other-product"), key, url=url), "wrong_project"),
        (mf.sign(manifest(chip="esp32s3"), key, url=url), "wrong_chip"),
    ]
    # a signature lifted from one manifest onto another
    good = mf.sign(manifest(), key, url=url)
    swapped = mf.Envelope(manifest=good.manifest.replace('"1.1.0"', '"9.9.9"'), sig=good.sig, url=url)
    cases.append((swapped, "bad_signature"))
    for env, _ in cases:
        await gw.broker.publish("devices/node-1/ota", env.model_dump_json().encode(), qos=1)
    await gw.broker.publish("devices/node-1/ota", b"\x00not json", qos=1)
    want = [code for _, code in cases] + ["bad_envelope"]
    got = await eventually(lambda: asyncio.sleep(0, ota_statuses(seen, "node-1")), lambda s: len(s) >= len(want),
                           within=30)
    assert [s["state"] for s in got] == ["FAILED"] * len(want), node.output()
    assert [s["reason"] for s in got] == want
    otadata = json.loads((node.root / "flash" / "otadata.json").read_text())
    assert otadata["boot"] == "ota_0"


class CuttingProxy:
    """TCP proxy in front of the gateway's HTTP port that cuts chosen connections after N
    response bytes: the Wi-Fi dropping out in the middle of a download."""

    def __init__(self, target_port: int, cut_after: int, cuts: int) -> None:
        self.target = target_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        client.settimeout(10)
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = client.recv(4096)
            if not chunk:
                break
            req += chunk
        self.requests.append(req)
        upstream.sendall(req)
        cut = self.cuts_left > 0
        if cut:
            self.cuts_left -= 1
        sent = 0
        try:
            while True:
                data = upstream.recv(16384)
                if not data:
                    break
                if cut and sent + len(data) >= self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    break
                client.sendall(data)
                sent += len(data)
        finally:
            # RST, not FIN: what a dropped link looks like from the node
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


async def test_ota_connection_cut_mid_download_resumes(gw: Any, start_node: Callable[..., Any]) -> None:
    proxy = CuttingProxy(gw.web_port, cut_after=90_000, cuts=2)
    try:
        node = await start_node("node-1", http_port=proxy.port, ota_retry_ms=100)
        await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                         within=20)
        fw = await _upload(gw, build_app_image(version="1.2.0", payload_len=250_000))
        c = await _campaign(gw, fw)
        n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"),
                             within=60)
        assert n.state.value == "success", (n, node.output())
        import re

        starts = [int(m.group(1)) if (m := re.search(rb"Range: bytes=(\d+)-", r)) else 0 for r in proxy.requests]
        # one full request, then only resumptions, each from further on: never from zero again
        assert starts[0] == 0 and len(starts) >= 3, proxy.requests
        assert all(0 < a < b for a, b in itertools.pairwise(starts[1:])) and starts[1] > 0, starts
        assert (await gw.registry.get("node-1")).firmware == "1.2.0"
    finally:
        proxy.close()


async def test_ota_connection_lost_for_good_fails_cleanly(gw: Any, start_node: Callable[..., Any]) -> None:
    proxy = CuttingProxy(gw.web_port, cut_after=30_000, cuts=100)
    try:
        node = await start_node("node-1", http_port=proxy.port, ota_retry_ms=50)
        await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                         within=20)
        fw = await _upload(gw, build_app_image(version="1.2.0", payload_len=250_000))
        c = await _campaign(gw, fw)
        n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"),
                             within=60)
        assert n.state.value == "failed" and "download_failed" in (n.reason or ""), (n, node.output())
        otadata = json.loads((node.root / "flash" / "otadata.json").read_text())
        assert otadata["boot"] == "ota_0"
        before = await count_readings(gw, "node-1")
        await eventually(lambda: count_readings(gw, "node-1"), lambda k: k > before + 2, within=10)
        assert (await gw.registry.get("node-1")).firmware == "1.0.0"
    finally:
        proxy.close()


async def test_new_firmware_that_never_reaches_the_broker_is_rolled_back(
        gw: Any, start_node: Callable[..., Any]) -> None:
    node = await start_node("node-1", confirm_s=2)
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    # the Wi-Fi goes away while the node reboots into the new firmware
    (node.root / "hw_on_reset.json").write_text(json.dumps({"wifi": False}))
    fw = await _upload(gw, build_app_image(version="1.3.0", payload_len=50_000))
    c = await _campaign(gw, fw)
    assert await asyncio.to_thread(node.wait_for, "bootloader: rollback to ota_0", 60), node.output()
    (node.root / "hw.json").write_text(json.dumps({}))  # Wi-Fi back: the node returns on its old firmware
    n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"), within=60)
    assert n.state.value == "failed" and "rolled_back" in (n.reason or ""), (n, node.output())
    assert (await gw.registry.get("node-1")).firmware == "1.0.0"
    otadata = json.loads((node.root / "flash" / "otadata.json").read_text())
    assert otadata["boot"] == "ota_0" and otadata["state"]["ota_1"] == "aborted"


async def test_ota_app_files_on_a_build_without_ota_partitions(
        gw: Any, start_node: Callable[..., Any], tmp_path: Path) -> None:
    import shutil

    node = await start_node("node-1", ota_partitions=False)
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    src = tmp_path / "release"
    shutil.copytree(FIRMWARE / "siteward", src / "siteward", ignore=shutil.ignore_patterns("__pycache__"))
    ver = src / "siteward" / "version.py"
    ver.write_text(ver.read_text().replace('VERSION = "1.0.0"', 'VERSION = "1.1.0"'))
    bundle = make_bundle(src, project="siteward-node", version="1.1.0")
    fw = await _upload(gw, bundle)
    assert fw.kind == "files"
    c = await _campaign(gw, fw)
    n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"), within=60)
    assert n.state.value == "success", (n, node.output())
    assert (node.root / "app_active").read_text() == "app_a"
    assert not (node.root / "app_next").exists() and not (node.root / "stage").exists()
    # the previous version is kept beside the new one
    assert 'VERSION = "1.0.0"' in (node.root / "siteward" / "version.py").read_text()
    assert 'VERSION = "1.1.0"' in (node.root / "app_a" / "siteward" / "version.py").read_text()
    assert (await gw.registry.get("node-1")).firmware == "1.1.0"


async def test_ota_app_files_that_crash_are_abandoned_for_the_previous_copy(
        gw: Any, start_node: Callable[..., Any], tmp_path: Path) -> None:
    import shutil

    node = await start_node("node-1", ota_partitions=False)
    await eventually(lambda: gw.registry.get("node-1"), lambda d: d is not None and d.firmware == "1.0.0",
                     within=20)
    src = tmp_path / "release"
    shutil.copytree(FIRMWARE / "siteward", src / "siteward", ignore=shutil.ignore_patterns("__pycache__"))
    ver = src / "siteward" / "version.py"
    ver.write_text(ver.read_text().replace('VERSION = "1.0.0"', 'VERSION = "1.1.0"'))
    app = src / "siteward" / "app.py"
    app.write_text('raise RuntimeError("a broken build")\n' + app.read_text())
    fw = await _upload(gw, make_bundle(src, project="siteward-node", version="1.1.0"))
    c = await _campaign(gw, fw)
    n = await eventually(lambda: _node_state(gw, c.id), lambda n: n.state.value in ("success", "failed"), within=60)
    assert n.state.value == "failed" and "rolled_back" in (n.reason or ""), (n, node.output())
    assert "a broken build" in node.output()
    # the broken copy was tried once, then the confirmed one ran again; nothing points at the broken one
    assert not (node.root / "app_next").exists() and not (node.root / "app_trial").exists()
    assert not (node.root / "app_active").exists()
    assert (await gw.registry.get("node-1")).firmware == "1.0.0"
