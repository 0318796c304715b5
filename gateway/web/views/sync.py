"""The cloud uplink as the gateway sees it: connected or not, backlog, drops, duplicates.

The figures come from the store (what is unsent, what the quota dropped) and from the
status row the sync process writes every few seconds (connected since when, last
error, send rate); see ``cloud_sync.status``. A stale row means the sync process is not
running, and the answer says so instead of repeating its last words.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from cloud_sync.status import read_sync_view
from gateway.web.access import requires
from gateway.web.bodies import json_ok
from gateway.web.keys import GATEWAY

routes = web.RouteTableDef()


@routes.get("/api/v1/sync")
@requires("sync.read")
async def sync_status(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    cloud = gw.settings.cloud
    # index lookups on a read-only connection of its own, off the event loop
    view = await asyncio.to_thread(read_sync_view, gw.settings.db_path, enabled=cloud.enabled,
                                   status_interval_s=cloud.status_interval_s)
    view["broker"] = {"host": cloud.host, "port": cloud.port, "transport": cloud.transport,
                      "mqtt_version": cloud.mqtt_version} if cloud.enabled else None
    return json_ok(view)
