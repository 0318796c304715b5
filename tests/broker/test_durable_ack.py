"""Acknowledged means stored: PUBACK/PUBREC only after on_publish, in order, concurrently."""

from __future__ import annotations

import asyncio
import random

import pytest
from structlog.testing import capture_logs

from gateway.broker import EmbeddedBroker
from tests.broker.conftest import BrokerFactory, RecordingHooks, until
from tests.broker.rawmqtt import (
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RawClient,
    ack_packet,
    publish_packet,
)

pytestmark = pytest.mark.timeout(30)


async def test_puback_waits_for_on_publish_and_inflight_commits_overlap(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    hooks.gate = asyncio.Event()
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    c.send(b"".join(publish_packet("devices/n1/telemetry", b"%d" % i, 1, i + 1) for i in range(20)))
    # all 20 are awaiting on_publish at the same time (group commit can batch them) ...
    assert await until(lambda: hooks.pending == 20)
    # ... and none is acknowledged: the PINGRESP overtakes every PUBACK
    assert await c.ping() == []
    hooks.gate.set()
    acks = [(await c.expect(PUBACK)).pid for _ in range(20)]
    assert acks == list(range(1, 21))
    assert hooks.payloads() == [b"%d" % i for i in range(20)]


async def test_on_publish_called_in_arrival_order_per_client(
    make_broker: BrokerFactory, hooks: RecordingHooks
) -> None:
    broker = await make_broker(max_inbound_inflight=16)
    rnd = random.Random(1)

    async def jitter() -> None:
        await asyncio.sleep(rnd.random() * 0.003)

    hooks.delay = jitter
    clients = []
    for n in range(3):
        hooks.add_device(f"n{n}", "pw")
        clients.append(await RawClient.connect(broker.port, f"n{n}", username=f"n{n}", password="pw"))
    for n, c in enumerate(clients):
        c.send(b"".join(publish_packet(f"devices/n{n}/telemetry", b"%d" % i, 1, i + 1) for i in range(150)))
    for c in clients:
        assert [(await c.expect(PUBACK)).pid for _ in range(150)] == list(range(1, 151))
    for n in range(3):
        order = [int(p) for cid, p in hooks.calls if cid == f"n{n}"]
        assert order == list(range(150))
    assert 1 < hooks.max_pending <= 3 * 16


async def test_failed_ingest_is_not_acknowledged_and_redelivery_is(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    failing = {b"m1"}
    hooks.fail = lambda payload: payload in failing
    sub = await RawClient.connect(broker.port, "watcher")
    await sub.subscribe([("devices/#", 1)])
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    c.send(
        publish_packet("devices/n1/telemetry", b"m1", 1, 1)
        + publish_packet("devices/n1/telemetry", b"m2", 1, 2)
    )
    # acknowledgements leave in arrival order, so m2's PUBACK coming first proves m1 gets none
    assert (await c.expect(PUBACK)).pid == 2
    assert hooks.payloads() == [b"m2"]
    assert broker.stats()["ingest_failures"] == 1
    assert (await sub.expect(PUBLISH)).payload == b"m2"  # not stored, not routed
    # the client redelivers on reconnect (DUP); now the store takes it
    c.close()
    failing.clear()
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    c.send(publish_packet("devices/n1/telemetry", b"m1", 1, 1, dup=True))
    assert (await c.expect(PUBACK)).pid == 1
    assert hooks.payloads() == [b"m2", b"m1"]
    assert (await sub.expect(PUBLISH)).payload == b"m1"


async def test_failing_store_logs_once_per_burst(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    hooks.fail = lambda payload: payload != b"ok"
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    with capture_logs() as logs:
        c.send(b"".join(publish_packet("devices/n1/telemetry", b"x", 1, i + 1) for i in range(300)))
        c.send(publish_packet("devices/n1/telemetry", b"ok", 1, 400))
        assert (await c.expect(PUBACK)).pid == 400
    assert broker.stats()["ingest_failures"] == 300
    assert len([e for e in logs if "ingest failed" in e["event"]]) == 1


async def test_qos2_ingested_before_pubrec_and_deduplicated(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    hooks.gate = asyncio.Event()
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    c.send(publish_packet("devices/n1/telemetry", b"q2", 2, 7))
    assert await until(lambda: hooks.pending == 1)
    assert await c.ping() == []  # no PUBREC before it is stored
    hooks.gate.set()
    assert (await c.expect(PUBREC)).pid == 7
    # a retransmission before PUBREL is the same message: acknowledged, not stored again
    c.send(publish_packet("devices/n1/telemetry", b"q2", 2, 7, dup=True))
    assert (await c.expect(PUBREC)).pid == 7
    c.send(ack_packet(PUBREL, 7))
    assert (await c.expect(PUBCOMP)).pid == 7
    assert hooks.payloads() == [b"q2"]
    # after PUBREL the id is free again: a new message with it is a new message
    c.send(publish_packet("devices/n1/telemetry", b"q2-again", 2, 7))
    assert (await c.expect(PUBREC)).pid == 7
    assert hooks.payloads() == [b"q2", b"q2-again"]


async def test_will_of_lost_client_is_ingested_and_routed(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    sub = await RawClient.connect(broker.port, "watcher")
    await sub.subscribe([("devices/+/status", 1)])
    n1 = await RawClient.connect(
        broker.port, "n1", username="n1", password="pw", will=("devices/n1/status", b"offline", 1, False)
    )
    n1.send(publish_packet("devices/n1/status", b"online", 1, 1))
    assert (await n1.expect(PUBACK)).pid == 1
    n1.writer.transport.abort()  # power cut: no DISCONNECT
    assert (await sub.expect(PUBLISH)).payload == b"online"
    will = await sub.expect(PUBLISH)
    assert (will.topic, will.payload, will.qos) == ("devices/n1/status", b"offline", 1)
    assert hooks.payloads("devices/n1/status") == [b"online", b"offline"]
    assert await until(lambda: hooks.disconnects == [("n1", False)])


async def test_clean_disconnect_discards_will(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    n1 = await RawClient.connect(
        broker.port, "n1", username="n1", password="pw", will=("devices/n1/status", b"offline", 1, False)
    )
    n1.disconnect()
    assert await until(lambda: hooks.disconnects == [("n1", True)])
    assert hooks.payloads() == []
