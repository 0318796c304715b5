"""External mode: a real mosquitto carries the traffic, Siteward ingests as a subscriber."""

from __future__ import annotations

import asyncio
import json

import aiomqtt

from gateway.app import Gateway
from gateway.broker.external import subscription_filters
from gateway.models import CommandRequest
from tests.fixtures.mqtt_brokers import Mosquitto
from tests.helpers import count_readings, eventually


def test_profile_routes_become_subscription_filters() -> None:
    assert subscription_filters(["devices/{device}/telemetry", "SensorData/#", "devices/{device}/telemetry"]) == [
        "devices/+/telemetry", "SensorData/#"]


async def test_ingest_through_mosquitto_survives_a_siteward_restart(make_settings, mosquitto: Mosquitto) -> None:
    settings = make_settings(broker={"mode": "external", "external_port": mosquitto.port},
                             gateway={"id": "gw-ext"})
    node = aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="ext-node-1")
    async with node:
        async with Gateway(settings) as gw:
            await node.publish("devices/ext-node-1/telemetry", b'{"temperature": 7.5}', qos=1)
            n = await eventually(lambda: count_readings(gw, "ext-node-1"), lambda c: c == 1)
            assert n == 1
            # commands go out through mosquitto too
            await node.subscribe("devices/ext-node-1/command", qos=1)
            await asyncio.sleep(0.2)
            cmd = await gw.commander.send("ext-node-1", CommandRequest(command="identify"), actor="t")
            msg = await asyncio.wait_for(anext(node.messages), 5)
            assert json.loads(msg.payload)["id"] == cmd.id
        # Siteward is down: mosquitto keeps its persistent session's messages
        for i in range(5):
            await node.publish("devices/ext-node-1/telemetry", json.dumps({"temperature": i}), qos=1)
        async with Gateway(settings) as gw:
            n = await eventually(lambda: count_readings(gw, "ext-node-1"), lambda c: c == 6)
            assert n == 6
