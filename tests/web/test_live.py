"""The WebSocket live feed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.web.views import live
from tests.web.conftest import ADMIN, ADMIN_PASSWORD, Client, Site


async def _next_of(ws: aiohttp.ClientWebSocketResponse, kind: str, wait_s: float = 5.0) -> dict[str, Any]:
    async def wait() -> dict[str, Any]:
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event = json.loads(msg.data)
            if event["type"] == kind:
                return event  # type: ignore[no-any-return]

    return await asyncio.wait_for(wait(), wait_s)


def _ws(c: Client, path: str = "/api/v1/live", headers: dict[str, str] | None = None) -> Any:
    h = dict(headers or {})
    if c.token:
        h["Authorization"] = f"Bearer {c.token}"
    return c.http.ws_connect(c.base.replace("http", "ws", 1) + path, headers=h)


async def test_live_feed_sends_readings_as_they_are_stored(site: Site) -> None:
    viewer = await site.user("vic", "viewer")
    await site.user("tech", "technician")
    script = await site.script("tech")
    async with _ws(viewer) as ws:
        hello = await _next_of(ws, "hello")
        assert hello["user"] == "vic" and hello["role"] == "viewer"
        r = await script.post("/api/v1/devices/n1/telemetry", {"temperature": 19.5})
        assert r.status == 201
        ev = await _next_of(ws, "reading")
        assert ev["device"] == "n1" and ev["metric"] == "temperature" and ev["value"] == 19.5
        assert ev["unit"] == "°C" and ev["id"] == r.json["ids"][0]


async def test_live_feed_filtered_by_device_and_by_token(site: Site) -> None:
    script = await site.script()
    async with _ws(script, "/api/v1/live?device=n2") as ws:
        await _next_of(ws, "hello")
        await script.post("/api/v1/devices/n1/telemetry", {"temperature": 1})
        await script.post("/api/v1/devices/n2/telemetry", {"temperature": 2})
        ev = await _next_of(ws, "reading")
        assert ev["device"] == "n2"


async def test_live_feed_needs_authentication(site: Site) -> None:
    anon = site.client()
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        async with _ws(anon):
            pass
    assert exc.value.status == 401


async def test_live_feed_refuses_a_foreign_origin(site: Site) -> None:
    admin = await site.admin()
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        async with _ws(admin, headers={"Origin": "http://evil.example"}):
            pass
    assert exc.value.status == 403


async def test_live_feed_closes_when_the_session_ends(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "RECHECK_S", 0.1)
    browser = site.client()
    await browser.login(ADMIN, ADMIN_PASSWORD)
    async with _ws(browser) as ws:
        await _next_of(ws, "hello")
        assert (await browser.post("/api/v1/logout")).status == 204
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == live.CLOSE_AUTH_ENDED


async def test_slow_viewer_loses_updates_not_the_gateway(site: Site) -> None:
    gw = site.gw
    admin = await site.admin()
    fast = site.client()
    await fast.login(ADMIN, ADMIN_PASSWORD)
    pad = "x" * 2000
    dropped_before = gw.metrics.live_dropped._value.get()
    async with _ws(admin) as slow, _ws(fast) as quick:
        await _next_of(slow, "hello")
        await _next_of(quick, "hello")
        n = 20_000
        received = 0

        async def read_quick() -> None:
            nonlocal received
            while True:
                msg = await quick.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                ev = json.loads(msg.data)
                if ev["type"] == "test":
                    received += 1
                    if ev["i"] == n - 1:
                        return

        reader = asyncio.create_task(read_quick())
        # the bus never blocks the publisher, however slow a viewer is
        for i in range(n):
            gw.bus.publish({"type": "test", "i": i, "pad": pad})
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the fast viewer's socket drain
        await asyncio.wait_for(reader, 20)
        assert gw.metrics.live_dropped._value.get() > dropped_before  # the slow one lost updates
        # when the slow viewer reads again it is told it missed some
        gap = await _next_of(slow, "gap", wait_s=20)
        assert gap["dropped"] > 0
    assert received > 0
