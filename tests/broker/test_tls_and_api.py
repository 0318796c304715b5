"""TLS listener, and the small public face: publish, stats, is_connected, disconnect_client."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.broker import EmbeddedBroker
from tests.broker.conftest import BrokerFactory, RecordingHooks, until
from tests.broker.rawmqtt import PUBACK, PUBLISH, RawClient, publish_packet

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siteward-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_listener_same_behaviour(
    make_broker: BrokerFactory, hooks: RecordingHooks, tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_pair
    broker = await make_broker(ssl_context=server_ctx)
    assert broker.tls_port is not None and broker.tls_port != broker.port
    hooks.add_device("n1", "pw")
    watcher = await RawClient.connect(broker.port, "watcher")
    await watcher.subscribe([("devices/#", 1)])
    async with aiomqtt.Client(
        "127.0.0.1", broker.tls_port, identifier="n1", username="n1", password="pw", tls_context=client_ctx
    ) as c:
        await c.publish("devices/n1/telemetry", b"secure", qos=1)
        assert hooks.payloads() == [b"secure"]
        await c.publish("devices/n2/telemetry", b"spoof", qos=1)  # ACL applies on TLS too
    assert (await watcher.expect(PUBLISH)).payload == b"secure"
    assert await watcher.ping() == []
    assert "acl" in hooks.reasons()
    tls_raw = await RawClient.connect(
        broker.tls_port, "n1", username="n1", password="bad", ssl_context=client_ctx, expect=4
    )
    tls_raw.close()


async def test_plain_only_without_ssl_context(broker: EmbeddedBroker) -> None:
    assert broker.tls_port is None


async def test_stats_and_is_connected(broker: EmbeddedBroker, hooks: RecordingHooks) -> None:
    stats = broker.stats()
    for key in (
        "connected_clients",
        "messages_in",
        "messages_out",
        "dropped_queue_full",
        "keepalive_timeouts",
        "takeovers",
        "sessions",
        "subscriptions",
    ):
        assert stats[key] == 0, key
    hooks.add_device("n1", "pw")
    c = await RawClient.connect(broker.port, "n1", username="n1", password="pw")
    await c.subscribe([("devices/n1/command", 1)])
    c.send(publish_packet("devices/n1/telemetry", b"1", 1, 1))
    await c.expect(PUBACK)
    await broker.publish("devices/n1/command", b"on")
    await c.expect(PUBLISH)
    stats = broker.stats()
    assert (stats["connected_clients"], stats["sessions"], stats["subscriptions"]) == (1, 1, 1)
    assert (stats["messages_in"], stats["messages_out"]) == (1, 1)
    assert broker.is_connected("n1") and not broker.is_connected("n2")


async def test_disconnect_client_for_revoked_credential(
    broker: EmbeddedBroker, hooks: RecordingHooks
) -> None:
    hooks.add_device("n1", "pw")
    watcher = await RawClient.connect(broker.port, "watcher")
    await watcher.subscribe([("devices/+/status", 1)])
    c = await RawClient.connect(
        broker.port,
        "n1",
        username="n1",
        password="pw",
        clean=False,
        will=("devices/n1/status", b"offline", 1, False),
    )
    await c.subscribe([("devices/n1/command", 1)])
    hooks.disabled.add("n1")  # the credential store revokes it ...
    await broker.disconnect_client("n1")  # ... and the gateway kicks the node
    assert await c.closed_by_peer()
    assert not broker.is_connected("n1")
    assert (await watcher.expect(PUBLISH)).payload == b"offline"
    assert hooks.disconnects == [("n1", False)]
    assert broker.stats()["sessions"] == 1  # only the watcher's: the revoked session is gone
    await RawClient.connect(broker.port, "n1", username="n1", password="pw", clean=False, expect=5)


async def test_gateway_publish_validates(broker: EmbeddedBroker) -> None:
    with pytest.raises(ValueError, match="topic"):
        await broker.publish("devices/+/command", b"x")
    with pytest.raises(ValueError, match="QoS"):
        await broker.publish("devices/n1/command", b"x", qos=3)


async def test_stop_closes_clients_and_frees_port(make_broker: BrokerFactory, hooks: RecordingHooks) -> None:
    broker = await make_broker()
    c = await RawClient.connect(broker.port, "c", will=("x/status", b"offline", 0, False))
    port = broker.port
    await broker.stop()
    assert await c.closed_by_peer()
    assert await until(lambda: hooks.disconnects == [("c", True)])
    assert hooks.payloads() == []  # a gateway shutdown is not a lost node: no will
    with pytest.raises(OSError):
        await RawClient.open(port)
