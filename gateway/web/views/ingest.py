"""HTTP ingest for devices that cannot speak MQTT: same payload, same path, same
guarantee (201 only once the readings are committed)."""

from __future__ import annotations

from aiohttp import web

from gateway.ingest.errors import Rejected
from gateway.web.access import requires
from gateway.web.bodies import json_ok, read_limited
from gateway.web.errors import ApiError
from gateway.web.keys import GATEWAY

routes = web.RouteTableDef()

# Rejected.reason -> HTTP status. Unlisted reasons are content the gateway understood
# but cannot store as readings: 422.
_STATUS = {
    "too_large": 413,
    "bad_encoding": 400,
    "bad_json": 400,
    "too_deep": 400,
    "not_object": 400,
    "bad_device_id": 400,
    "not_adopted": 409,
    "store_full": 507,
}


@routes.post("/api/v1/devices/{device_id}/telemetry")
@requires("ingest.write", bearer_only=True)
async def telemetry(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    limit = gw.settings.broker.max_payload_bytes
    try:
        body = await read_limited(request, limit)
    except ApiError as exc:
        if exc.status == 413:
            # never handed to ingest (it is not read past the limit), so counted here
            gw.metrics.rejected.labels(reason="too_large").inc()
        raise
    try:
        ids = await gw.ingest.ingest_http(request.match_info["device_id"], body)
    except Rejected as r:  # already counted by ingest
        raise ApiError(_STATUS.get(r.reason, 422), r.reason, r.detail) from None
    return json_ok({"stored": len(ids), "ids": ids}, status=201)
