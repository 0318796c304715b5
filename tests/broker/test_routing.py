"""Routing: only to matching subscribers, through the index, at QoS = min(publish, subscription)."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.broker import EmbeddedBroker, Principal
from tests.broker.conftest import RecordingHooks, Target
from tests.broker.rawmqtt import PUBLISH, RawClient

pytestmark = pytest.mark.timeout(30)


async def _first_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(5):
        async for m in client.messages:
            return m
    raise AssertionError("no message")


@pytest.mark.parametrize(("pub_qos", "sub_qos", "expected"), [(0, 1, 0), (1, 0, 0), (1, 1, 1)])
async def test_delivered_qos_is_the_minimum(
    any_broker: Target, pub_qos: int, sub_qos: int, expected: int
) -> None:
    """amqtt 0.12.1 delivers a QoS 0 publish to a QoS 1 subscription as QoS 1; mosquitto does not."""
    topic = f"qos/{any_broker.name}/{pub_qos}{sub_qos}"
    async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=f"sub-{topic}") as sub:
        await sub.subscribe(topic, qos=sub_qos)
        async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=f"pub-{topic}") as pub:
            await pub.publish(topic, b"x", qos=pub_qos)
        m = await _first_message(sub)
        assert m.qos == expected


async def test_routes_only_to_matching_subscribers_of_many(broker: EmbeddedBroker) -> None:
    nodes = [await RawClient.connect(broker.port, f"node{i}") for i in range(60)]
    for i, c in enumerate(nodes):
        assert await c.subscribe([(f"devices/node{i}/command", 1), (f"devices/node{i}/ota", 1)]) == [1, 1]
    wildcard = await RawClient.connect(broker.port, "ui")
    assert await wildcard.subscribe([("devices/+/command", 0), ("devices/#", 1)]) == [0, 1]
    assert broker.stats()["subscriptions"] == 122
    await broker.publish("devices/node7/command", b"on", qos=1)
    got = await nodes[7].expect(PUBLISH)
    assert (got.topic, got.payload, got.qos) == ("devices/node7/command", b"on", 1)
    # a client matching through two filters gets the message once, at the higher QoS
    w = await wildcard.expect(PUBLISH)
    assert (w.payload, w.qos) == (b"on", 1)
    for i, c in enumerate(nodes):
        assert await c.ping() == [], i  # routing is synchronous: anything sent is there already
    assert await wildcard.ping() == []


async def test_dollar_topics_not_matched_by_leading_wildcards(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.users["ops"] = ("pw", Principal("ops", None, publish=("#",), subscribe=("#", "$SYS/#")))
    everything = await RawClient.connect(broker.port, "all", username="ops", password="pw")
    assert await everything.subscribe([("#", 0), ("+/x", 0)]) == [0, 0]
    sys_sub = await RawClient.connect(broker.port, "sys", username="ops", password="pw")
    assert await sys_sub.subscribe([("$SYS/#", 0)]) == [0]
    await broker.publish("$SYS/x", b"internal", qos=0)
    assert (await sys_sub.expect(PUBLISH)).payload == b"internal"
    assert await everything.ping() == []


async def test_retained_message_for_later_subscribers(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    await broker.publish("devices/n1/ota", b"manifest-v2", qos=1, retain=True)
    c = await RawClient.connect(broker.port, "late")
    assert await c.subscribe([("devices/n1/#", 1)]) == [1]
    m = await c.expect(PUBLISH)
    assert (m.topic, m.payload, m.retain, m.qos) == ("devices/n1/ota", b"manifest-v2", True, 1)
    await broker.publish("devices/n1/ota", b"", retain=True)  # clears it
    live = await c.expect(PUBLISH)
    assert (live.payload, live.retain) == (b"", False)  # live delivery carries retain=0
    c2 = await RawClient.connect(broker.port, "later")
    await c2.subscribe([("devices/n1/#", 1)])
    assert await c2.ping() == []
    assert broker.stats()["retained_messages"] == 0


async def test_unsubscribe_stops_delivery(broker: EmbeddedBroker) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="u") as c:
        await c.subscribe("a/b", qos=1)
        await c.unsubscribe("a/b")
        assert broker.stats()["subscriptions"] == 0
        await c.subscribe("a/c", qos=1)
        await broker.publish("a/b", b"no")
        await broker.publish("a/c", b"yes")
        m = await _first_message(c)
        assert m.payload == b"yes"
