"""Siteward's embedded MQTT broker: the hardened amqtt core plus Siteward's policy.

Policy means: every CONNECT is decided by ``BrokerHooks.authenticate``; a principal
publishes and subscribes only within its ACL filters; every accepted PUBLISH (and every
will) is handed to ``BrokerHooks.on_publish`` and acknowledged only once that returned.
The MQTT mechanics (and the amqtt defects fixed on the way) are in
:mod:`gateway.broker.amqtt_fixes`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Hashable
from types import TracebackType
from typing import Any

import structlog

from gateway.broker import wire
from gateway.broker.amqtt_fixes import (
    ConnectInfo,
    ConnectRefused,
    HardenedBroker,
    HardenedProtocolHandler,
    HardenedSession,
    broker_config,
    silence_amqtt_loggers,
)
from gateway.broker.hooks import AuthRefused, BrokerHooks, Principal
from gateway.broker.limits import BrokerLimits
from gateway.broker.topics import any_covers, any_matches, valid_topic_name
from gateway.settings import BrokerSection

log = structlog.get_logger(__name__)

_REFUSAL_CODES = {
    "bad_credentials": wire.CONNACK_BAD_CREDENTIALS,
    "not_authorised": wire.CONNACK_NOT_AUTHORISED,
    "identifier_rejected": wire.CONNACK_IDENTIFIER_REJECTED,
}


class _SitewardBroker(HardenedBroker):
    def __init__(
        self,
        config: dict[str, Any],
        limits: BrokerLimits,
        hooks: BrokerHooks,
        *,
        allow_anonymous: bool,
        ssl_contexts: dict[str, Any],
    ) -> None:
        super().__init__(config, limits, ssl_contexts=ssl_contexts)
        self.hooks = hooks
        self.allow_anonymous = allow_anonymous

    async def authenticate(self, info: ConnectInfo) -> Principal:
        hooks = self.hooks
        try:
            principal = await hooks.authenticate(info.client_id, info.username, info.password, info.peer)
        except AuthRefused as refusal:
            self.refused(None, info.client_id, refusal.reason, f"from {info.peer}")
            code = _REFUSAL_CODES.get(refusal.reason, wire.CONNACK_NOT_AUTHORISED)
            raise ConnectRefused(code, refusal.reason) from None
        except Exception as exc:
            # the credential store is unavailable: say so (3) rather than "bad password",
            # so that clients retry instead of giving up
            log.exception("mqtt authenticate hook failed", client_id=info.client_id)
            raise ConnectRefused(wire.CONNACK_SERVER_UNAVAILABLE, "server_unavailable", repr(exc)) from None
        if principal.anonymous and not self.allow_anonymous:
            self.refused(None, info.client_id, "not_authorised", "anonymous access is off")
            raise ConnectRefused(wire.CONNACK_NOT_AUTHORISED, "not_authorised")
        if principal.client_ids and info.client_id not in principal.client_ids:
            self.refused(principal, info.client_id, "identifier_rejected", "client id not this principal's")
            raise ConnectRefused(wire.CONNACK_IDENTIFIER_REJECTED, "identifier_rejected")
        return principal

    def owner_key(self, identity: Principal) -> Hashable:
        return (identity.username, identity.device_id, identity.anonymous)

    def may_publish(self, identity: Principal, topic: str) -> bool:
        return any_matches(identity.publish, topic)

    def may_subscribe(self, identity: Principal, topic_filter: str) -> bool:
        return any_covers(identity.subscribe, topic_filter)

    def rate_key(self, handler: HardenedProtocolHandler) -> Hashable:
        p: Principal = handler.identity
        if p.anonymous or (p.username is None and p.device_id is None):
            return ("client", handler.client_id)
        return ("principal", p.username, p.device_id)

    def ingest(
        self, handler: HardenedProtocolHandler, topic: str, payload: bytes, qos: int, retain: bool
    ) -> Awaitable[None]:
        return self.hooks.on_publish(handler.identity, handler.client_id, topic, payload, qos, retain)

    def refused(self, identity: Any, client_id: str, reason: str, detail: str) -> None:
        super().refused(identity, client_id, reason, detail)
        try:
            self.hooks.on_rejected(identity, client_id, reason, detail)
        except Exception:
            log.exception("on_rejected hook failed", reason=reason)

    async def client_connected(self, handler: HardenedProtocolHandler) -> None:
        await self.hooks.on_connect(handler.identity, handler.client_id)

    async def client_disconnected(self, handler: HardenedProtocolHandler, *, clean: bool) -> None:
        await self.hooks.on_disconnect(handler.identity, handler.client_id, clean=clean)


class EmbeddedBroker:
    """The gateway's MQTT broker, used as ``async with EmbeddedBroker(settings, hooks) as b:``."""

    def __init__(
        self, settings: BrokerSection, hooks: BrokerHooks, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._settings = settings
        self._hooks = hooks
        self._ssl_context = ssl_context
        self._broker: _SitewardBroker | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._broker is not None:
            return
        silence_amqtt_loggers()
        s = self._settings
        listeners = {"default": _bind(s.host, s.port)}
        ssl_contexts: dict[str, Any] = {}
        if self._ssl_context is not None:
            listeners["tls"] = _bind(s.host, s.tls_port if s.tls_port is not None else 8883)
            ssl_contexts["tls"] = self._ssl_context
        broker = _SitewardBroker(
            broker_config(listeners),
            BrokerLimits.from_settings(s),
            self._hooks,
            allow_anonymous=s.allow_anonymous,
            ssl_contexts=ssl_contexts,
        )
        await broker.start()
        self._broker = broker
        log.info("mqtt broker listening", **{name: port for name, port in broker.bound_ports.items()})
        if s.allow_anonymous:
            log.warning("mqtt anonymous access is ON: any client on the network may connect")

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("mqtt broker stopped")

    def _running(self) -> _SitewardBroker:
        if self._broker is None:
            raise RuntimeError("broker not started")
        return self._broker

    @property
    def port(self) -> int:
        return self._running().bound_ports["default"]

    @property
    def tls_port(self) -> int | None:
        return self._running().bound_ports.get("tls")

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Route a gateway-originated message (command, OTA manifest) to its subscribers.

        Not passed to ``on_publish``: the gateway stores its own commands itself.
        """
        if not valid_topic_name(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        self._running().route(topic, bytes(payload), qos, retain)

    def stats(self) -> dict[str, int | float]:
        b = self._broker
        if b is None:
            return {"running": 0}
        queued = inflight = 0
        sessions = 0
        for session, _ in b.sessions.values():
            if isinstance(session, HardenedSession):
                sessions += 1
                queued += len(session.out_queue)
                inflight += len(session.out_inflight)
        out: dict[str, int | float] = {
            "running": 1,
            "connected_clients": b.connected_clients,
            "sessions": sessions,
            "subscriptions": len(b._tree),
            "messages_in": b.messages_in,
            "messages_out": b.messages_out,
            "retransmits": b.retransmits,
            "queued_messages": queued,
            "inflight_messages": inflight,
            "retained_messages": len(b.retained_messages),
            "dropped_queue_full": b.dropped_queue_full,
            "keepalive_timeouts": b.keepalive_timeouts,
            "takeovers": b.takeovers,
            "ingest_failures": b.ingest_failures,
        }
        for reason, count in b.rejected.items():
            out[f"rejected_{reason}"] = count
        return out

    def is_connected(self, client_id: str) -> bool:
        b = self._broker
        if b is None:
            return False
        pair = b.sessions.get(client_id)
        return pair is not None and isinstance(pair[0], HardenedSession) and pair[0].handler is not None

    async def disconnect_client(self, client_id: str) -> None:
        """Close a client's connection (its will is published) and forget its session.

        For a revoked credential: the client cannot resume anything, and cannot reconnect
        because ``authenticate`` will refuse it.
        """
        b = self._running()
        pair = b.sessions.get(client_id)
        if pair is None or not isinstance(pair[0], HardenedSession):
            return
        session = pair[0]
        if session.handler is not None:
            await session.handler.kick("revoked")
        else:
            b.discard_session(session)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
