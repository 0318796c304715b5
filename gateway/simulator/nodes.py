"""Simulated ESP32 nodes: real MQTT clients with their own credentials.

Each behaves like Siteward's node firmware from the broker's point of view: it
connects with its own id and secret, sets a last will (``offline``), announces
``online``, publishes temperature/humidity telemetry and health heartbeats, keeps a
relay, and answers commands with a status carrying the command id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog

log = structlog.get_logger(__name__)

HEALTH_EVERY_S = 30.0
FW_VERSION = "1.0.0-sim"


@dataclass
class NodeState:
    relay: str = "off"
    interval_s: float = 2.0
    boot: float = field(default_factory=time.monotonic)
    temperature: float = field(default_factory=lambda: random.uniform(18.0, 24.0))
    humidity: float = field(default_factory=lambda: random.uniform(35.0, 55.0))


class SimulatedNode:
    def __init__(self, node_id: str, password: str, *, host: str = "127.0.0.1", port: int = 1883,
                 interval_s: float = 2.0) -> None:
        self.id = node_id
        self.password = password
        self.host = host
        self.port = port
        self.state = NodeState(interval_s=interval_s)
        self.commands_handled = 0
        self._phase = random.uniform(0, 2 * math.pi)

    def _topic(self, leaf: str) -> str:
        return f"devices/{self.id}/{leaf}"

    def _telemetry(self) -> dict[str, Any]:
        st = self.state
        # a slow daily-like wave plus noise, so charts look like a real room
        t = time.time() / 600.0 + self._phase
        st.temperature += 0.05 * (21.0 + 2.0 * math.sin(t) - st.temperature) + random.gauss(0, 0.05)
        st.humidity += 0.05 * (45.0 + 8.0 * math.cos(t) - st.humidity) + random.gauss(0, 0.2)
        return {"temperature": round(st.temperature, 2), "humidity": round(st.humidity, 1)}

    async def run(self) -> None:
        backoff = 1.0
        while True:
            try:
                await self._session()
                backoff = 1.0
            except aiomqtt.MqttError as exc:
                log.debug("sim.disconnected", node=self.id, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _session(self) -> None:
        will = aiomqtt.Will(self._topic("status"), b"offline", qos=1, retain=True)
        async with aiomqtt.Client(self.host, self.port, identifier=self.id, username=self.id,
                                  password=self.password, will=will, keepalive=30) as c:
            await c.subscribe(self._topic("command"), qos=1)
            await c.publish(self._topic("status"), b"online", qos=1, retain=True)
            await self._publish_status(c)
            await self._publish_health(c)
            pub = asyncio.create_task(self._publisher(c))
            try:
                async for msg in c.messages:
                    reboot = await self._command(c, bytes(msg.payload))  # type: ignore[arg-type]
                    if reboot:
                        break
            finally:
                pub.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pub

    async def _publisher(self, c: aiomqtt.Client) -> None:
        last_health = time.monotonic()
        while True:
            await asyncio.sleep(self.state.interval_s * random.uniform(0.9, 1.1))
            await c.publish(self._topic("telemetry"), json.dumps(self._telemetry()).encode(), qos=1)
            if time.monotonic() - last_health > HEALTH_EVERY_S:
                await self._publish_health(c)
                last_health = time.monotonic()

    async def _publish_health(self, c: aiomqtt.Client) -> None:
        body = {"heap": random.randint(90_000, 120_000), "uptime": int(time.monotonic() - self.state.boot),
                "fw": FW_VERSION, "rssi": random.randint(-75, -50)}
        await c.publish(self._topic("health"), json.dumps(body).encode(), qos=1)

    async def _publish_status(self, c: aiomqtt.Client, cmd_id: str | None = None,
                              error: str | None = None) -> None:
        body: dict[str, Any] = {"relay": self.state.relay}
        if cmd_id:
            body["cmd_id"] = cmd_id
        if error:
            body["error"] = error
        await c.publish(self._topic("status"), json.dumps(body).encode(), qos=1)

    async def _command(self, c: aiomqtt.Client, payload: bytes) -> bool:
        try:
            cmd = json.loads(payload)
            cid, name, args = cmd.get("id"), cmd.get("command"), cmd.get("args") or {}
        except (ValueError, AttributeError):
            return False
        self.commands_handled += 1
        if name in ("relay", "set_relay", "switch") and args.get("state") in ("on", "off"):
            self.state.relay = args["state"]
        elif name in ("on", "off"):
            self.state.relay = name
        elif name == "toggle":
            self.state.relay = "off" if self.state.relay == "on" else "on"
        elif name == "set_interval" and isinstance(args.get("seconds"), int | float) and args["seconds"] > 0:
            self.state.interval_s = float(args["seconds"])
        elif name == "identify":
            pass  # a real node blinks its LED
        elif name == "reboot":
            await self._publish_status(c, cid)
            return True
        else:
            await self._publish_status(c, cid, error=f"unknown command {name!r}")
            return False
        await self._publish_status(c, cid)
        return False


class Simulator:
    """N nodes, credentials minted through the gateway like a real installer would."""

    def __init__(self, count: int, *, port: int, interval_s: float, prefix: str = "sim-node-") -> None:
        self.count = count
        self.port = port
        self.interval_s = interval_s
        self.prefix = prefix
        self.nodes: list[SimulatedNode] = []

    async def run(self, mint: Any) -> None:
        for i in range(1, self.count + 1):
            nid = f"{self.prefix}{i:02d}"
            self.nodes.append(SimulatedNode(nid, await mint(nid), port=self.port, interval_s=self.interval_s))
        log.info("simulator.started", nodes=self.count)
        await asyncio.gather(*(n.run() for n in self.nodes))
