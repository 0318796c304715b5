"""Fixes: persistent sessions survive disconnect; in-flight QoS 1 kept until acknowledged."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.broker import EmbeddedBroker, Principal
from tests.broker.conftest import BrokerFactory, RecordingHooks, Target, until
from tests.broker.rawmqtt import PUBACK, PUBLISH, RawClient, ack_packet

pytestmark = pytest.mark.timeout(40)


async def test_persistent_subscriber_gets_all_queued_messages(any_broker: Target) -> None:
    """amqtt 0.12.1: 0 of 10; mosquitto: 10 of 10."""
    sub_id = f"persistent-{any_broker.name}"
    topic = f"sessions/{any_broker.name}/cmd"
    async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=sub_id, clean_session=False) as sub:
        await sub.subscribe(topic, qos=1)
    async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=f"pub-{any_broker.name}") as pub:
        for i in range(10):
            await pub.publish(topic, b"%d" % i, qos=1)
    got: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=sub_id, clean_session=False) as sub:
        async with asyncio.timeout(5):
            async for m in sub.messages:
                got.append(m.payload)  # type: ignore[arg-type]
                if len(got) == 10:
                    break
    assert got == [b"%d" % i for i in range(10)]


async def test_session_present_and_expiry(make_broker: BrokerFactory) -> None:
    broker = await make_broker(session_expiry_s=1)
    c = await RawClient.connect(broker.port, "p1", clean=False)
    assert not c.session_present
    await c.subscribe([("x/y", 1)])
    c.disconnect()
    assert await until(lambda: not broker.is_connected("p1"))
    c = await RawClient.connect(broker.port, "p1", clean=False)
    assert c.session_present
    c.disconnect()
    # ... and one second after the client left for good, the session is gone
    assert await until(lambda: broker.stats()["sessions"] == 0, within=5)
    assert broker.stats()["subscriptions"] == 0
    c = await RawClient.connect(broker.port, "p1", clean=False)
    assert not c.session_present


async def test_clean_session_ends_with_connection(broker: EmbeddedBroker) -> None:
    c = await RawClient.connect(broker.port, "c1", clean=True)
    await c.subscribe([("x/#", 1)])
    assert broker.stats()["subscriptions"] == 1
    c.disconnect()
    assert await until(lambda: broker.stats()["sessions"] == 0)
    assert broker.stats()["subscriptions"] == 0


async def test_offline_queue_is_bounded_oldest_dropped(
    make_broker: BrokerFactory, hooks: RecordingHooks
) -> None:
    broker = await make_broker(max_queued_messages=5)
    c = await RawClient.connect(broker.port, "slowpoke", clean=False)
    await c.subscribe([("feed", 1)])
    c.disconnect()
    assert await until(lambda: not broker.is_connected("slowpoke"))
    for i in range(8):
        await broker.publish("feed", b"%d" % i, qos=1)
    await broker.publish("feed", b"qos0 is not kept offline", qos=0)
    assert broker.stats()["dropped_queue_full"] == 3
    assert hooks.reasons().count("queue_full") == 1  # once per burst
    c = await RawClient.connect(broker.port, "slowpoke", clean=False)
    got = []
    for _ in range(5):
        p = await c.expect(PUBLISH)
        got.append(p.payload)
        c.send(ack_packet(PUBACK, p.pid))
    assert got == [b"3", b"4", b"5", b"6", b"7"]
    assert await c.ping() == []


async def test_unacknowledged_message_survives_5s_and_is_resent_with_dup(broker: EmbeddedBroker) -> None:
    """amqtt 0.12.1 forgets an outbound QoS 1 message 5 s after sending it without PUBACK."""
    c = await RawClient.connect(broker.port, "forgetful", clean=False)
    await c.subscribe([("cmd/forgetful", 1)])
    await broker.publish("cmd/forgetful", b"reboot", qos=1)
    first = await c.expect(PUBLISH)
    assert (first.payload, first.dup) == (b"reboot", False)
    await asyncio.sleep(5.5)  # longer than amqtt's PUBACK timeout; no ack sent
    assert broker.stats()["inflight_messages"] == 1
    c.close()
    assert await until(lambda: not broker.is_connected("forgetful"))
    c = await RawClient.connect(broker.port, "forgetful", clean=False)
    again = await c.expect(PUBLISH)
    assert (again.payload, again.dup, again.pid) == (b"reboot", True, first.pid)  # [MQTT-4.4.0-1]
    c.send(ack_packet(PUBACK, again.pid))
    assert await c.ping() == []
    assert broker.stats()["inflight_messages"] == 0


async def test_resent_while_connected_after_retry_interval(make_broker: BrokerFactory) -> None:
    broker = await make_broker(retry_interval_s=0.3)
    c = await RawClient.connect(broker.port, "laggard")
    await c.subscribe([("cmd", 1)])
    await broker.publish("cmd", b"go", qos=1)
    first = await c.expect(PUBLISH)
    retry = await c.expect(PUBLISH, within=5)
    assert (retry.pid, retry.dup, retry.payload) == (first.pid, True, b"go")
    c.send(ack_packet(PUBACK, first.pid))
    assert await until(lambda: broker.stats()["inflight_messages"] == 0)


async def test_inflight_window_bounds_unacknowledged(make_broker: BrokerFactory) -> None:
    broker = await make_broker(max_inflight_messages=5)
    c = await RawClient.connect(broker.port, "windowed")
    await c.subscribe([("burst", 1)])
    for i in range(30):
        await broker.publish("burst", b"%d" % i, qos=1)
    got: list[bytes] = []
    while len(got) < 30:
        batch = [await c.expect(PUBLISH) for _ in range(5)]
        # five unacknowledged: nothing more comes until one is acknowledged
        assert await c.ping() == []
        got += [p.payload for p in batch]
        for p in batch:
            c.send(ack_packet(PUBACK, p.pid))
    assert got == [b"%d" % i for i in range(30)]


async def test_offline_session_belongs_to_its_owner(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    hooks.users["svc"] = ("pw", Principal(username="svc", device_id=None, publish=("#",), subscribe=("#",)))
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw", clean=False)
    await c.subscribe([("devices/n1/command", 1)])
    c.disconnect()
    assert await until(lambda: not broker.is_connected("n1"))
    await RawClient.connect(broker.port, "n1", username="svc", password="pw", clean=True, expect=2)
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw", clean=False)
    assert c.session_present
