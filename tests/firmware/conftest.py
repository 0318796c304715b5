"""Fixtures for the firmware tests: a real gateway, nodes in the MicroPython unix port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.firmware.mpnode import MicroNode, install_firmware


@pytest.fixture
async def gw(make_settings: Callable[..., Any]) -> AsyncIterator[Any]:
    from gateway.app import Gateway

    settings = make_settings(ota={"tick_s": 0.1, "start_timeout_s": 30, "progress_timeout_s": 30,
                                  "confirm_timeout_s": 60},
                             devices={"offline_after_s": 60})
    async with Gateway(settings) as g:
        yield g


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[MicroNode]]:
    started: list[MicroNode] = []
    yield started
    for n in started:
        n.kill()


async def node_config(gw: Any, device_id: str, password: str, **extra: Any) -> dict[str, Any]:
    assert gw.broker is not None
    cfg: dict[str, Any] = {
        "id": device_id,
        "wifi": {"ssid": "site-lan", "password": "not-a-real-psk"},
        "mqtt": {"host": "127.0.0.1", "port": gw.broker.port, "user": device_id, "password": password,
                 "keepalive": 10},
        "http_port": gw.web_port,
        "ota_keys": [await gw.ota.public_key()],
        "interval_s": 1,
        "heartbeat_s": 2,
        "wdt_ms": 30000,
        "confirm_s": 20,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def start_node(gw: Any, nodes: list[MicroNode], tmp_path: Path) -> Callable[..., Any]:
    async def start(device_id: str = "node-1", *, ota_partitions: bool = True, version: str = "1.0.0",
                    hw: dict[str, Any] | None = None, **cfg: Any) -> MicroNode:
        password = await gw.credentials.mint(device_id, ("native",))
        root = tmp_path / device_id
        install_firmware(root, ota_partitions=ota_partitions, version=version,
                         config=await node_config(gw, device_id, password, **cfg), hw=hw)
        node = MicroNode(root).start()
        nodes.append(node)
        return node

    return start
