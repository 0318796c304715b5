"""Fix: keepalive enforced, so a node that loses power is dropped and its will published."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.broker import EmbeddedBroker
from tests.broker.conftest import BrokerFactory, RecordingHooks, Target, until
from tests.broker.rawmqtt import PUBLISH, RawClient

pytestmark = pytest.mark.timeout(30)


async def test_silent_client_dropped_and_will_sent(any_broker: Target, hooks: RecordingHooks) -> None:
    """amqtt 0.12.1 never drops it; mosquitto drops it after 1.5 x keepalive."""
    topic = f"devices/ka-{any_broker.name}/status"
    async with aiomqtt.Client("127.0.0.1", any_broker.port, identifier=f"watch-{any_broker.name}") as sub:
        await sub.subscribe(topic, qos=1)
        loop = asyncio.get_running_loop()
        node = await RawClient.connect(
            any_broker.port, f"ka-{any_broker.name}", keepalive=1, will=(topic, b"offline", 1, False)
        )
        t0 = loop.time()
        # ... and now the node goes silent without closing its socket. Siteward checks each
        # connection on its own timer (1.5 s here); mosquitto 2.0 sweeps keepalives every few
        # seconds (measured: ~5 s for keepalive 1), hence its more generous bound.
        async with asyncio.timeout(5 if any_broker.broker is not None else 10):
            async for m in sub.messages:
                assert m.payload == b"offline"
                break
        assert loop.time() - t0 >= 1.0  # not before the keepalive itself
        assert await node.closed_by_peer()
    if any_broker.broker is not None:
        stats = any_broker.broker.stats()
        assert stats["keepalive_timeouts"] == 1
        assert "keepalive" in hooks.reasons()
        assert hooks.payloads(topic) == [b"offline"]
        assert await until(lambda: (f"ka-{any_broker.name}", False) in hooks.disconnects)


async def test_keepalive_clamped_to_max(make_broker: BrokerFactory, hooks: RecordingHooks) -> None:
    broker = await make_broker(max_keepalive_s=1)
    sub = await RawClient.connect(broker.port, "watch", keepalive=1)
    await sub.subscribe([("devices/+/status", 1)])
    # keepalive 0 ("never check me") and 3600 are both held to max_keepalive_s
    silent = [
        await RawClient.connect(
            broker.port, "k0", keepalive=0, will=("devices/k0/status", b"gone", 0, False)
        ),
        await RawClient.connect(
            broker.port, "kbig", keepalive=3600, will=("devices/kbig/status", b"gone", 0, False)
        ),
    ]
    got: set[str] = set()
    async with asyncio.timeout(5):
        while len(got) < 2:
            await asyncio.sleep(0.5)
            got |= {p.topic for p in await sub.ping() if p.kind == PUBLISH}  # the watcher keeps alive
    assert got == {"devices/k0/status", "devices/kbig/status"}
    assert broker.stats()["keepalive_timeouts"] == 2
    for c in silent:
        assert await c.closed_by_peer()


async def test_pinging_client_stays_connected(make_broker: BrokerFactory) -> None:
    broker: EmbeddedBroker = await make_broker()
    node = await RawClient.connect(broker.port, "pinger", keepalive=1)
    for _ in range(6):
        await asyncio.sleep(0.4)
        assert await node.ping() == []
    assert broker.is_connected("pinger")
    assert broker.stats()["keepalive_timeouts"] == 0
