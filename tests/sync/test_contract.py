"""docs/schemas/*.json are the contract's models, and real messages of a real run validate
against them (every message type, both encodings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest

from cloud_sync.codec import decode
from cloud_sync.config import SyncConfig
from cloud_sync.contract import SCHEMAS, json_schema
from cloud_sync.link import status_payload
from tests.sync.cloud import CloudBroker, CloudConsumer
from tests.sync.conftest import GATEWAY_ID, add_readings, cloud_section, running_sync
from tests.sync.test_downlink import node

SCHEMA_DIR = Path(__file__).parents[2] / "docs" / "schemas"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_files_match_the_models(name: str) -> None:
    on_disk = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema(name))), (
        f"docs/schemas/{name}.json is stale: run python -m cloud_sync.contract docs/schemas")


@pytest.mark.parametrize("encoding", ["json", "json+zlib"])
async def test_real_messages_validate(make_settings, cloud: CloudBroker, pki, consumer: CloudConsumer,
                                      encoding: str) -> None:
    from gateway.app import Gateway

    consumer.keep_raw = 10_000
    s = make_settings(cloud=cloud_section(cloud, pki, encoding=encoding), time={"source": "assume_unsynced"})
    commands = [{"device": "relay-1", "command": "relay", "args": {"state": "on"}, "timeout_s": 5},
                {"device": "nobody", "command": "relay"}]
    async with Gateway(s) as gw, running_sync(s) as svc:
        await add_readings(gw.db, 3000)
        for i in range(20):
            await gw.ingest.ingest_http("t-1", json.dumps({"temperature": i}).encode())
        await gw._on_clock_sync(30.0)  # produces a readings.corrected notice
        await gw.db.write(lambda c: c.execute(
            "INSERT INTO counters (name, value) VALUES ('dropped_quota', 7)"))  # a drop to report
        async with node(gw, "relay-1"), aiomqtt.Client("127.0.0.1", cloud.plain_port) as pub:
            for i, cmd in enumerate(commands):
                await pub.publish(f"siteward/{GATEWAY_ID}/down/command/c-{i}", json.dumps(cmd), qos=1)
            await consumer.wait_for(lambda: {"confirmed", "rejected"} <= {r["status"] for r in consumer.seen.results},
                                    what="command results")
        await consumer.wait_for_store(s.db_path)
        await consumer.wait_for(lambda: consumer.seen.corrections, what="the correction notice")
        await consumer.wait_for(lambda: any(e["kind"] == "readings.dropped" for e in consumer.seen.events.values()),
                                what="the drop report")
        will = status_payload(SyncConfig.from_settings(s), "offline", ts=None, reason="connection lost")
        assert svc.figures.connected
    by_type: dict[str, list[dict[str, Any]]] = {}
    for _topic, payload in consumer.seen.raw:
        body = decode(payload)
        by_type.setdefault(body["type"], []).append(body)
    by_type["status"].append(decode(will))
    assert set(by_type) == set(SCHEMAS) - {"command"}
    for name, bodies in by_type.items():
        v = validator(name)
        for body in bodies:
            v.validate(body)
    assert {b["lane"] for b in by_type["readings"]} <= {"live", "backlog"}
    for cmd in commands:
        validator("command").validate(cmd)
