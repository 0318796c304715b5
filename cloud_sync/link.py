"""The connection to the cloud broker: connect, announce, keep trying, never give up.

One :class:`CloudLink` runs for the life of the process. Each successful connection is
a *session*: the link publishes the retained ``online`` status (its will says
``offline``), subscribes to the downlink command topic, and hands the connected
client to the session callback, which returns or raises when the connection ends.

Between attempts: exponential backoff with jitter, capped (60 s by default), reset
after a healthy session. While waiting, a TCP probe every ``probe_interval_s`` watches
the broker's port; a broker that was unreachable and now answers is tried at once, so
a drain starts within seconds of the uplink coming back even after an hour of backoff.
A broker that is reachable but refuses us (bad credentials, TLS) gets the full backoff:
hammering it would not help and could get the gateway banned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.aio import checkpoint
from cloud_sync.backoff import STABLE_SESSION_S, Backoff
from cloud_sync.codec import encode_message
from cloud_sync.config import SyncConfig
from cloud_sync.status import Figures

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 2.0
ANNOUNCE_TIMEOUT_S = 10.0
# queued incoming commands beyond this are dropped by the MQTT client (and logged): a
# flood of commands must not exhaust the gateway's memory
MAX_QUEUED_COMMANDS = 1000


class LinkStalled(Exception):
    """The connection is open but acknowledges nothing (black hole): give it up."""


Session = Callable[[aiomqtt.Client], Awaitable[None]]


def status_payload(cfg: SyncConfig, state: str, *, ts: float | None, reason: str | None) -> bytes:
    return encode_message({"v": 1, "type": "status", "gateway": cfg.gateway, "state": state, "ts": ts,
                           "reason": reason}, cfg.cloud.encoding)


_LINK_ERRORS = (aiomqtt.MqttError, LinkStalled, OSError)


def link_error_in(group: BaseExceptionGroup) -> BaseException | None:
    """The connection error that ended a session's task group; None if something else failed."""
    leaves = _leaves(group)
    if any(not isinstance(e, (*_LINK_ERRORS, asyncio.CancelledError)) for e in leaves):
        return None
    return next((e for e in leaves if isinstance(e, _LINK_ERRORS)), None)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def describe(exc: BaseException) -> str:
    """The error and what caused it ("Disconnected during message iteration" alone says little)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def classify(exc: BaseException) -> str:
    """A short, stable label for metrics: refused / unreachable / tls / lost / stalled / timeout."""
    if isinstance(exc, LinkStalled):
        return "stalled"
    if isinstance(exc, MqttConnectError):
        return "refused"
    text = describe(exc).lower()
    if "keepalive" in text or "keep alive" in text:
        return "keepalive"
    if isinstance(exc, ssl.SSLError) or "ssl" in text or "certificate" in text:
        return "tls"
    if "refused" in text or "unreachable" in text or "name or service" in text or "no route" in text:
        return "unreachable"
    if "timed out" in text:
        return "timeout"
    return "lost"


class CloudLink:
    def __init__(self, cfg: SyncConfig, figures: Figures, *, backoff: Backoff | None = None) -> None:
        self.cfg = cfg
        self.figures = figures
        c = cfg.cloud
        self.backoff = backoff or Backoff(c.backoff_initial_s, c.backoff_max_s)
        self.client: aiomqtt.Client | None = None
        self.acked_in_session = False
        self.attempts = 0
        # times a probe cut a backoff short (the broker came back while we waited)
        self.shortcuts = 0

    def _make_client(self) -> aiomqtt.Client:
        c, cfg = self.cfg.cloud, self.cfg
        v5 = c.mqtt_version == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = c.session_expiry_s if c.persistent_session else 0
        will = aiomqtt.Will(cfg.topics.status, status_payload(cfg, "offline", ts=None, reason="connection lost"),
                            qos=1, retain=True)
        client = aiomqtt.Client(
            c.host, c.port,
            username=c.username,
            password=c.password.get_secret_value() if c.password else None,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if v5 else not c.persistent_session,
            clean_start=(not c.persistent_session) if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            timeout=c.connect_timeout_s,
            keepalive=c.keepalive_s,
            tls_context=cfg.tls,
            # room for the window plus events, results, health and status
            max_inflight_messages=c.inflight_window + 32,
            max_queued_incoming_messages=MAX_QUEUED_COMMANDS,
            logger=logging.getLogger("cloud_sync.mqtt"),
        )
        # aiomqtt warns above 10 pending publishes; a window is many more by design
        client.pending_calls_threshold = c.inflight_window + 64
        return client

    async def run(self, session: Session) -> None:
        while True:
            checkpoint()
            began = time.monotonic()
            self.acked_in_session = False
            self.attempts += 1
            client = self._make_client()
            error: BaseException | None = None
            try:
                async with client:
                    checkpoint()  # aiomqtt's connect may have eaten a stop request
                    self.client = client
                    self.figures.link_up()
                    log.info("sync.connected", host=self.cfg.cloud.host, port=self.cfg.cloud.port,
                             mqtt=self.cfg.cloud.mqtt_version, attempt=self.attempts)
                    self.attempts = 0
                    await self._announce(client)
                    checkpoint()
                    # in a task of its own: Python 3.11's TaskGroup leaves the hosting task's
                    # cancelling() count raised after a child fails, which would make this
                    # loop's checkpoint() mistake every lost connection for a stop
                    await asyncio.create_task(session(client), name="sync-session")
            except (aiomqtt.MqttError, LinkStalled, OSError) as exc:
                error = exc
            except BaseExceptionGroup as group:  # from the session's task group
                error = link_error_in(group)
                if error is None:
                    raise
            finally:
                self.client = None
            kind = classify(error) if error is not None else "closed"
            text = describe(error) if error is not None else None
            was_up = self.figures.connected
            self.figures.link_down(kind, text)
            lasted = time.monotonic() - began
            if was_up and (lasted >= STABLE_SESSION_S or self.acked_in_session):
                self.backoff.reset()
            delay = self.backoff.next_delay()
            (log.warning if was_up or self.backoff.attempt <= 1 else log.info)(
                "sync.link_down" if was_up else "sync.connect_failed", kind=kind, error=text,
                retry_in_s=round(delay, 2))
            checkpoint()  # a cancellation aiomqtt's wait_for swallowed must still end the loop
            await self._pause(delay, known_down=kind == "unreachable")

    async def _announce(self, client: aiomqtt.Client) -> None:
        cfg = self.cfg
        await client.publish(cfg.topics.status, status_payload(cfg, "online", ts=time.time(), reason=None),
                             qos=1, retain=True, timeout=ANNOUNCE_TIMEOUT_S)
        if cfg.cloud.downlink:
            await client.subscribe(cfg.topics.command_filter, qos=1, timeout=ANNOUNCE_TIMEOUT_S)

    async def say_offline(self, reason: str) -> None:
        """Graceful stop: the will is not sent on a clean disconnect, so say it ourselves."""
        client = self.client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
            await client.publish(self.cfg.topics.status,
                                 status_payload(self.cfg, "offline", ts=time.time(), reason=reason),
                                 qos=1, retain=True, timeout=3.0)

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                _, w = await asyncio.open_connection(self.cfg.cloud.host, self.cfg.cloud.port)
        except (OSError, TimeoutError):
            return False
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return True

    async def _pause(self, delay: float, *, known_down: bool) -> None:
        """Sleep ``delay``, cut short when the broker's port goes from unreachable to reachable."""
        deadline = time.monotonic() + delay
        # the failed attempt itself may already have shown the port closed
        seen_down = known_down or not await self._probe()
        step = self.cfg.cloud.probe_interval_s
        while (left := deadline - time.monotonic()) > 0:
            checkpoint()
            await asyncio.sleep(min(step, left))
            up = await self._probe()
            if not up:
                seen_down = True
            elif seen_down:
                self.shortcuts += 1
                log.info("sync.broker_reachable", note="trying at once instead of waiting out the backoff")
                return
