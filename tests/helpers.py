"""Small helpers the tests share: MQTT clients against a running gateway, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomqtt

T = TypeVar("T")


def client(gw: Any, device_id: str | None, password: str | None, **kw: Any) -> aiomqtt.Client:
    assert gw.broker is not None
    return aiomqtt.Client("127.0.0.1", gw.broker.port, identifier=kw.pop("identifier", device_id or ""),
                          username=device_id, password=password, timeout=kw.pop("timeout", 10), **kw)


async def eventually(fn: Callable[[], Awaitable[T]], ok: Callable[[T], bool], within: float = 5.0,
                     interval: float = 0.02) -> T:
    """Poll ``fn`` until ``ok(result)``; returns the last result (the caller asserts on it)."""
    deadline = time.monotonic() + within
    while True:
        res = await fn()
        if ok(res) or time.monotonic() > deadline:
            return res
        await asyncio.sleep(interval)


async def count_readings(gw: Any, device: str | None = None) -> int:
    return int(await gw.readings.count(device))


def rejected(gw: Any, reason: str) -> float:
    return gw.metrics.rejected.labels(reason=reason)._value.get()  # type: ignore[no-any-return]
