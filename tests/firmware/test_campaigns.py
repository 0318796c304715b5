"""Rollout campaigns on the real gateway, with simulated nodes speaking MQTT to the real broker.

The simulated nodes verify every manifest they get with the gateway's public key and answer
with the status messages a node sends; how each one behaves (succeeds, fails, stays silent,
comes back on its old firmware) is the test's choice. Timeouts are driven by calling the
campaign check with a later "now", not by waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
from aiohttp import web

from firmware.tools import manifest as mf
from firmware.tools.image import build_app_image
from gateway.ota.service import CampaignRequest, OtaError, Target
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

IMAGE = build_app_image(version="2.0.0", payload_len=16_000)


class SimNode:
    def __init__(self, gw: Any, device: str, behaviour: str, *, profile: str = "native", fw: str = "1.0.0") -> None:
        self.gw, self.device, self.behaviour, self.profile, self.fw = gw, device, behaviour, profile, fw
        self.manifests: list[mf.Manifest] = []
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    @property
    def ota_topic(self) -> str:
        return f"devices/{self.device}/ota" if self.profile == "native" else f"OTA/{self.device}/update"

    @property
    def status_topic(self) -> str:
        return f"devices/{self.device}/ota/status" if self.profile == "native" else f"OTA/{self.device}/response"

    async def run(self, password: str) -> None:
        async with aiomqtt.Client("127.0.0.1", self.gw.broker.port, identifier=self.device, username=self.device,
                                  password=password) as c:
            await c.subscribe(self.ota_topic, qos=1)
            if self.profile == "native":
                await c.publish(f"devices/{self.device}/health", json.dumps(
                    {"fw": self.fw, "model": "siteward-node", "uptime": 1000, "heap": 1}), qos=1)
            else:
                await c.publish(f"smartplug/{self.device}/telemetry", json.dumps({"power": 5}), qos=1)
            self.ready.set()
            async for msg in c.messages:
                env = mf.Envelope.model_validate_json(bytes(msg.payload))  # type: ignore[arg-type]
                m = mf.verify(env, [(await self.gw.ota.signing_key()).public_key()])
                self.manifests.append(m)
                await self.answer(c, m)

    async def answer(self, c: aiomqtt.Client, m: mf.Manifest) -> None:
        pub = lambda body: c.publish(self.status_topic, json.dumps(body), qos=1)  # noqa: E731
        b = self.behaviour
        if b == "silent":
            return
        if b == "nonsense":
            await pub({"state": "EXPLODED", "progress": 250})
            return
        await pub({"state": "STARTED" if self.profile == "native" else "started"})
        if b == "fail":
            await pub({"state": "FAILED", "reason": "sha256_mismatch"})
            return
        await pub({"state": "IN_PROGRESS", "progress": 50})
        await pub({"state": "IN_PROGRESS", "progress": 100, "phase": "rebooting"})
        if b == "hang":
            return  # rebooted and never came back to confirm
        if b == "rollback":
            await c.publish(f"devices/{self.device}/health", json.dumps({"fw": self.fw, "uptime": 0, "heap": 1}),
                            qos=1)
            return
        if self.profile == "native":
            await c.publish(f"devices/{self.device}/health", json.dumps({"fw": m.version, "uptime": 2, "heap": 1}),
                            qos=1)
            await pub({"state": "SUCCESS", "version": m.version})
        else:
            await pub({"status": "success"})


@pytest.fixture
async def fleet(gw: Any) -> AsyncIterator[Any]:
    nodes: list[SimNode] = []

    async def add(device: str, behaviour: str = "ok", **kw: Any) -> SimNode:
        n = SimNode(gw, device, behaviour, **kw)
        pw = await gw.credentials.mint(device, (n.profile,))
        if n.profile != "native":
            await gw.registry.ensure(device, profile=n.profile)
        n.task = asyncio.create_task(n.run(pw))
        await asyncio.wait_for(n.ready.wait(), 10)
        await eventually(lambda: gw.registry.get(device), lambda d: d is not None and d.online)
        nodes.append(n)
        return n

    yield add
    for n in nodes:
        assert n.task is not None
        n.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await n.task


async def _fw(gw: Any, data: bytes = IMAGE) -> Any:
    fw, _ = await gw.ota.upload(data, filename="fw.bin", actor="test")
    return fw


async def _wait_closed(gw: Any, cid: str, states: tuple[str, ...] = ("completed", "paused", "aborted")) -> Any:
    return await eventually(lambda: gw.ota.campaigns.get(cid), lambda c: c.state.value in states, within=20)


async def test_canary_first_then_the_rest_within_max_concurrent(gw: Any, fleet: Any) -> None:
    for i in range(5):
        await fleet(f"n{i}")
    fw = await _fw(gw)
    seen_in_flight: list[int] = []
    inner = gw.ota.campaigns.transition

    async def watch(c: Any, n: Any, state: Any, **kw: Any) -> None:
        await inner(c, n, state, **kw)
        seen_in_flight.append(sum(1 for x in c.nodes.values() if x.state.value in ("sent", "started",
                                                                                  "in_progress", "rebooting")))
        if n.state.value == "sent" and not n.canary:
            assert all(x.state.value == "success" for x in c.nodes.values() if x.canary)

    gw.ota.campaigns.transition = watch
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(model="siteward-node"),
                                                     canary=1, max_concurrent=2), actor="tech")
    assert len(c.nodes) == 5 and sum(n.canary for n in c.nodes.values()) == 1
    done = await _wait_closed(gw, c.id)
    assert done.state.value == "completed" and done.counts()["success"] == 5
    assert max(seen_in_flight) <= 2
    history = await gw.ota.campaigns.history(c.id)
    assert [h["state"] for h in history if h["device"] == "n0"] == ["sent", "started", "in_progress", "rebooting",
                                                                     "success"]
    results = await gw.events.query(kind="ota.result")
    assert len(results) == 5


async def test_failures_over_the_threshold_pause_and_resume_acknowledges(gw: Any, fleet: Any) -> None:
    await fleet("a1", "fail")
    await fleet("a2", "fail")
    await fleet("a3")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["a1", "a2", "a3"]),
                                                     max_concurrent=1, max_failures=1), actor="tech")
    paused = await _wait_closed(gw, c.id)
    assert paused.state.value == "paused" and "exceed the threshold" in paused.reason
    assert paused.nodes["a1"].reason == "sha256_mismatch" and paused.nodes["a3"].state.value == "pending"
    await gw.ota.control(c.id, "resume", actor="tech")
    done = await _wait_closed(gw, c.id, ("completed",))
    assert done.nodes["a3"].state.value == "success"


async def test_failed_canary_pauses_and_holds_the_rest(gw: Any, fleet: Any) -> None:
    await fleet("c1", "fail")
    await fleet("c2")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["c1", "c2"]),
                                                     canary=1, max_failures=5), actor="tech")
    paused = await _wait_closed(gw, c.id)
    assert paused.state.value == "paused" and "canary c1 failed" in paused.reason
    assert paused.nodes["c2"].state.value == "pending"


async def test_abort_stops_what_was_not_sent(gw: Any, fleet: Any) -> None:
    await fleet("s1", "silent")
    await fleet("s2")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["s1", "s2"]),
                                                     max_concurrent=1), actor="tech")
    await eventually(lambda: gw.ota.campaigns.get(c.id), lambda c: c.nodes["s1"].state.value == "sent")
    c = await gw.ota.control(c.id, "abort", actor="tech")
    assert c.state.value == "aborted" and c.nodes["s2"].state.value == "aborted"
    with pytest.raises(OtaError) as err:
        await gw.ota.control(c.id, "resume", actor="tech")
    assert err.value.status == 409


async def test_timeouts_never_started_and_never_confirmed(gw: Any, fleet: Any) -> None:
    await fleet("t1", "silent")
    await fleet("t2", "hang")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["t1", "t2"]),
                                                     max_concurrent=2, max_failures=5), actor="tech")
    await eventually(lambda: gw.ota.campaigns.get(c.id), lambda c: c.nodes["t2"].state.value == "rebooting")
    async with gw.ota._lock:
        await gw.ota.campaigns.check(c, time.time() + 100_000)
    assert c.nodes["t1"].state.value == "failed" and "never started" in c.nodes["t1"].reason
    assert c.nodes["t2"].state.value == "failed" and "never confirmed" in c.nodes["t2"].reason
    assert c.state.value == "completed"


async def test_node_back_on_old_firmware_is_a_rollback_failure(gw: Any, fleet: Any) -> None:
    await fleet("r1", "rollback")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="r1")), actor="tech")
    n = await eventually(lambda: gw.ota.campaigns.get(c.id), lambda c: c.nodes["r1"].state.value == "failed")
    assert "rolled back to 1.0.0" in n.nodes["r1"].reason


async def test_two_campaigns_for_one_node_are_refused(gw: Any, fleet: Any) -> None:
    await fleet("b1", "silent")
    fw = await _fw(gw)
    await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="b1")), actor="tech")
    fw2 = await _fw(gw, build_app_image(version="2.1.0", payload_len=8000))
    with pytest.raises(OtaError) as err:
        await gw.ota.create_campaign(CampaignRequest(firmware=fw2.sha256, target=Target(device="b1")), actor="tech")
    assert err.value.code == "node_busy" and err.value.status == 409


async def test_blocked_version_is_never_rolled_out(gw: Any, fleet: Any) -> None:
    await fleet("k1", "silent")
    await fleet("k2")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["k1", "k2"]),
                                                     max_concurrent=1), actor="tech")
    await gw.ota.block(fw.sha256, True, "bricks relays", actor="tech")
    paused = await gw.ota.campaigns.get(c.id)
    assert paused.state.value == "paused" and "blocked" in paused.reason and paused.nodes["k2"].state.value == "pending"
    with pytest.raises(OtaError) as err:
        await gw.ota.control(c.id, "resume", actor="tech")
    assert err.value.code == "firmware_blocked"
    await gw.ota.control(c.id, "abort", actor="tech")
    with pytest.raises(OtaError) as err:
        await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="k2")), actor="tech")
    assert err.value.code == "firmware_blocked"


async def test_nonsense_and_unexpected_status_are_counted_and_ignored(gw: Any, fleet: Any) -> None:
    n = await fleet("x1", "nonsense")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="x1")), actor="tech")
    await eventually(lambda: asyncio.sleep(0, gw.ota.counters["status_rejected"]), lambda v: v >= 1)
    assert gw.ota.counters["status_rejected"] == 1 and n.manifests
    assert (await gw.ota.campaigns.get(c.id)).nodes["x1"].state.value == "sent"
    # a SUCCESS from a node no campaign is waiting for
    pw = await gw.credentials.mint("x2")
    async with aiomqtt.Client("127.0.0.1", gw.broker.port, identifier="x2", username="x2", password=pw) as cl:
        await cl.publish("devices/x2/ota/status", json.dumps({"state": "SUCCESS", "version": "9.9.9"}), qos=1)
    assert gw.ota.counters["status_unexpected"] == 1


async def test_already_up_to_date_nodes_are_skipped(gw: Any, fleet: Any) -> None:
    await fleet("u1", fw="2.0.0")
    await fleet("u2", fw="3.0.0")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["u1", "u2"])),
                                     actor="tech")
    done = await _wait_closed(gw, c.id)
    assert done.counts()["skipped"] == 2 and done.state.value == "completed"


async def test_seed_style_smartplug_topics(gw: Any, fleet: Any) -> None:
    n = await fleet("plug-1", profile="smartplug")
    fw = await _fw(gw)
    c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="plug-1")),
                                     actor="tech")
    done = await _wait_closed(gw, c.id)
    assert done.nodes["plug-1"].state.value == "success" and n.manifests[0].device == "plug-1"


async def test_rollout_from_the_cloud_with_a_presigned_manifest(make_settings: Any, tmp_path: Any) -> None:
    """The cloud entry point: a release key's signed manifest + URL; the gateway fetches, checks, rolls out."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.app import Gateway

    release = Ed25519PrivateKey.generate()
    settings = make_settings(ota={"trusted_keys": [mf.public_b64(release.public_key())], "tick_s": 0.1})
    image = build_app_image(version="3.0.0", payload_len=30_000)
    hits: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/bad.bin":
            return web.Response(body=image[:-1] + b"\x00")
        return web.Response(body=image)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with Gateway(settings) as gw:
            await gw.registry.ensure("m1", profile="native")
            await gw.registry.apply_attributes("m1", {"model": "siteward-node"})
            m = mf.new_manifest(project="siteward-node", version="3.0.0", data=image, chip="esp32")
            env = mf.sign(m, release)
            c = await gw.ota.rollout_from_cloud(env.model_dump(exclude_none=True), f"http://127.0.0.1:{port}/fw.bin")
            assert list(c.nodes) == ["m1"] and c.target == {"model": "siteward-node"}
            fw = await gw.ota.registry.get(m.sha256)
            assert fw is not None and fw.presigned and fw.source == "presigned"
            with pytest.raises(OtaError) as err:
                await gw.ota.rollout_from_cloud(env.model_dump(), f"http://127.0.0.1:{port}/bad.bin")
            assert err.value.code == "sha256_mismatch"
            rogue = mf.sign(m, Ed25519PrivateKey.generate())
            with pytest.raises(OtaError) as err:
                await gw.ota.rollout_from_cloud(rogue.model_dump(), f"http://127.0.0.1:{port}/fw.bin")
            assert err.value.code == "bad_signature" and hits.count("/fw.bin") == 1  # refused before fetching
    finally:
        await runner.cleanup()


async def test_a_gateway_restart_resumes_open_campaigns(make_settings: Any) -> None:
    from gateway.app import Gateway

    settings = make_settings(ota={"tick_s": 0.1})
    async with Gateway(settings) as gw:
        for d in ("p1", "p2"):
            await gw.registry.ensure(d, profile="native")
        fw, _ = await gw.ota.upload(IMAGE, filename="fw.bin", actor="test")
        c = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(devices=["p1", "p2"]),
                                                         canary=1), actor="tech")
        await gw.ota.control(c.id, "pause", actor="tech")
    async with Gateway(settings) as gw:
        again = gw.ota.campaigns.open[c.id]
        assert again.state.value == "paused" and again.canary == 1 and set(again.nodes) == {"p1", "p2"}
        assert again.nodes["p1"].canary and not again.nodes["p2"].canary
        assert gw.metrics.ota_campaigns_open._value.get() == 1
        await gw.ota.control(c.id, "abort", actor="tech")
        assert c.id not in gw.ota.campaigns.open and (await gw.ota.campaigns.get(c.id)).state.value == "aborted"
        # a second campaign for the same nodes is allowed once the first is closed
        c2 = await gw.ota.create_campaign(CampaignRequest(firmware=fw.sha256, target=Target(device="p1")),
                                          actor="tech")
        assert c2.id != c.id
