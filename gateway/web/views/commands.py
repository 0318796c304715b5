"""Commands to devices: send (202: sent, confirmation follows), look up, list."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.devices.commands import CommandRefused
from gateway.devices.registry import UnknownDevice
from gateway.models import CommandRequest
from gateway.web.access import principal_of, requires
from gateway.web.bodies import json_ok, parse_body, parse_query
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY
from gateway.web.views.devices import find_device

routes = web.RouteTableDef()


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=500)


@routes.post("/api/v1/devices/{device_id}/commands")
@requires("commands.send")
async def send(request: web.Request) -> web.Response:
    req = await parse_body(request, CommandRequest)
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    principal = principal_of(request)
    try:
        cmd = await gw.commander.send(dev.id, req, actor=principal.username)
    except UnknownDevice:
        raise not_found("no such device") from None
    except CommandRefused as exc:
        raise ApiError(409, "command_refused", str(exc)) from None
    await gw.audit.record(
        principal.username,
        "command.send",
        dev.id,
        {**principal.via, "command_id": cmd.id, "command": cmd.command, "args": cmd.args},
    )
    return json_ok(cmd, status=202, headers={"Location": f"/api/v1/commands/{cmd.id}"})


@routes.get("/api/v1/commands/{command_id}")
@requires("commands.read")
async def get(request: web.Request) -> web.Response:
    command_id = request.match_info["command_id"]
    cmd = await request.app[GATEWAY].commander.get(command_id) if len(command_id) <= 64 else None
    if cmd is None:
        raise not_found("no such command")
    return json_ok(cmd)


@routes.get("/api/v1/devices/{device_id}/commands")
@requires("commands.read")
async def list_for(request: web.Request) -> web.Response:
    params = parse_query(request, ListParams)
    dev = await find_device(request)
    cmds = await request.app[GATEWAY].commander.list_for(dev.id, limit=params.limit)
    return json_ok({"device": dev.id, "commands": [c.model_dump(mode="json") for c in cmds]})
