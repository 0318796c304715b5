"""Fixtures for the broker tests: an in-test hooks implementation and broker factories."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.broker import AuthRefused, EmbeddedBroker, Principal
from gateway.settings import BrokerSection
from tests.fixtures.mqtt_brokers import Mosquitto, mosquitto  # noqa: F401  (fixture)

ANONYMOUS = Principal(username=None, device_id=None, publish=("#",), subscribe=("#",), anonymous=True)


@dataclass
class Published:
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    principal: Principal


@dataclass
class RecordingHooks:
    """Credentials in a dict, ingest into a list; knobs to delay or fail ingest."""

    users: dict[str, tuple[str, Principal]] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    published: list[Published] = field(default_factory=list)
    calls: list[tuple[str, bytes]] = field(default_factory=list)  # (client_id, payload) in call order
    rejected: list[tuple[Principal | None, str, str, str]] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    disconnects: list[tuple[str, bool]] = field(default_factory=list)
    # when set, on_publish waits for it (after recording the call)
    gate: asyncio.Event | None = None
    # when set and returning True for a payload, on_publish raises
    fail: Callable[[bytes], bool] | None = None
    # extra awaitable each on_publish awaits (e.g. a random delay)
    delay: Callable[[], Awaitable[None]] | None = None
    pending: int = 0
    max_pending: int = 0
    # False: count ingested messages without keeping their payloads (flood tests)
    record: bool = True
    ingested: int = 0

    def add_device(self, device_id: str, password: str, **kw: Any) -> Principal:
        p = Principal(
            username=device_id,
            device_id=device_id,
            publish=kw.pop("publish", (f"devices/{device_id}/#",)),
            subscribe=kw.pop("subscribe", (f"devices/{device_id}/#",)),
            client_ids=kw.pop("client_ids", (device_id,)),
            **kw,
        )
        self.users[device_id] = (password, p)
        return p

    async def authenticate(
        self, client_id: str, username: str | None, password: str | None, peer: str
    ) -> Principal:
        if username is None:
            return ANONYMOUS
        entry = self.users.get(username)
        if entry is None or entry[0] != password:
            raise AuthRefused("bad_credentials")
        if username in self.disabled:
            raise AuthRefused("not_authorised")
        return entry[1]

    async def on_publish(
        self, principal: Principal, client_id: str, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        if self.record:
            self.calls.append((client_id, payload))
        self.pending += 1
        self.max_pending = max(self.max_pending, self.pending)
        try:
            if self.delay is not None:
                await self.delay()
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None and self.fail(payload):
                raise RuntimeError("store unavailable")
            self.ingested += 1
            if self.record:
                self.published.append(Published(client_id, topic, payload, qos, retain, principal))
        finally:
            self.pending -= 1

    def on_rejected(self, principal: Principal | None, client_id: str, reason: str, detail: str) -> None:
        self.rejected.append((principal, client_id, reason, detail))

    def reasons(self) -> list[str]:
        return [r[2] for r in self.rejected]

    async def on_connect(self, principal: Principal, client_id: str) -> None:
        self.connects.append(client_id)

    async def on_disconnect(self, principal: Principal, client_id: str, *, clean: bool) -> None:
        self.disconnects.append((client_id, clean))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [p.payload for p in self.published if topic is None or p.topic == topic]


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


BrokerFactory = Callable[..., Awaitable[EmbeddedBroker]]


@pytest.fixture
async def make_broker(hooks: RecordingHooks) -> AsyncIterator[BrokerFactory]:
    started: list[EmbeddedBroker] = []

    async def make(*, ssl_context: Any = None, hooks_: Any = None, **settings: Any) -> EmbeddedBroker:
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "allow_anonymous": True}
        if ssl_context is not None:
            base["tls_port"] = 0
        base.update(settings)
        broker = EmbeddedBroker(BrokerSection(**base), hooks_ or hooks, ssl_context=ssl_context)
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for b in started:
        await b.stop()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> EmbeddedBroker:
    return await make_broker()


@dataclass
class Target:
    name: str
    port: int
    broker: EmbeddedBroker | None  # None for mosquitto


@pytest.fixture(params=["siteward", "mosquitto"])
async def any_broker(request: pytest.FixtureRequest, make_broker: BrokerFactory) -> AsyncIterator[Target]:
    """Siteward's broker or a real mosquitto: the same scenario runs against both."""
    if request.param == "siteward":
        b = await make_broker()
        yield Target("siteward", b.port, b)
    else:
        m: Mosquitto = request.getfixturevalue("mosquitto")
        yield Target("mosquitto", m.port, None)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> bool:
    """Wait until ``predicate()`` holds (polling); returns its final value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            return predicate()
        await asyncio.sleep(0.01)
    return True
