"""The development simulator: real MQTT nodes with their own credentials."""

from __future__ import annotations

import asyncio

from gateway.models import CommandRequest
from gateway.simulator.nodes import Simulator
from tests.helpers import count_readings, eventually


async def test_simulated_nodes_report_and_obey_commands(gateway) -> None:
    sim = Simulator(2, port=gateway.broker.port, interval_s=0.1)
    task = asyncio.create_task(sim.run(gateway.credentials.mint))
    try:
        for node in ("sim-node-01", "sim-node-02"):
            latest = await eventually(lambda n=node: _latest(gateway, n), lambda m: "temperature" in m, within=10)
            assert {"temperature", "humidity", "heap", "rssi", "relay"} <= set(latest)
        assert await count_readings(gateway) >= 10
        dev = await gateway.registry.get("sim-node-01")
        assert dev.online and dev.firmware == "1.0.0-sim"
        cmd = await gateway.commander.send("sim-node-01", CommandRequest(command="relay", args={"state": "on"}),
                                           actor="test")
        done = await eventually(lambda: gateway.commander.get(cmd.id), lambda c: c.state != "sent", within=5)
        assert done.state == "confirmed"
        assert gateway.registry.latest("sim-node-01")["relay"]["value"] == 1.0
        # the simulated nodes authenticated with minted credentials, like real ones
        assert gateway.credentials.has("sim-node-01")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _latest(gw, node: str) -> dict:
    return gw.registry.latest(node)
