"""BLE: the nearby list, and adopting, ignoring and keying sensors.

Viewers see the nearby list; technicians adopt, ignore and enter bindkeys (the same
``devices.*`` actions as for any other device). A bindkey goes into the BLE store sealed
and never comes back out: not in responses, not in the audit trail, not in logs.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from gateway.ble.manager import NotAdopted, normalise_address, parse_bindkey
from gateway.web.access import principal_of, requires
from gateway.web.bodies import json_ok, parse_body, read_object, validated
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY

routes = web.RouteTableDef()

MAX_BODY = 4096


def _check_key(v: SecretStr | None) -> SecretStr | None:
    if v is not None:
        try:
            parse_bindkey(v.get_secret_value())
        except ValueError:
            # the message must not echo the key back
            raise ValueError("a bindkey is 32 hexadecimal digits (24 for old MiBeacon sensors)") from None
    return v


class AdoptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bindkey: SecretStr | None = Field(default=None, max_length=64)

    _key = field_validator("bindkey")(_check_key)


class BindkeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bindkey: SecretStr = Field(max_length=64)

    _key = field_validator("bindkey")(_check_key)


def _address(request: web.Request) -> str:
    address = normalise_address(request.match_info["address"])
    if address is None:
        raise ApiError(400, "invalid_address", "a Bluetooth address looks like A4:C1:38:12:34:56")
    return address


async def _optional_body(request: web.Request) -> AdoptBody:
    data = await read_object(request, MAX_BODY)
    return AdoptBody() if data is None else validated(AdoptBody, data)


async def _audit(request: web.Request, action: str, address: str, detail: dict[str, Any]) -> None:
    principal = principal_of(request)
    await request.app[GATEWAY].audit.record(principal.username, action, address, {**principal.via, **detail})


@routes.get("/api/v1/ble/nearby")
@requires("devices.read")
async def nearby(request: web.Request) -> web.Response:
    ble = request.app[GATEWAY].ble
    return json_ok({"state": ble.state, "reason": ble.reason, "sensors": ble.manager.nearby()})


@routes.post("/api/v1/ble/{address}/adopt")
@requires("devices.write")
async def adopt(request: web.Request) -> web.Response:
    address = _address(request)
    # the bindkey is optional, and so is the body itself
    body = await _optional_body(request)
    ble = request.app[GATEWAY].ble
    key = parse_bindkey(body.bindkey.get_secret_value()) if body.bindkey is not None else None
    before = ble.manager.state_of(address)
    sensor = await ble.manager.adopt(address, key, actor=principal_of(request).username)
    await _audit(request, "ble.adopt", address, {"from": before, "bindkey_given": key is not None})
    return json_ok(sensor)


@routes.post("/api/v1/ble/{address}/ignore")
@requires("devices.write")
async def ignore(request: web.Request) -> web.Response:
    address = _address(request)
    ble = request.app[GATEWAY].ble
    before = ble.manager.state_of(address)
    sensor = await ble.manager.ignore(address, actor=principal_of(request).username)
    await _audit(request, "ble.ignore", address, {"from": before})
    return json_ok(sensor)


@routes.put("/api/v1/ble/{address}/bindkey")
@requires("devices.write")
async def bindkey(request: web.Request) -> web.Response:
    address = _address(request)
    body = await parse_body(request, BindkeyBody, max_bytes=MAX_BODY)
    ble = request.app[GATEWAY].ble
    try:
        sensor = await ble.manager.set_bindkey(address, parse_bindkey(body.bindkey.get_secret_value()),
                                               actor=principal_of(request).username)
    except NotAdopted:
        raise not_found("no adopted BLE sensor with this address; adopt it first (with its bindkey)") from None
    await _audit(request, "ble.bindkey_set", address, {})
    return json_ok(sensor)
