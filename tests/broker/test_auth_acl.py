"""CONNECT decided by hooks.authenticate; ACLs on publish, subscribe and the will topic."""

from __future__ import annotations

import aiomqtt
import pytest

from gateway.broker import EmbeddedBroker, Principal, amqtt_fixes
from tests.broker.conftest import BrokerFactory, RecordingHooks, until
from tests.broker.rawmqtt import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RawClient,
    ack_packet,
    connect_packet,
    publish_packet,
)

pytestmark = pytest.mark.timeout(30)


async def test_bad_credentials_refused_with_4(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    c = await RawClient.connect(broker.port, "n1", username="n1", password="wrong", expect=4)
    assert await c.closed_by_peer()
    assert await RawClient.connect(broker.port, "n1", username="nobody", password="pw", expect=4)
    assert hooks.reasons().count("bad_credentials") == 2
    assert hooks.connects == []


async def test_not_authorised_refused_with_5(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    hooks.disabled.add("n1")
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw", expect=5)
    assert await c.closed_by_peer()
    assert hooks.reasons() == ["not_authorised"]


async def test_anonymous_refused_unless_allowed(make_broker: BrokerFactory, hooks: RecordingHooks) -> None:
    closed = await make_broker(allow_anonymous=False)
    c = await RawClient.connect(closed.port, "dev-tool", expect=5)
    assert await c.closed_by_peer()
    assert "not_authorised" in hooks.reasons()
    open_ = await make_broker(allow_anonymous=True)
    c = await RawClient.connect(open_.port, "dev-tool", expect=0)
    c.disconnect()


async def test_client_id_must_be_the_principals(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw1")
    hooks.add_device("n2", "pw2")
    n2 = await RawClient.connect(broker.port, "n2", username="n2", password="pw2")
    # device n1 tries to take over n2's client id: identifier rejected, n2 keeps its connection
    c = await RawClient.connect(broker.port, "n2", username="n1", password="pw1", expect=2)
    assert await c.closed_by_peer()
    assert "identifier_rejected" in hooks.reasons()
    assert broker.is_connected("n2")
    assert await n2.ping() == []
    assert broker.stats()["takeovers"] == 0


async def test_service_principal_cannot_take_a_device_session(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw1")
    hooks.users["svc"] = ("pw", Principal(username="svc", device_id=None, publish=("#",), subscribe=("#",)))
    n1 = await RawClient.connect(broker.port, "n1", username="n1", password="pw1")
    c = await RawClient.connect(broker.port, "n1", username="svc", password="pw", expect=2)
    assert await c.closed_by_peer()
    assert await n1.ping() == []


async def test_same_principal_takes_over(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    old = await RawClient.connect(
        broker.port, "n1", username="n1", password="pw", will=("devices/n1/status", b"offline", 1, False)
    )
    new = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    assert await old.closed_by_peer()
    assert await new.ping() == []
    assert broker.stats()["takeovers"] == 1
    assert broker.is_connected("n1")
    # the old connection was closed (and reported) before the new one was announced
    assert hooks.connects == ["n1", "n1"]
    assert hooks.disconnects == [("n1", True)]
    # a takeover is not a loss of the device: no will
    assert hooks.payloads("devices/n1/status") == []


async def test_authenticate_failure_is_server_unavailable(make_broker: BrokerFactory) -> None:
    class Broken(RecordingHooks):
        async def authenticate(self, *a: object) -> Principal:  # type: ignore[override]
            raise OSError("credential store unreachable")

    broker = await make_broker(hooks_=Broken())
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw", expect=3)
    assert await c.closed_by_peer()


async def test_empty_client_id_needs_clean_session(broker: EmbeddedBroker) -> None:
    await RawClient.connect(broker.port, "", clean=False, expect=2)
    c = await RawClient.connect(broker.port, "", clean=True, expect=0)
    c.disconnect()


async def test_denied_publish_acknowledged_not_ingested_not_routed(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    sub = await RawClient.connect(broker.port, "watcher")
    assert await sub.subscribe([("#", 1)]) == [1]
    n1 = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    n1.send(publish_packet("devices/n2/telemetry", b"spoofed", 1, 1))
    assert (await n1.expect(PUBACK)).pid == 1  # like mosquitto (3.1.1): acknowledged, dropped
    n1.send(publish_packet("devices/n2/telemetry", b"spoofed", 0))
    n1.send(publish_packet("devices/n2/telemetry", b"spoofed", 2, 2))
    assert (await n1.expect(PUBREC)).pid == 2
    n1.send(ack_packet(PUBREL, 2))
    assert (await n1.expect(PUBCOMP)).pid == 2
    n1.send(publish_packet("devices/n1/telemetry", b"mine", 1, 3))
    assert (await n1.expect(PUBACK)).pid == 3
    first = await sub.expect(PUBLISH)
    assert (first.topic, first.payload) == ("devices/n1/telemetry", b"mine")
    assert hooks.payloads() == [b"mine"]
    assert hooks.reasons().count("acl") == 3
    assert broker.stats()["rejected_acl"] == 3


async def test_denied_subscribe_gets_0x80(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    n1 = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    codes = await n1.subscribe([("devices/n1/command", 1), ("devices/n2/#", 1), ("devices/+/command", 0)])
    assert codes == [1, 0x80, 0x80]
    await broker.publish("devices/n2/command", b"not for n1")
    await broker.publish("devices/n1/command", b"for n1")
    msg = await n1.expect(PUBLISH)
    assert msg.payload == b"for n1"
    assert await n1.ping() == []
    assert hooks.reasons().count("acl") == 2


async def test_will_topic_outside_acl_refuses_connect(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    c = await RawClient.connect(
        broker.port,
        "n1",
        username="n1",
        password="pw",
        will=("devices/n2/status", b"offline", 1, False),
        expect=5,
    )
    assert await c.closed_by_peer()
    assert "acl" in hooks.reasons()


async def test_wildcard_in_publish_topic_closes_connection(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    c = await RawClient.connect(broker.port, "bad")
    c.send(b"\x30\x05\x00\x03a/#")
    assert await c.closed_by_peer()
    assert await until(lambda: "protocol" in hooks.reasons())


async def test_aiomqtt_device_round_trip(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    hooks.add_device("n1", "pw")
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="n1", username="n1", password="pw") as c:
        await c.subscribe("devices/n1/command", qos=1)
        await c.publish("devices/n1/telemetry", b'{"t": 1}', qos=1)
        assert hooks.payloads("devices/n1/telemetry") == [b'{"t": 1}']
        await broker.publish("devices/n1/command", b"reboot")
        async for m in c.messages:
            assert (str(m.topic), m.payload) == ("devices/n1/command", b"reboot")
            break
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="n1", username="n1", password="no"):
            pass


async def test_other_protocol_versions_get_code_1(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    for level in (3, 5):
        c = await RawClient.open(broker.port)
        raw = bytearray(connect_packet(f"v{level}"))
        raw[8] = level  # the protocol level byte follows the length-prefixed "MQTT"
        c.send(bytes(raw))
        ack = await c.expect(CONNACK)
        assert ack.body[1] == 1
        assert await c.closed_by_peer()
    assert hooks.connects == []


async def test_silent_tcp_connection_closed_without_connect(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqtt_fixes, "CONNECT_TIMEOUT_S", 0.3)
    c = await RawClient.open(broker.port)  # port scanners and half-open sockets send nothing
    assert await c.closed_by_peer(within=5)
    assert broker.stats()["connected_clients"] == 0
