"""What the broker asks of the rest of the gateway.

The broker layer knows MQTT; it does not know devices, profiles or SQLite. It calls
these hooks, implemented by ``gateway.app`` from the device registry, the credential
store and the ingest pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection authenticated as.

    ``publish`` and ``subscribe`` are MQTT topic filters (``+``/``#`` allowed) the
    connection may use; ``device_id`` is None for anonymous (development) clients and
    for internal/service users.
    """

    username: str | None
    device_id: str | None
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    anonymous: bool = False
    # client ids this principal may use; empty means "any" (anonymous dev mode / service)
    client_ids: tuple[str, ...] = field(default=())


class AuthRefused(Exception):
    """CONNECT refused; ``reason`` is one of bad_credentials, not_authorised, identifier_rejected."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerHooks(Protocol):
    async def authenticate(
        self, client_id: str, username: str | None, password: str | None, peer: str
    ) -> Principal:
        """Return the principal or raise :class:`AuthRefused`."""

    async def on_publish(
        self, principal: Principal, client_id: str, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        """Ingest one inbound PUBLISH that passed the ACL.

        Awaited *before* the PUBACK for QoS 1: when it returns, whatever the message
        carried is committed. Raising means "not stored": the broker sends no PUBACK so
        the client redelivers. Rejections of bad content are counted and swallowed by
        the hook itself (the message is then acknowledged: retrying cannot fix it).

        Concurrency and order: the broker starts the calls for one connection in arrival
        order, each before it reads the next packet, and lets up to ``max_inbound_inflight``
        of them await at once (that is what lets a group commit batch them). An
        implementation that needs per-client order (the store does) must therefore take its
        place in line (e.g. enqueue to the writer) before its first ``await``.
        """

    def on_rejected(self, principal: Principal | None, client_id: str, reason: str, detail: str) -> None:
        """Count (and log once per burst) something the broker refused.

        ``reason`` is a short stable label used in /metrics: ``acl``, ``too_large``,
        ``rate_limited``, ``bad_credentials``, ``identifier_rejected``, ``protocol``,
        ``queue_full`` (a slow subscriber's queue overflowed), ``keepalive`` ...
        """

    async def on_connect(self, principal: Principal, client_id: str) -> None: ...

    async def on_disconnect(self, principal: Principal, client_id: str, *, clean: bool) -> None:
        """``clean`` is False when the connection was lost (the LWT, if any, was published)."""
