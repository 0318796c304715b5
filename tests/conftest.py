"""Shared fixtures: settings on a temporary data dir, a running gateway on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings, load_settings

# real brokers for any test that asks for them (mosquitto on a free loopback port)
pytest_plugins = ["tests.fixtures.mqtt_brokers"]


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**sections: dict[str, Any]) -> Settings:
        base: dict[str, dict[str, Any]] = {
            "gateway": {"data_dir": str(tmp_path / "data"), "id": "gw-test"},
            "broker": {"port": 0, "host": "127.0.0.1"},
            "web": {"port": 0, "host": "127.0.0.1", "admin_password": "correct horse battery"},
            "store": {"commit_interval_ms": 2, "maintenance_interval_s": 3600},
            "time": {"source": "assume_synced"},
            "logging": {"level": "warning", "format": "console"},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return load_settings(None, **base)

    return make


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings]) -> AsyncIterator[Any]:
    from gateway.app import Gateway

    async with Gateway(make_settings()) as gw:
        yield gw
