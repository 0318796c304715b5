"""Rules in a running gateway: the embedded broker, MQTT clients as devices, a real SQLite file,
a real HTTP server for the webhook."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.app import Gateway
from tests.broker.rawmqtt import RawClient, publish_packet
from tests.fixtures.loopback import serving
from tests.helpers import client, eventually


@contextlib.asynccontextmanager
async def relay_node(gw: Any, device: str, *, answer: bool = True) -> AsyncIterator[list[dict[str, Any]]]:
    """A relay on MQTT: takes commands, reports its state with the command id (as Siteward nodes do)."""
    received: list[dict[str, Any]] = []
    pw = await gw.credentials.mint(device)
    async with client(gw, device, pw) as c:
        await c.subscribe(f"devices/{device}/command", qos=1)
        await c.publish(f"devices/{device}/status", json.dumps({"relay": "on"}), qos=1)

        async def serve() -> None:
            async for msg in c.messages:
                cmd = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                received.append(cmd)
                if answer:
                    state = cmd["args"].get("state")
                    await c.publish(f"devices/{device}/status", json.dumps({"cmd_id": cmd["id"], "relay": state}),
                                    qos=1)

        task = asyncio.create_task(serve())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def runs_of(gw: Any, **kw: Any) -> list[Any]:
    return await gw.rules.actuator.runs(**kw)


async def test_automation_command_reaches_the_device_and_its_confirmation_is_recorded(make_settings) -> None:
    rules = {"threshold": [{
        "id": "freezer-warm", "target": {"device": "fr-1"}, "metric": "temperature", "above": -15, "hysteresis": 2,
        "severity": "critical",
        "actions": [{"when": "fire", "device": "relay-1", "command": "relay", "args": {"state": "off"},
                     "cooldown_s": 600},
                    {"when": "clear", "device": "relay-1", "command": "relay", "args": {"state": "on"},
                     "cooldown_s": 0}]}]}
    async with Gateway(make_settings(rules=rules)) as gw, relay_node(gw, "relay-1") as got:
        pw = await gw.credentials.mint("fr-1")
        async with client(gw, "fr-1", pw) as sensor:
            await sensor.publish("devices/fr-1/telemetry", json.dumps({"temperature": -10}), qos=1)
            runs = await eventually(lambda: runs_of(gw), lambda r: r and r[0].state == "confirmed")
            assert [(r.trigger, r.state, r.args) for r in runs] == [("fire", "confirmed", {"state": "off"})]
            assert got[0]["command"] == "relay" and got[0]["args"] == {"state": "off"}
            assert runs[0].detail["result"]["relay"] == "off"
            alert = (await gw.rules.alerts.query())[0]
            assert runs[0].alert_id == alert.id and alert.severity == "critical"

            # cleared, then warm again within the cooldown: the relay is switched back on, but not off again
            await sensor.publish("devices/fr-1/telemetry", json.dumps({"temperature": -18}), qos=1)
            await sensor.publish("devices/fr-1/telemetry", json.dumps({"temperature": -10}), qos=1)
            runs = await eventually(lambda: runs_of(gw), lambda r: len(r) == 3 and r[1].state != "sent"
                                    and r[1].state != "pending")
        assert [(r.trigger, r.state) for r in reversed(runs)] == [("fire", "confirmed"), ("clear", "confirmed"),
                                                                   ("fire", "skipped")]
        assert runs[0].detail["reason"] == "cooldown"
        audit = await gw.audit.query(action="rule.command")
        assert [(a.actor, a.target, a.detail["state"]) for a in audit] == [
            ("rule:freezer-warm", "relay-1", "sent"), ("rule:freezer-warm", "relay-1", "sent")]
        kinds = [e.kind for e in await gw.events.query(limit=100)]
        assert kinds.count("alert.raised") == 2 and kinds.count("alert.cleared") == 1
        assert kinds.count("command.confirmed") == 2


async def test_automation_failures_are_recorded(make_settings) -> None:
    rules = {"offline": [{
        "id": "gone", "target": {"device": "n-1"}, "for_s": 0,
        "actions": [{"device": "relay-9", "command": "relay", "args": {"state": "on"}},
                    {"device": "deaf-1", "command": "relay", "args": {"state": "on"}, "timeout_s": 0.2}]}]}
    async with Gateway(make_settings(rules=rules)) as gw, relay_node(gw, "deaf-1", answer=False):
        await gw.ingest.ingest_http("n-1", b'{"temperature": 1}')
        await gw.registry.set_online("n-1", False, "status offline (last will)")
        runs = await eventually(lambda: runs_of(gw), lambda r: len(r) == 2 and r[0].state == "timed_out", within=8)
        by_device = {r.device: r for r in runs}
        assert by_device["relay-9"].state == "refused" and "unknown device" in by_device["relay-9"].detail["error"]
        assert by_device["deaf-1"].state == "timed_out"


async def test_offline_via_last_will_raises_and_clears(make_settings) -> None:
    rules = {"offline": [{"id": "node-offline", "target": {"kind": "node"}, "for_s": 0}]}
    async with Gateway(make_settings(rules=rules)) as gw:
        pw = await gw.credentials.mint("node-7")
        node = await RawClient.connect(gw.broker.port, "node-7", username="node-7", password=pw, keepalive=30,
                                       will=("devices/node-7/status", b"offline", 1, True))
        node.send(publish_packet("devices/node-7/status", b"online", qos=0))
        await eventually(lambda: gw.registry.get("node-7"), lambda d: d is not None and d.online)
        node.close()  # power cut: no DISCONNECT, the broker sends the last will
        alerts = await eventually(lambda: gw.rules.alerts.query(), lambda a: bool(a))
        assert [(a.device, a.state) for a in alerts] == [("node-7", "active")]
        assert "last will" in alerts[0].message
        async with client(gw, "node-7", pw) as c:
            await c.publish("devices/node-7/telemetry", b'{"temperature": 20}', qos=1)
        alerts = await eventually(lambda: gw.rules.alerts.query(), lambda a: a[0].state == "cleared")
        assert alerts[0].clear_reason == "back online"


async def test_schedule_override_drives_a_relay_over_mqtt(make_settings) -> None:
    rules = {"schedule": [{"id": "lights", "target": {"device": "relay-1"},
                           "events": [{"at": "07:00", "state": "on"}, {"at": "19:00", "state": "off"}]}]}
    async with Gateway(make_settings(gateway={"timezone": "Europe/Berlin"}, rules=rules)) as gw, \
            relay_node(gw, "relay-1") as got:
        await eventually(lambda: gw.registry.get("relay-1"), lambda d: d is not None)
        await gw.rules.override("lights", state="off", until=None, by="tech", via={})
        runs = await eventually(lambda: runs_of(gw), lambda r: r and r[0].state == "confirmed")
        assert [(r.trigger, r.args) for r in runs] == [("override", {"state": "off"})]
        assert got == [{"id": runs[0].command_id, "command": "relay", "args": {"state": "off"}}]


async def test_restart_with_an_active_alert(make_settings) -> None:
    settings = make_settings(rules={"threshold": [
        {"id": "warm", "target": {"device": "fr-1"}, "metric": "temperature", "above": 5}]})
    async with Gateway(settings) as gw:
        await gw.ingest.ingest_http("fr-1", b'{"temperature": 9}')
        await gw.rules.settle()
        first = await gw.rules.alerts.query(state="open")
    async with Gateway(settings) as gw:
        assert [a.id for a in await gw.rules.alerts.query(state="open")] == [first[0].id]
        await gw.ingest.ingest_http("fr-1", b'{"temperature": 10}')
        await gw.rules.settle()
        assert len(await gw.rules.alerts.query()) == 1
        assert len(await gw.events.query(kind="alert.raised")) == 1
        await gw.ingest.ingest_http("fr-1", b'{"temperature": 1}')
        await gw.rules.settle()
        assert (await gw.rules.alerts.query())[0].state == "cleared"


async def test_local_webhook_retries_then_gives_up(make_settings) -> None:
    answers = [500, 503, 200, 500, 500, 500, 400]
    bodies: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        assert request.headers["Authorization"] == "Bearer site-secret"
        return web.Response(status=answers.pop(0))

    app = web.Application()
    app.router.add_post("/alerts", hook)
    async with serving(app) as base:
        rules = {"webhook": {"url": f"{base}/alerts", "retries": 2, "backoff_s": 0.01,
                             "headers": {"Authorization": "Bearer site-secret"}, "min_severity": "warning"},
                 "threshold": [{"id": "warm", "target": {"device": "fr-1"}, "metric": "temperature", "above": 5},
                               {"id": "info", "target": {"device": "fr-1"}, "metric": "humidity", "above": 50,
                                "severity": "info"}]}
        async with Gateway(make_settings(rules=rules)) as gw:
            await gw.ingest.ingest_http("fr-1", b'{"temperature": 9, "humidity": 60}')  # info is below min_severity
            wh = gw.rules.webhook
            await eventually(lambda: _ready(wh.delivered), lambda n: n == 1)
            await gw.ingest.ingest_http("fr-1", b'{"temperature": 1}')  # cleared: 500 x 3, given up
            await eventually(lambda: _ready(wh.failed), lambda n: n == 1)
            alert = (await gw.rules.alerts.query(state="cleared"))[0]
            await gw.ingest.ingest_http("fr-1", b'{"temperature": 9}')  # raised again: 400, not retried
            await eventually(lambda: _ready(wh.failed), lambda n: n == 2)
    assert [b["event"] for b in bodies] == ["alert.raised"] * 3 + ["alert.cleared"] * 3 + ["alert.raised"]
    assert bodies[3]["alert"]["id"] == alert.id and bodies[0]["gateway"] == "gw-test"
    assert answers == []
    assert gw.metrics.webhook_deliveries.labels(result="failed")._value.get() == 2


async def _ready(value: int) -> int:
    return value
