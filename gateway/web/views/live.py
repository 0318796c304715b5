"""The live feed: bus events as JSON text frames over a WebSocket.

A viewer on weak Wi-Fi must never slow the gateway down: the bus gives each socket a
bounded queue and drops that viewer's oldest updates when it falls behind (counted in
``siteward_live_dropped``); the socket then gets a ``{"type": "gap"}`` frame so the page
knows to re-read current values instead of showing stale ones as live.

The socket lives longer than any single request, so its credentials are re-checked
periodically: logout, expiry, token revocation, disabling or a role change close it
with code 4401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from gateway.auth.principal import Principal
from gateway.web.access import principal_of, requires
from gateway.web.errors import ApiError
from gateway.web.keys import AUTH, GATEWAY, STATE

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

MAX_VIEWERS = 64  # each costs a queue of up to QUEUE_SIZE events: bounded on a Pi
QUEUE_SIZE = 1000
RECHECK_S = 30.0
SEND_TIMEOUT_S = 10.0
CLOSE_AUTH_ENDED = 4401
CLOSE_TOO_SLOW = 4408


def _dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), default=str, allow_nan=False)


async def _forward(ws: web.WebSocketResponse, sub: Any, device: str | None) -> None:
    reported = 0
    async for event in sub:
        if device is not None and event.get("device") != device:
            continue
        if sub.dropped != reported:
            reported = sub.dropped
            await ws.send_str(_dumps({"type": "gap", "dropped": reported}))
        try:
            await asyncio.wait_for(ws.send_str(_dumps(event)), SEND_TIMEOUT_S)
        except TimeoutError:
            # the TCP connection is stuck, not just slow: free its queue and buffers
            await ws.close(code=CLOSE_TOO_SLOW, message=b"too slow")
            return


async def _drain(ws: web.WebSocketResponse) -> None:
    # the feed is one-way; reading keeps control frames (ping/close) flowing
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and msg.data == "ping":
            await ws.send_str(_dumps({"type": "pong", "ts": time.time()}))


async def _watch(ws: web.WebSocketResponse, request: web.Request, principal: Principal) -> None:
    auth = request.app[AUTH]
    while True:
        wait = RECHECK_S
        if principal.session_expires_at is not None:
            wait = max(0.0, min(wait, principal.session_expires_at - time.time()))
        await asyncio.sleep(wait)
        expired = principal.session_expires_at is not None and time.time() >= principal.session_expires_at
        if expired or not await auth.still_valid(principal):
            await ws.close(code=CLOSE_AUTH_ENDED, message=b"authentication ended")
            return


@routes.get("/api/v1/live")
@requires("live.read")
async def live(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    state = request.app[STATE]
    principal = principal_of(request)
    device = request.query.get("device")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "connect with a WebSocket client")
    if state.live_connections >= MAX_VIEWERS:
        raise ApiError(503, "too_many_viewers", f"at most {MAX_VIEWERS} live viewers at a time")
    state.live_connections += 1
    try:
        async with gw.bus.subscribe(maxsize=QUEUE_SIZE) as sub:
            await ws.prepare(request)
            await ws.send_str(
                _dumps(
                    {
                        "type": "hello",
                        "user": principal.username,
                        "role": principal.role.value,
                        "device": device,
                        "ts": time.time(),
                    }
                )
            )
            tasks = [
                asyncio.create_task(_forward(ws, sub, device)),
                asyncio.create_task(_drain(ws)),
                asyncio.create_task(_watch(ws, request, principal)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        exc = t.exception()
                        if not isinstance(exc, ConnectionResetError):
                            log.warning("web.live_error", error=f"{type(exc).__name__}: {exc}")
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
    finally:
        state.live_connections -= 1
        await ws.close()
    return ws
