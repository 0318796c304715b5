"""Commands from the cloud: through the sync process's queue, executed by the gateway on the
node via the local broker, results back on ``…/up/command_result``; invalid or
unauthorised ones answered with an error and never executed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from tests.fixtures.loopback import serving
from tests.helpers import client
from tests.sync.cloud import CloudBroker, CloudConsumer
from tests.sync.conftest import GATEWAY_ID, cloud_section, running_sync
from tests.sync.pki import Pki

DOWN = f"siteward/{GATEWAY_ID}/down/command"


@contextlib.asynccontextmanager
async def node(gw: Any, device: str) -> AsyncIterator[list[dict[str, Any]]]:
    """A node that obeys: every command it receives is answered with its new state."""
    got: list[dict[str, Any]] = []
    pw = await gw.credentials.mint(device)
    async with client(gw, device, pw) as c:
        await c.subscribe(f"devices/{device}/command", qos=1)
        await c.publish(f"devices/{device}/status", b'{"relay": "off"}', qos=1)

        async def obey() -> None:
            async for m in c.messages:
                body = json.loads(m.payload)  # type: ignore[arg-type]
                got.append(body)
                await c.publish(f"devices/{device}/status",
                                json.dumps({"relay": body["args"].get("state", "on"), "cmd_id": body["id"]}), qos=1)

        task = asyncio.create_task(obey())
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def cloud_publisher(cloud: CloudBroker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", cloud.plain_port, identifier="cloud-commander") as c:
        yield c


def results_for(consumer: CloudConsumer, qid: str) -> list[dict[str, Any]]:
    return [r for r in consumer.seen.results if r["id"] == qid]


@pytest.fixture
async def site(make_settings, cloud: CloudBroker, pki: Pki, consumer: CloudConsumer) -> AsyncIterator[Any]:
    from gateway.app import Gateway

    s = make_settings(cloud=cloud_section(cloud, pki))
    async with Gateway(s) as gw, running_sync(s) as svc:
        await consumer.wait_for(lambda: svc.figures.connected, within=15, what="the uplink")
        yield gw, svc


async def test_command_round_trip(site: Any, cloud: CloudBroker, consumer: CloudConsumer) -> None:
    gw, _svc = site
    async with node(gw, "relay-7") as got, cloud_publisher(cloud) as pub:
        await pub.publish(f"{DOWN}/cmd-001", json.dumps(
            {"device": "relay-7", "command": "relay", "args": {"state": "on"}}), qos=1)
        await consumer.wait_for(lambda: any(r["status"] == "confirmed" for r in results_for(consumer, "cmd-001")),
                                what="confirmation")
        assert len(got) == 1 and got[0]["command"] == "relay" and got[0]["args"] == {"state": "on"}
    statuses = [r["status"] for r in results_for(consumer, "cmd-001")]
    assert {"queued", "sent", "confirmed"} <= set(statuses)
    done = next(r for r in results_for(consumer, "cmd-001") if r["status"] == "confirmed")
    assert done["device"] == "relay-7" and done["result"]["relay"] == "on"
    cmd = await gw.commander.get(done["command_id"])
    assert cmd is not None and cmd.state == "confirmed"
    # the events lane also carries the command's life, as for commands sent locally
    kinds = {e["kind"] for e in consumer.seen.events.values()}
    assert {"command.sent", "command.confirmed"} <= kinds


BAD: list[tuple[str, bytes, str]] = [
    ("bad-json", b"{not json", "invalid"),
    ("bad-shape", json.dumps({"device": "relay-8", "command": "Relay!!"}).encode(), "invalid"),
    ("extra-key", json.dumps({"device": "relay-8", "command": "relay", "sudo": True}).encode(), "invalid"),
    ("deep", json.dumps({"device": "relay-8", "command": "relay",
                         "args": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}).encode(), "invalid"),
    ("other-id", json.dumps({"id": "x-1", "device": "relay-8", "command": "relay"}).encode(), "invalid"),
    ("stranger", json.dumps({"device": "not-ours", "command": "relay"}).encode(), "unknown_device"),
    ("ignored", json.dumps({"device": "ignored-1", "command": "relay"}).encode(), "device_ignored"),
    ("stale", json.dumps({"device": "relay-8", "command": "relay", "expires_at": time.time() - 60}).encode(),
     "expired"),
]


async def test_invalid_or_unauthorised_commands_are_refused_never_executed(
        site: Any, cloud: CloudBroker, consumer: CloudConsumer) -> None:
    gw, svc = site
    await gw.registry.ensure("ignored-1", profile="native")
    await gw.registry.ignore("ignored-1")
    async with node(gw, "relay-8") as got, cloud_publisher(cloud) as pub:
        for qid, payload, _ in BAD:
            await pub.publish(f"{DOWN}/{qid}", payload, qos=1)
        await pub.publish(f"{DOWN}/bad id with spaces", b"{}", qos=1)  # no usable id: dropped, counted
        for qid, _, code in BAD:
            await consumer.wait_for(lambda q=qid: results_for(consumer, q), what=f"an answer to {qid}")
            res = results_for(consumer, qid)
            assert [r["status"] for r in res] == ["rejected"], res
            assert res[0]["error"]["code"] == code, res
        await asyncio.sleep(0.5)  # give a wrongly queued command time to reach the node
        assert got == []
    rows = await gw.db.fetchall("SELECT count(*) FROM commands")
    assert rows[0][0] == 0
    assert svc.downlink.rejected == len(BAD) + 1


async def test_same_command_id_executes_once(site: Any, cloud: CloudBroker, consumer: CloudConsumer) -> None:
    gw, _svc = site
    body = json.dumps({"device": "relay-9", "command": "relay", "args": {"state": "on"}})
    async with node(gw, "relay-9") as got, cloud_publisher(cloud) as pub:
        await pub.publish(f"{DOWN}/once-1", body, qos=1)
        await consumer.wait_for(lambda: any(r["status"] == "confirmed" for r in results_for(consumer, "once-1")),
                                what="confirmation")
        await pub.publish(f"{DOWN}/once-1", body, qos=1)  # the cloud retries (or the broker re-delivers)
        await consumer.wait_for(lambda: len(results_for(consumer, "once-1")) >= 4, what="the repeated answer")
        await asyncio.sleep(0.5)
    assert len(got) == 1


async def test_commands_allow_list(make_settings, cloud: CloudBroker, pki: Pki, consumer: CloudConsumer) -> None:
    from gateway.app import Gateway

    s = make_settings(cloud=cloud_section(cloud, pki, downlink_commands=["identify"]))
    async with Gateway(s) as gw, running_sync(s) as svc:
        await consumer.wait_for(lambda: svc.figures.connected, within=15, what="the uplink")
        async with node(gw, "relay-10") as got, cloud_publisher(cloud) as pub:
            await pub.publish(f"{DOWN}/al-1", json.dumps({"device": "relay-10", "command": "relay"}), qos=1)
            await consumer.wait_for(lambda: results_for(consumer, "al-1"), what="an answer")
            await asyncio.sleep(0.3)
        assert results_for(consumer, "al-1")[0]["error"]["code"] == "not_allowed"
        assert got == []


async def test_command_sent_while_the_uplink_was_down(make_settings, cloud: CloudBroker, pki: Pki,
                                                      consumer: CloudConsumer) -> None:
    """The broker keeps the gateway's session: a command sent meanwhile runs when it is back."""
    from gateway.app import Gateway

    s = make_settings(cloud=cloud_section(cloud, pki))
    async with Gateway(s) as gw, node(gw, "relay-11") as got:
        async with running_sync(s) as svc:
            await consumer.wait_for(lambda: svc.figures.connected, within=15, what="the uplink")
        async with cloud_publisher(cloud) as pub:
            await pub.publish(f"{DOWN}/late-1", json.dumps({"device": "relay-11", "command": "relay",
                                                            "args": {"state": "on"}}), qos=1)
        await asyncio.sleep(0.3)
        assert got == []
        async with running_sync(s):
            await consumer.wait_for(lambda: any(r["status"] == "confirmed" for r in results_for(consumer, "late-1")),
                                    what="the late command's confirmation")
        assert len(got) == 1


async def test_ota_rollout_from_the_cloud(make_settings, cloud: CloudBroker, pki: Pki,
                                          consumer: CloudConsumer) -> None:
    """The cloud starts a rollout: a command to the gateway itself with a release-signed manifest
    and a URL; the gateway fetches and checks the image, opens the campaign and answers with it.
    A bad image, bad args or a command the gateway does not run are answered, never executed."""
    from aiohttp import web
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.tools import manifest as mf
    from firmware.tools.image import build_app_image
    from gateway.app import Gateway

    release = Ed25519PrivateKey.generate()
    image = build_app_image(version="3.0.0", payload_len=30_000)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=image if request.path == "/fw.bin" else image[:-1] + b"\x00")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    s = make_settings(cloud=cloud_section(cloud, pki),
                      ota={"trusted_keys": [mf.public_b64(release.public_key())], "tick_s": 0.1})
    async with serving(app) as base, Gateway(s) as gw, running_sync(s) as svc, cloud_publisher(cloud) as pub:
        await consumer.wait_for(lambda: svc.figures.connected, within=15, what="the uplink")
        await gw.registry.ensure("m1", profile="native")
        await gw.registry.apply_attributes("m1", {"model": "siteward-node"})
        env = mf.sign(mf.new_manifest(project="siteward-node", version="3.0.0", data=image, chip="esp32"),
                      release).model_dump(exclude_none=True)

        def rollout(qid: str, **args: Any) -> Any:
            return pub.publish(f"{DOWN}/{qid}", json.dumps(
                {"device": GATEWAY_ID, "command": "ota_rollout", "args": args}), qos=1)

        await rollout("ota-1", manifest=env, url=f"{base}/fw.bin", canary=1)
        await rollout("ota-bad-image", manifest=env, url=f"{base}/flipped.bin")
        await rollout("ota-no-url", manifest=env)
        await pub.publish(f"{DOWN}/gw-reboot", json.dumps({"device": GATEWAY_ID, "command": "reboot"}), qos=1)

        def final(qid: str) -> dict[str, Any] | None:
            return next((r for r in results_for(consumer, qid)
                         if r["status"] in ("confirmed", "failed", "rejected", "timed_out")), None)

        await consumer.wait_for(lambda: all(final(q) for q in ("ota-1", "ota-bad-image", "ota-no-url",
                                                                "gw-reboot")), within=30, what="four answers")
        ok = final("ota-1")
        assert ok is not None and ok["status"] == "confirmed", results_for(consumer, "ota-1")
        assert ok["device"] == GATEWAY_ID and ok["result"]["nodes"] == 1
        campaign = await gw.ota.campaigns.get(ok["result"]["campaign"])
        assert campaign is not None and list(campaign.nodes) == ["m1"] and campaign.canary == 1
        assert {"queued", "sent"} <= {r["status"] for r in results_for(consumer, "ota-1")}

        bad = final("ota-bad-image")
        assert bad is not None and bad["status"] == "failed"
        assert bad["result"]["error"]["code"] == "sha256_mismatch"
        for qid, code in (("ota-no-url", "invalid"), ("gw-reboot", "not_allowed")):
            answer = final(qid)
            assert answer is not None and answer["status"] == "rejected" and answer["error"]["code"] == code
        # one campaign: the refused ones opened none
        rows = await gw.db.fetchall("SELECT count(*) FROM ota_campaigns")
        assert rows[0][0] == 1
