"""The one place that composes the web application: middlewares, state, page families.

A new API family (BLE, sync, rules, OTA) is a module in ``views/`` with a ``routes``
table, added to :data:`VIEWS`; its actions go into ``permissions.ACTIONS``. The
technician UI's pages are modules in ``pages/`` (``PAGES``), one per page family.
Nothing else needs to know about either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from gateway.auth.service import AuthService
from gateway.web.keys import AUTH, GATEWAY, STATE
from gateway.web.middlewares import WebState, auth_middleware, error_middleware, security_headers
from gateway.web.pages import PAGES
from gateway.web.views import (
    apidoc,
    audit,
    ble,
    commands,
    devices,
    health,
    history,
    ingest,
    live,
    ota,
    overview,
    rules,
    session,
    sync,
    tokens,
    users,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
VIEWS = (health, session, overview, history, apidoc, devices, commands, ingest, live, users, tokens, audit, ota, ble,
         sync, rules)

SESSION_PURGE_INTERVAL_S = 3600.0
# JSON bodies are small; HTTP ingest reads its own body under broker.max_payload_bytes
CLIENT_MAX_SIZE = 1024 * 1024


def build_web_app(gw: Gateway, *, auth: AuthService | None = None) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=max(CLIENT_MAX_SIZE, gw.settings.broker.max_payload_bytes + 1),
    )
    app[GATEWAY] = gw
    app[AUTH] = auth or AuthService(gw.db, gw.settings.web)
    app[STATE] = WebState(gw.db)
    for view in (*VIEWS, *PAGES):
        app.add_routes(view.routes)
    app.router.add_static("/static/", STATIC, name="static", append_version=False)
    app.on_response_prepare.append(security_headers)
    app.cleanup_ctx.append(_purge_sessions)
    return app


async def _purge_sessions(app: web.Application) -> AsyncIterator[None]:
    """Expired sessions are also cleared at each login; this covers a quiet gateway."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(SESSION_PURGE_INTERVAL_S)
            try:
                await app[AUTH].sessions.purge_expired()
            except Exception as exc:  # the store may be closing; try again next time
                log.warning("web.session_purge_failed", error=f"{type(exc).__name__}: {exc}")

    task = asyncio.create_task(loop(), name="web-session-purge")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
