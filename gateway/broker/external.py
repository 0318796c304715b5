"""External-broker mode: a site's own mosquitto carries the traffic, Siteward subscribes.

For sites that outgrow the embedded broker (tens of thousands of messages a second).
The trade-off, documented in docs/broker.md: mosquitto acknowledges a node's publish
*before* Siteward has stored it. Siteward narrows the gap as far as MQTT allows: it
holds a persistent session (clean_session=False) and acknowledges each message to
mosquitto only after the readings are committed, so a Siteward crash or restart
leaves unacknowledged messages in mosquitto's session for redelivery. What it cannot
cover: mosquitto itself dying with messages in memory (enable its persistence), and
mosquitto's queue limits (``max_queued_messages``) while Siteward is down.

Credentials and ACLs are mosquitto's job in this mode.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import aiomqtt
import structlog

from gateway.broker.hooks import BrokerHooks, Principal
from gateway.settings import BrokerSection

log = structlog.get_logger(__name__)

SERVICE = Principal(username="siteward-ingest", device_id=None, publish=("#",), subscribe=("#",))
RECONNECT_MAX_S = 30.0


def subscription_filters(route_topics: list[str]) -> list[str]:
    """Profile route topics ({device} levels) as MQTT subscription filters, deduplicated."""
    out: list[str] = []
    for t in route_topics:
        f = "/".join("+" if lvl == "{device}" else lvl for lvl in t.split("/"))
        if f not in out:
            out.append(f)
    return out


class ExternalBroker:
    """Same public face as :class:`EmbeddedBroker`, backed by a subscription to mosquitto."""

    def __init__(self, settings: BrokerSection, hooks: BrokerHooks, filters: list[str], *, client_id: str) -> None:
        self._s = settings
        self._hooks = hooks
        self._filters = filters
        self._client_id = client_id
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._stats = {"connected": 0, "messages_in": 0, "messages_out": 0, "reconnects": 0, "store_errors": 0}

    async def __aenter__(self) -> ExternalBroker:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._s.external_port

    @property
    def tls_port(self) -> int | None:
        return None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="external-broker")
        # the gateway is usable without the broker; do not hold the start forever
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _make_client(self) -> aiomqtt.Client:
        pw = self._s.external_password.get_secret_value() if self._s.external_password else None
        c = aiomqtt.Client(self._s.external_host, self._s.external_port, identifier=self._client_id,
                           username=self._s.external_username, password=pw, clean_session=False,
                           keepalive=30, max_inflight_messages=self._s.max_inflight_messages)
        # aiomqtt has no public switch for it: acknowledge to mosquitto ourselves, after the commit
        c._client.manual_ack_set(True)
        return c

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with self._make_client() as c:
                    self._client = c
                    for f in self._filters:
                        await c.subscribe(f, qos=1)
                    self._stats["connected"] = 1
                    self._connected.set()
                    backoff = 1.0
                    log.info("external_broker.connected", host=self._s.external_host, port=self._s.external_port,
                             filters=self._filters)
                    async for msg in c.messages:
                        await self._handle(c, msg)
            except aiomqtt.MqttError as exc:
                self._stats["connected"] = 0
                self._stats["reconnects"] += 1
                self._client = None
                log.warning("external_broker.disconnected", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _handle(self, c: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        self._stats["messages_in"] += 1
        payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else str(msg.payload).encode()
        try:
            await self._hooks.on_publish(SERVICE, self._client_id, str(msg.topic), bytes(payload), msg.qos,
                                         msg.retain)
        except Exception as exc:
            # not stored: no ack, so mosquitto redelivers it on our next session
            self._stats["store_errors"] += 1
            log.error("external_broker.store_failed", error=str(exc))
            raise aiomqtt.MqttError("store failed; reconnecting for redelivery") from exc
        if msg.qos > 0:
            c._client.ack(msg.mid, msg.qos)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self._client is None:
            raise ConnectionError("not connected to the external broker")
        await self._client.publish(topic, payload, qos=qos, retain=retain)
        self._stats["messages_out"] += 1

    def stats(self) -> dict[str, int | float]:
        return dict(self._stats)

    def is_connected(self, client_id: str) -> bool:
        return False  # mosquitto knows; Siteward does not see other clients in this mode

    async def disconnect_client(self, client_id: str) -> None:
        log.warning("external_broker.revoke_needs_mosquitto", device=client_id,
                    note="remove the device from mosquitto's password file/dynsec to cut it off")

    def describe(self) -> dict[str, Any]:
        return {"mode": "external", "host": self._s.external_host, "port": self._s.external_port}
