"""The OTA and flashing API on the real aiohttp server: upload, refusals, roles, campaigns,
node downloads with Range and tokens, and a USB flash job with progress over the WebSocket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from firmware.tools import manifest as mf
from firmware.tools.image import build_app_image, build_bootloader_image, build_partition_table
from tests.firmware.romsim import RomLoader
from tests.web.conftest import Site

pytestmark = pytest.mark.timeout(90)

IMAGE = build_app_image(version="1.5.0", payload_len=120_000)


@pytest.fixture
async def site(gw: Any) -> AsyncIterator[Site]:
    s = Site(gw)
    yield s
    await s.close()


async def upload(client: Any, data: bytes, name: str = "fw.bin", envelope: str | None = None) -> Any:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    if envelope is not None:
        form.add_field("envelope", envelope)
    return await client.call("POST", "/api/v1/ota/firmware", data=form)


async def test_upload_list_and_precise_refusals(site: Site) -> None:
    tech = await site.user("tina", "technician")
    r = await upload(tech, IMAGE)
    assert r.status == 201, r
    fw = r.json
    assert (fw["project"], fw["version"], fw["chip"], fw["kind"]) == ("siteward-node", "1.5.0", "esp32", "app")
    assert (await upload(tech, IMAGE)).status == 200  # same content again: not an error, not a duplicate
    for data, code in [(build_partition_table(), "partition_table"), (build_bootloader_image(), "bootloader"),
                       (IMAGE[:5000], "truncated"), (IMAGE[:9000] + b"\x00" + IMAGE[9001:], "checksum_mismatch"),
                       (build_app_image(version="1.5.0", payload_len=9000), "version_exists")]:
        r = await upload(tech, data)
        assert r.status in (409, 422) and r.json["error"] == code, (code, r)
    listed = (await tech.get("/api/v1/ota/firmware")).json["firmware"]
    assert [f["version"] for f in listed] == ["1.5.0"]
    refused = await site.audit("ota.firmware_refused")
    assert {e["detail"]["reason"] for e in refused} >= {"partition_table", "bootloader", "truncated"}
    viewer = await site.user("vic", "viewer")
    assert (await upload(viewer, IMAGE)).status == 403
    assert (await viewer.get("/api/v1/ota/firmware")).status == 200


async def test_raw_body_upload_with_a_presigned_manifest(site: Site, gw: Any) -> None:
    script = await site.script()
    m = mf.new_manifest(project="siteward-node", version="1.5.0", data=IMAGE, chip="esp32")
    env = mf.sign(m, await gw.ota.signing_key()).model_dump_json(exclude_none=True)
    r = await script.call("POST", "/api/v1/ota/firmware?filename=rel.bin", data=IMAGE,
                          headers={"Content-Type": "application/octet-stream", "X-Siteward-Manifest": env})
    assert r.status == 201 and r.json["presigned"], r
    other = build_app_image(version="1.6.0", payload_len=10_000)
    r = await script.call("POST", "/api/v1/ota/firmware", data=other,
                          headers={"Content-Type": "application/octet-stream", "X-Siteward-Manifest": env})
    assert r.status == 422 and r.json["error"] == "manifest_mismatch"


async def test_node_download_with_range_and_tokens(site: Site, gw: Any) -> None:
    tech = await site.user("tina", "technician")
    sha = (await upload(tech, IMAGE)).json["sha256"]
    url = gw.ota.download_url("node-1", sha)
    base = site.base
    async with aiohttp.ClientSession() as http:
        async with http.get(base + url) as r:
            body = await r.read()
            assert r.status == 200 and hashlib.sha256(body).hexdigest() == sha
            assert r.headers["Accept-Ranges"] == "bytes"
        async with http.get(base + url, headers={"Range": "bytes=100000-"}) as r:
            part = await r.read()
            assert r.status == 206 and part == IMAGE[100000:]
            assert r.headers["Content-Range"] == f"bytes 100000-{len(IMAGE) - 1}/{len(IMAGE)}"
        # another node's token, a forged one, none at all
        async with http.get(base + url.replace("device=node-1", "device=node-2")) as r:
            assert r.status == 403
        async with http.get(base + f"/ota/v1/images/{sha}.bin") as r:
            assert r.status == 401
        # HTTP Basic with the node's own MQTT credentials
        pw = await gw.credentials.mint("node-3")
        auth = "Basic " + base64.b64encode(f"node-3:{pw}".encode()).decode()
        async with http.get(base + f"/ota/v1/images/{sha}.bin", headers={"Authorization": auth}) as r:
            assert r.status == 200 and len(await r.read()) == len(IMAGE)
        bad = "Basic " + base64.b64encode(b"node-3:wrong").decode()
        async with http.get(base + f"/ota/v1/images/{sha}.bin", headers={"Authorization": bad}) as r:
            assert r.status == 401
    # a blocked version is no longer served
    await tech.post(f"/api/v1/ota/firmware/{sha}/block", {"reason": "field failures"})
    async with aiohttp.ClientSession() as http, http.get(base + url) as r:
        assert r.status == 410


async def test_campaign_api_and_audit(site: Site, gw: Any) -> None:
    tech = await site.user("tina", "technician")
    sha = (await upload(tech, IMAGE)).json["sha256"]
    await gw.registry.ensure("n1", profile="native")
    r = await tech.post("/api/v1/ota/campaigns", {"firmware": sha, "target": {"device": "n1"}, "canary": 0})
    assert r.status == 201, r
    cid = r.json["id"]
    assert r.json["nodes"][0]["device"] == "n1"
    assert (await tech.post("/api/v1/ota/campaigns", {"firmware": sha, "target": {"device": "n1"}})).status == 409
    bad = await tech.post("/api/v1/ota/campaigns", {"firmware": sha, "target": {"device": "n1", "model": "x"}})
    assert bad.status == 400
    assert (await tech.post(f"/api/v1/ota/campaigns/{cid}/pause")).json["state"] == "paused"
    assert (await tech.post(f"/api/v1/ota/campaigns/{cid}/resume")).json["state"] == "running"
    assert (await tech.post(f"/api/v1/ota/campaigns/{cid}/abort")).json["state"] == "aborted"
    hist = (await tech.get(f"/api/v1/ota/campaigns/{cid}/history")).json["history"]
    assert [h["state"] for h in hist if h["device"] is None][:2] == ["campaign.running", "campaign.paused"]
    actions = [e["action"] for e in await site.audit()]
    for a in ("ota.firmware_upload", "ota.campaign_create", "ota.campaign_pause", "ota.campaign_resume",
              "ota.campaign_abort"):
        assert a in actions
    key = (await tech.get("/api/v1/ota/key")).json
    assert key["public_key"] == await gw.ota.public_key()


async def test_flash_job_over_the_api_with_progress_on_the_live_feed(site: Site, gw: Any) -> None:
    tech = await site.user("tina", "technician")
    sha = (await upload(tech, IMAGE)).json["sha256"]
    sim = RomLoader()
    sim.start()
    events: list[dict[str, Any]] = []
    try:
        async with tech.http.ws_connect(site.base + "/api/v1/live", headers={"Origin": site.base}) as ws:
            r = await tech.post("/api/v1/ota/flash", {"port": sim.port, "firmware": sha})
            assert r.status == 202, r
            job = r.json["job"]
            assert (await tech.post("/api/v1/ota/flash", {"port": sim.port, "firmware": sha})).status == 409
            async for msg in ws:
                ev = json.loads(msg.data)
                if ev.get("type") == "flash":
                    events.append(ev)
                    if ev["state"] in ("done", "failed"):
                        break
        assert events[-1]["state"] == "done", events[-1]
        progress = [e["progress"] for e in events if e["progress"] is not None]
        assert progress[-1] == 100 and len(set(progress)) >= 4 and progress == sorted(progress)
        assert bytes(sim.flash[0x10000:0x10000 + len(IMAGE)]) == IMAGE
        assert (await tech.get(f"/api/v1/ota/flash/{job}")).json["state"] == "done"
        # the board unplugged: the job ends failed with the installer's sentence
        sim.stop()
        r = await tech.post("/api/v1/ota/flash", {"port": sim.port, "firmware": sha})
        job = r.json["job"]
        for _ in range(200):
            j = (await tech.get(f"/api/v1/ota/flash/{job}")).json
            if j["state"] in ("done", "failed"):
                break
            await asyncio.sleep(0.05)
        assert j["state"] == "failed" and j["error"] == "port_missing"
    finally:
        sim.stop()
    viewer = await site.user("vic", "viewer")
    assert (await viewer.post("/api/v1/ota/flash", {"port": "/dev/ttyUSB0", "firmware": sha})).status == 403


async def test_flash_an_uploaded_merged_image_for_a_new_board(site: Site, gw: Any) -> None:
    """A full-flash image is what a new board needs; the OTA registry refuses it, flashing takes it."""
    merged = bytearray(b"\xff" * 0xF000)
    boot, table = build_bootloader_image(), build_partition_table()
    merged[0:len(boot)] = boot
    merged[0x7000:0x7000 + len(table)] = table
    merged += IMAGE
    tech = await site.user("tina", "technician")
    sim = RomLoader()
    sim.start()
    try:
        form = aiohttp.FormData()
        form.add_field("port", sim.port)
        form.add_field("erase", "true")
        form.add_field("file", bytes(merged), filename="ESP32_GENERIC-siteward.bin")
        r = await tech.call("POST", "/api/v1/ota/flash", data=form)
        assert r.status == 202, r
        job = r.json["job"]
        for _ in range(400):
            j = (await tech.get(f"/api/v1/ota/flash/{job}")).json
            if j["state"] in ("done", "failed"):
                break
            await asyncio.sleep(0.05)
        assert j["state"] == "done", j
        assert bytes(sim.flash[0x1000:0x1000 + len(merged)]) == bytes(merged) and "ERASE_FLASH" in sim.commands
    finally:
        sim.stop()
    entry = (await site.audit("ota.flash"))[0]
    assert entry["detail"]["file"] == "ESP32_GENERIC-siteward.bin" and entry["detail"]["erase"] is True
