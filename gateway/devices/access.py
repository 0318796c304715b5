"""MQTT access for devices: the broker's hooks, answered from credentials and profiles.

Who may connect (per-device credentials; anonymous only when the config says so),
which topics each may use (its profiles' ACL with ``{device}`` = its own id), and
what happens to what it publishes (ingest, before the PUBACK).
"""

from __future__ import annotations

import structlog

from gateway.broker.hooks import AuthRefused, Principal
from gateway.devices.credentials import Credentials
from gateway.devices.registry import DeviceRegistry
from gateway.ingest.errors import Rejected
from gateway.ingest.pipeline import Ingest
from gateway.ingest.profiles import ProfileSet
from gateway.logs import BurstLogger
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

ANONYMOUS = Principal(username=None, device_id=None, publish=("#",), subscribe=("#",), anonymous=True)


class DeviceAccess:
    def __init__(self, *, credentials: Credentials, profiles: ProfileSet, ingest: Ingest,
                 registry: DeviceRegistry, metrics: Metrics, allow_anonymous: bool) -> None:
        self._creds = credentials
        self._profiles = profiles
        self._ingest = ingest
        self._registry = registry
        self._metrics = metrics
        self._allow_anonymous = allow_anonymous
        self._burst = BurstLogger(log)

    async def authenticate(self, client_id: str, username: str | None, password: str | None,
                           peer: str) -> Principal:
        if username is None and password is None:
            if self._allow_anonymous:
                return ANONYMOUS
            raise AuthRefused("not_authorised")
        login = await self._creds.verify_fresh(username, password)
        if login is None:
            raise AuthRefused("bad_credentials")
        pub: list[str] = []
        sub: list[str] = []
        for name in login.profiles:
            prof = self._profiles.get(name)
            if prof is None:
                continue
            p, s = prof.acl(login.device_id)
            pub += p
            sub += s
        # a device's session is its own: nobody else may take over its client id
        return Principal(username=username, device_id=login.device_id, publish=tuple(pub),
                         subscribe=tuple(sub), client_ids=(login.device_id,))

    async def on_publish(self, principal: Principal, client_id: str, topic: str, payload: bytes, qos: int,
                         retain: bool) -> None:
        await self._ingest.on_mqtt(principal.device_id, topic, payload)

    def on_rejected(self, principal: Principal | None, client_id: str, reason: str, detail: str) -> None:
        self._metrics.rejected.labels(reason=reason).inc()
        self._burst.warning(f"broker:{reason}", "broker.rejected", reason=reason, detail=detail,
                            client_id=client_id[:64],
                            device=principal.device_id if principal else None)

    async def on_connect(self, principal: Principal, client_id: str) -> None:
        if principal.device_id and self._registry.get_cached(principal.device_id) is not None:
            await self._registry.set_online(principal.device_id, True, "connected")

    async def on_disconnect(self, principal: Principal, client_id: str, *, clean: bool) -> None:
        if principal.device_id:
            await self._registry.set_online(principal.device_id, False,
                                            "disconnected" if clean else "connection lost")


__all__ = ["DeviceAccess", "Rejected"]
