"""Devices: list, detail with latest values, reading history, technician changes,
MQTT credentials."""

from __future__ import annotations

import re
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.devices.registry import UnknownDevice
from gateway.models import DEVICE_ID_PATTERN, Device, DeviceId, DeviceState, MetricName
from gateway.web.access import principal_of, requires
from gateway.web.bodies import json_ok, parse_body, parse_query
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY
from gateway.web.timeparams import Timestamp

routes = web.RouteTableDef()

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
MAX_READINGS = 10_000


class ReadingsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: MetricName | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    limit: int = Field(default=1000, ge=1, le=MAX_READINGS)

    @model_validator(mode="after")
    def _ordered(self) -> ReadingsParams:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be later than until")
        return self


TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}$"


class DeviceChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=128)
    location: str | None = Field(default=None, max_length=128)
    # replaces the device's tags (what rules and OTA campaigns target); [] or "" clears them
    tags: list[Annotated[str, Field(pattern=TAG_PATTERN)]] | None = Field(default=None, max_length=32)

    @field_validator("tags", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        # the device page's form sends one comma-separated string
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: DeviceId
    profiles: list[str] = Field(default_factory=lambda: ["native"], min_length=1, max_length=8)


def device_json(gw: Any, dev: Device) -> dict[str, Any]:
    return {**dev.model_dump(mode="json"), "latest": gw.registry.latest(dev.id)}


async def find_device(request: web.Request) -> Device:
    device_id = request.match_info["device_id"]
    dev = await request.app[GATEWAY].registry.get(device_id) if _DEVICE_RE.fullmatch(device_id) else None
    if dev is None:
        raise not_found("no such device")
    return dev


async def _audit(
    request: web.Request, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    principal = principal_of(request)
    await request.app[GATEWAY].audit.record(
        principal.username, action, target, {**principal.via, **(detail or {})}
    )


@routes.get("/api/v1/devices")
@requires("devices.read")
async def list_devices(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    devices = await gw.registry.list_devices()
    return json_ok({"devices": [device_json(gw, d) for d in devices]})


@routes.get("/api/v1/devices/{device_id}")
@requires("devices.read")
async def get_device(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    dev = await find_device(request)
    body = device_json(gw, dev)
    body["metrics"] = await gw.readings.metrics_of(dev.id)
    body["credentials"] = gw.credentials.has(dev.id)
    return json_ok(body)


@routes.get("/api/v1/devices/{device_id}/readings")
@requires("devices.read")
async def readings(request: web.Request) -> web.Response:
    params = parse_query(request, ReadingsParams)
    dev = await find_device(request)
    rows = await request.app[GATEWAY].readings.history(
        dev.id, metric=params.metric, since=params.since, until=params.until, limit=params.limit
    )
    return json_ok(
        {
            "device": dev.id,
            "metric": params.metric,
            "count": len(rows),
            # newest first; when this is true, ask again with until= the oldest ts returned
            "truncated": len(rows) == params.limit,
            "readings": [r.model_dump(mode="json") for r in rows],
        }
    )


@routes.patch("/api/v1/devices/{device_id}")
@requires("devices.write")
async def update_device(request: web.Request) -> web.Response:
    body = await parse_body(request, DeviceChange)
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    changes = body.model_dump(exclude_none=True)
    if changes:
        dev = await gw.registry.update_meta(dev.id, **changes)
        await _audit(request, "device.update", dev.id, changes)
    return json_ok(device_json(gw, dev))


async def _set_state(request: web.Request, state: DeviceState) -> web.Response:
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    before = dev.state
    dev = await (gw.registry.adopt(dev.id) if state is DeviceState.ADOPTED else gw.registry.ignore(dev.id))
    await _audit(
        request,
        f"device.{'adopt' if state is DeviceState.ADOPTED else 'ignore'}",
        dev.id,
        {"from": before.value},
    )
    return json_ok(device_json(gw, dev))


@routes.post("/api/v1/devices/{device_id}/adopt")
@requires("devices.write")
async def adopt(request: web.Request) -> web.Response:
    return await _set_state(request, DeviceState.ADOPTED)


@routes.post("/api/v1/devices/{device_id}/ignore")
@requires("devices.write")
async def ignore(request: web.Request) -> web.Response:
    return await _set_state(request, DeviceState.IGNORED)


@routes.delete("/api/v1/devices/{device_id}")
@requires("devices.write")
async def remove(request: web.Request) -> web.Response:
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    # a forgotten device must not keep a way in
    revoked = await gw.credentials.revoke(dev.id)
    try:
        await gw.registry.remove(dev.id)
    except UnknownDevice:
        raise not_found("no such device") from None
    await _audit(request, "device.remove", dev.id, {"credentials_revoked": bool(revoked)})
    return web.Response(status=204)


@routes.post("/api/v1/devices")
@requires("devices.write")
async def provision(request: web.Request) -> web.Response:
    """Mint MQTT credentials for a device (new, or replacing its old ones)."""
    body = await parse_body(request, NewDevice)
    gw = request.app[GATEWAY]
    unknown = [p for p in body.profiles if gw.profiles.get(p) is None]
    if unknown:
        raise ApiError(400, "unknown_profile", f"unknown profile(s): {', '.join(sorted(unknown))}")
    existed = await gw.registry.get(body.id) is not None
    secret = await gw.credentials.mint(body.id, tuple(body.profiles))
    dev = await gw.registry.ensure(body.id, profile=body.profiles[0], state=DeviceState.ADOPTED)
    await _audit(
        request, "device.credentials_minted", body.id, {"profiles": body.profiles, "existed": existed}
    )
    return json_ok(
        {
            "device": device_json(gw, dev),
            "profiles": body.profiles,
            # shown once: only a hash is kept
            "mqtt": {"username": body.id, "password": secret},
        },
        status=201,
    )


@routes.post("/api/v1/devices/{device_id}/credentials/revoke")
@requires("devices.write")
async def revoke_credentials(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    gw = request.app[GATEWAY]
    # works for a device the registry forgot too: credentials are what matters here
    if not _DEVICE_RE.fullmatch(device_id) or not await gw.credentials.revoke(device_id):
        raise not_found("no credentials for this device")
    await _audit(request, "device.credentials_revoked", device_id)
    return web.Response(status=204)
