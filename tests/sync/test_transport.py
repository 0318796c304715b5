"""Transport: TLS with username/password, mutual TLS, plain TCP, MQTT 3.1.1 and 5; the
retained online status and its will; refusals keep the sync retrying, never draining."""

from __future__ import annotations

import pytest

from tests.sync.cloud import CloudBroker, CloudConsumer, integrity
from tests.sync.conftest import add_readings, running_sync, store_of
from tests.sync.pki import Pki


@pytest.mark.parametrize(("auth", "mqtt"), [("password", "3.1.1"), ("mtls", "5"), ("password", "5"),
                                            ("tcp", "3.1.1")])
async def test_drains_over_each_transport(sync_settings, cloud: CloudBroker, consumer: CloudConsumer, pki: Pki,
                                          auth: str, mqtt: str) -> None:
    if auth == "mtls":
        s = sync_settings(port=cloud.mtls_port, username=None, password=None, cert_file=str(pki.client_cert),
                          key_file=str(pki.client_key), mqtt_version=mqtt)
    elif auth == "tcp":
        s = sync_settings(port=cloud.plain_port, transport="tcp", ca_file=None, username=None, password=None,
                          mqtt_version=mqtt)
    else:
        s = sync_settings(mqtt_version=mqtt)
    async with store_of(s) as db:
        await add_readings(db, 3000)
        async with running_sync(s) as svc:
            await consumer.wait_for_store(s.db_path)
            await consumer.wait_for(lambda: any(st["state"] == "online" for st in consumer.seen.status),
                                    what="online status")
            assert svc.figures.connected
    consumer.check_against_store(s.db_path)
    assert consumer.duplicates == 0
    # a clean stop says offline itself (the will is only for deaths)
    assert consumer.seen.status[-1]["state"] == "offline"
    assert consumer.seen.status[-1]["reason"] == "test over"
    assert integrity(s.db_path) == "ok"


@pytest.mark.parametrize("case", ["wrong_password", "rogue_client_cert", "untrusted_server"])
async def test_refused_connection_sends_nothing_and_keeps_trying(sync_settings, cloud: CloudBroker,
                                                                 consumer: CloudConsumer, pki: Pki,
                                                                 case: str) -> None:
    if case == "wrong_password":
        s = sync_settings(password="not the password")
    elif case == "rogue_client_cert":
        s = sync_settings(port=cloud.mtls_port, username=None, password=None, cert_file=str(pki.rogue_cert),
                          key_file=str(pki.rogue_key), connect_timeout_s=1.0)
    else:
        # the gateway trusts only the system store, which does not know the test CA
        s = sync_settings(ca_file=None)
    async with store_of(s) as db:
        await add_readings(db, 100)
        async with running_sync(s) as svc:
            # a rejected client certificate only shows as a CONNACK that never comes (connect timeout)
            await consumer.wait_for(lambda: svc.link.backoff.attempt >= 2, within=20, what="two attempts")
            assert not svc.figures.connected
            assert svc.figures.last_error
    assert consumer.seen.readings == {}


async def test_templates_shape_what_the_backend_receives(sync_settings, cloud: CloudBroker,
                                                         consumer: CloudConsumer) -> None:
    """An existing backend's topic and payload format, end to end through the broker."""
    import asyncio
    import json

    import aiomqtt

    s = sync_settings(templates={
        "readings_topic": "acme/{gateway}/telemetry",
        "reading": {"deviceId": "$device", "name": "$metric", "v": "$value", "t": "$ts_ms", "key": "$key"},
        "readings_envelope": {"gw": "$gateway", "items": "$readings"},
    })
    got: dict[str, dict] = {}
    async with aiomqtt.Client("127.0.0.1", cloud.plain_port, identifier="acme-backend") as backend:
        await backend.subscribe("acme/+/telemetry", qos=1)

        async def collect() -> None:
            async for m in backend.messages:
                body = json.loads(m.payload)  # type: ignore[arg-type]
                assert set(body) == {"gw", "items"} and body["gw"] == "gw-test"
                for item in body["items"]:
                    got[item["key"]] = item

        task = asyncio.create_task(collect())
        async with store_of(s) as db:
            ids = await add_readings(db, 700)
            async with running_sync(s):
                await consumer.wait_for(lambda: len(got) == 700, what="templated readings")
        task.cancel()
    first = got[f"gw-test:{ids.start}"]
    assert set(first) == {"deviceId", "name", "v", "t", "key"} and isinstance(first["t"], int)
    assert consumer.seen.readings == {}  # nothing on the standard topic
