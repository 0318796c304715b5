"""Alert rules, alerts, schedules, groups and automation results (docs/rules.md).

Viewers read everything here; technicians change rules, schedules and groups, override
schedules and acknowledge alerts. Rules and schedules of the config file are listed with
``"source": "config"`` and refuse changes (409): the file is the installer's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.models import DeviceId
from gateway.rules.alerts import AlertConflict, AlertNotFound
from gateway.rules.models import RULE_ID_PATTERN, PositiveDuration, Schedule, TagName, UnknownKind
from gateway.rules.service import Rules, RulesError
from gateway.web.access import principal_of, requires
from gateway.web.bodies import describe, json_ok, paged, parse_body, parse_query, read_object, validated
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY
from gateway.web.timeparams import Timestamp

routes = web.RouteTableDef()

T = TypeVar("T")

MAX_BODY = 64 * 1024


class AlertQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["open", "active", "acknowledged", "cleared"] | None = None
    rule: str | None = Field(default=None, pattern=RULE_ID_PATTERN)
    device: str | None = Field(default=None, max_length=64)
    severity: Literal["info", "warning", "critical"] | None = None
    since: Timestamp | None = None
    before_id: int | None = Field(default=None, ge=1)
    limit: int = Field(default=100, ge=1, le=1000)


class RunQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    origin: Literal["rule", "schedule"] | None = None
    origin_id: str | None = Field(default=None, pattern=RULE_ID_PATTERN)
    alert_id: int | None = Field(default=None, ge=1)
    device: str | None = Field(default=None, max_length=64)
    before_id: int | None = Field(default=None, ge=1)
    limit: int = Field(default=100, ge=1, le=1000)


class OverrideBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # hold the relay on or off; leave out to pause the schedule without changing anything
    state: Literal["on", "off"] | None = None
    # until when (unix seconds or ISO 8601), or for how long; neither: until the next occurrence
    until: Timestamp | None = None
    for_s: PositiveDuration | None = None

    @model_validator(mode="after")
    def _one_end(self) -> OverrideBody:
        if self.until is not None and self.for_s is not None:
            raise ValueError("give 'until' or 'for_s', not both")
        return self


class GroupName(BaseModel):
    name: TagName


class GroupBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[DeviceId] = Field(max_length=10_000)


def _rules(request: web.Request) -> Rules:
    return request.app[GATEWAY].rules  # type: ignore[no-any-return]


def _who(request: web.Request) -> tuple[str, dict[str, Any]]:
    p = principal_of(request)
    return p.username, dict(p.via)


async def _json_body(request: web.Request) -> dict[str, Any]:
    data = await read_object(request, MAX_BODY)
    if data is None:
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return data


def _with_path_id(request: web.Request, data: dict[str, Any], key: str) -> dict[str, Any]:
    path_id = request.match_info[key]
    if "id" in data and data["id"] != path_id:
        raise ApiError(400, "invalid_request", [{"field": "id", "problem": "must match the id in the path"}])
    return {**data, "id": path_id}


def _failed(exc: RulesError) -> ApiError:
    return ApiError(exc.status, {404: "not_found", 409: "conflict"}.get(exc.status, "invalid_request"), str(exc))


async def _change(request: web.Request, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, a change to the rules, made by the caller (``by``/``via``: audited);
    a refusal (:class:`RulesError`) as its API error."""
    by, via = _who(request)
    try:
        return await call(*args, by=by, via=via, **kwargs)
    except RulesError as exc:
        raise _failed(exc) from None


# -- rules ---------------------------------------------------------------------------------------------

def _rule_json(rules: Rules, rule: Any, source: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {**rule.model_dump(mode="json"), "source": source, **meta.get(rule.id, {}),
            "open_alerts": rules.engine.open_count(rule.id)}


async def _parse_rule(request: web.Request, data: dict[str, Any]) -> Any:
    try:
        return await _rules(request).parse_rule(data)
    except UnknownKind as exc:
        raise ApiError(400, "invalid_request", [{"field": "kind", "problem": str(exc)}]) from None
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", describe(exc)) from None


@routes.get("/api/v1/rules")
@requires("rules.read")
async def list_rules(request: web.Request) -> web.Response:
    rules = _rules(request)
    meta = await rules.definitions.meta("alert_rules")
    out = [_rule_json(rules, r, rules.rule(r.id)[1], meta) for r in rules.all_rules()]  # type: ignore[index]
    return json_ok({"rules": out})


@routes.post("/api/v1/rules")
@requires("rules.write")
async def create_rule(request: web.Request) -> web.Response:
    rule = await _parse_rule(request, await _json_body(request))
    await _change(request, _rules(request).put_rule, rule, create=True)
    return json_ok({**rule.model_dump(mode="json"), "source": "api"}, status=201,
                   headers={"Location": f"/api/v1/rules/{rule.id}"})


@routes.get("/api/v1/rules/{rule_id}")
@requires("rules.read")
async def get_rule(request: web.Request) -> web.Response:
    rules = _rules(request)
    found = rules.rule(request.match_info["rule_id"])
    if found is None:
        raise not_found("no such rule")
    body = _rule_json(rules, found[0], found[1], await rules.definitions.meta("alert_rules"))
    return json_ok(body)


@routes.put("/api/v1/rules/{rule_id}")
@requires("rules.write")
async def replace_rule(request: web.Request) -> web.Response:
    rule = await _parse_rule(request, _with_path_id(request, await _json_body(request), "rule_id"))
    await _change(request, _rules(request).put_rule, rule, create=False)
    return json_ok({**rule.model_dump(mode="json"), "source": "api"})


@routes.delete("/api/v1/rules/{rule_id}")
@requires("rules.write")
async def delete_rule(request: web.Request) -> web.Response:
    await _change(request, _rules(request).delete_rule, request.match_info["rule_id"])
    return web.Response(status=204)


# -- alerts ----------------------------------------------------------------------------------------------

@routes.get("/api/v1/alerts")
@requires("rules.read")
async def list_alerts(request: web.Request) -> web.Response:
    q = parse_query(request, AlertQuery)
    alerts = await _rules(request).alerts.query(state=q.state, rule_id=q.rule, device=q.device, severity=q.severity,
                                                since=q.since, before_id=q.before_id, limit=q.limit)
    return json_ok(paged("alerts", alerts, q.limit))


def _alert_id(request: web.Request) -> int:
    raw = request.match_info["alert_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise not_found("no such alert")
    return int(raw)


@routes.get("/api/v1/alerts/{alert_id}")
@requires("rules.read")
async def get_alert(request: web.Request) -> web.Response:
    rules = _rules(request)
    alert = await rules.alerts.get(_alert_id(request))
    if alert is None:
        raise not_found("no such alert")
    runs = await rules.actuator.runs(alert_id=alert.id)
    return json_ok({**alert.model_dump(mode="json"), "automation_runs": [r.model_dump(mode="json") for r in runs]})


@routes.post("/api/v1/alerts/{alert_id}/ack")
@requires("alerts.ack")
async def acknowledge(request: web.Request) -> web.Response:
    by, via = _who(request)
    try:
        alert = await _rules(request).acknowledge(_alert_id(request), by=by, via=via)
    except AlertNotFound:
        raise not_found("no such alert") from None
    except AlertConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return json_ok(alert)


# -- schedules ---------------------------------------------------------------------------------------------

def _schedule_json(rules: Rules, sched: Schedule, source: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {**sched.model_dump(mode="json"), "source": source, **meta.get(sched.id, {}),
            "status": rules.scheduler.status(sched.id)}


@routes.get("/api/v1/schedules")
@requires("rules.read")
async def list_schedules(request: web.Request) -> web.Response:
    rules = _rules(request)
    meta = await rules.definitions.meta("schedules")
    out = [_schedule_json(rules, s, rules.schedule(s.id)[1], meta)  # type: ignore[index]
           for s in rules.all_schedules()]
    return json_ok({"timezone": str(rules.scheduler.tz), "schedules": out})


@routes.post("/api/v1/schedules")
@requires("rules.write")
async def create_schedule(request: web.Request) -> web.Response:
    sched = validated(Schedule, await _json_body(request))
    rules = _rules(request)
    await _change(request, rules.put_schedule, sched, create=True)
    return json_ok(_schedule_json(rules, sched, "api", {}), status=201,
                   headers={"Location": f"/api/v1/schedules/{sched.id}"})


@routes.get("/api/v1/schedules/{schedule_id}")
@requires("rules.read")
async def get_schedule(request: web.Request) -> web.Response:
    rules = _rules(request)
    found = rules.schedule(request.match_info["schedule_id"])
    if found is None:
        raise not_found("no such schedule")
    return json_ok(_schedule_json(rules, found[0], found[1], await rules.definitions.meta("schedules")))


@routes.put("/api/v1/schedules/{schedule_id}")
@requires("rules.write")
async def replace_schedule(request: web.Request) -> web.Response:
    sched = validated(Schedule, _with_path_id(request, await _json_body(request), "schedule_id"))
    rules = _rules(request)
    await _change(request, rules.put_schedule, sched, create=False)
    return json_ok(_schedule_json(rules, sched, "api", {}))


@routes.delete("/api/v1/schedules/{schedule_id}")
@requires("rules.write")
async def delete_schedule(request: web.Request) -> web.Response:
    await _change(request, _rules(request).delete_schedule, request.match_info["schedule_id"])
    return web.Response(status=204)


@routes.post("/api/v1/schedules/{schedule_id}/override")
@requires("rules.write")
async def set_override(request: web.Request) -> web.Response:
    body = await parse_body(request, OverrideBody)
    until = time.time() + body.for_s if body.for_s is not None else body.until
    status = await _change(request, _rules(request).override, request.match_info["schedule_id"], state=body.state,
                           until=until)
    return json_ok(status)


@routes.delete("/api/v1/schedules/{schedule_id}/override")
@requires("rules.write")
async def cancel_override(request: web.Request) -> web.Response:
    status = await _change(request, _rules(request).cancel_override, request.match_info["schedule_id"])
    return json_ok(status)


# -- groups and automation runs -------------------------------------------------------------------------------

@routes.get("/api/v1/rule-groups")
@requires("rules.read")
async def list_groups(request: web.Request) -> web.Response:
    groups = _rules(request).groups()
    return json_ok({"groups": [{"name": k, "devices": v, "source": src} for k, (v, src) in sorted(groups.items())]})


@routes.put("/api/v1/rule-groups/{name}")
@requires("rules.write")
async def put_group(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    validated(GroupName, {"name": name})
    body = await parse_body(request, GroupBody)
    await _change(request, _rules(request).put_group, name, body.devices)
    return json_ok({"name": name, "devices": body.devices, "source": "api"})


@routes.delete("/api/v1/rule-groups/{name}")
@requires("rules.write")
async def delete_group(request: web.Request) -> web.Response:
    await _change(request, _rules(request).delete_group, request.match_info["name"])
    return web.Response(status=204)


@routes.get("/api/v1/automation-runs")
@requires("rules.read")
async def list_runs(request: web.Request) -> web.Response:
    q = parse_query(request, RunQuery)
    runs = await _rules(request).actuator.runs(origin=q.origin, origin_id=q.origin_id, alert_id=q.alert_id,
                                               device=q.device, before_id=q.before_id, limit=q.limit)
    return json_ok(paged("runs", runs, q.limit))
