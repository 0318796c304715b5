"""The OpenAPI description of the JSON API, built from the running route table.

Nothing is written twice: paths and methods come from the router, who may call a route
from its access declaration (``gateway.web.access``), and the query, body and response
schemas from the very pydantic models the handlers validate with (``parse_query`` /
``parse_body``) or answer with. A handler states its models with :func:`described`;
handlers of modules written before this file are described in :func:`_elsewhere`
(by module and handler name; a renamed handler shows up as undescribed in the test).

``tests/ui/test_openapi.py`` fails for an ``/api/`` route without a description and runs
schemathesis against the document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

import gateway
from gateway.web.access import access_of

H = TypeVar("H", bound=Callable[..., Any])

_ATTR = "__siteward_doc__"
REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Doc:
    summary: str
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    # what the success answer is: JSON (with ``response`` as its schema), CSV, a file, nothing
    produces: str = "application/json"
    # how the body comes: JSON, or a multipart form (firmware upload)
    consumes: str = "application/json"
    body_required: bool = True
    # path parameter -> (JSON schema, description)
    path_params: tuple[tuple[str, dict[str, Any]], ...] = ()


def described(summary: str, **kw: Any) -> Callable[[H], H]:
    """Attach an OpenAPI description to a handler (stack it under ``@requires``)."""
    doc = Doc(summary=summary, **kw)

    def mark(handler: H) -> H:
        setattr(handler, _ATTR, doc)
        return handler

    return mark


class ApiErrorBody(BaseModel):
    """Every API error: a stable code and a sentence or a list of field problems."""

    error: str
    detail: Any = None


class Empty(BaseModel):
    model_config = ConfigDict(extra="allow")


class Anything(BaseModel):
    """An object whose fields the handler documents in docs/api.md."""

    model_config = ConfigDict(extra="allow")


class Readings(BaseModel):
    device: str
    metric: str | None
    count: int
    truncated: bool
    readings: list[Any] = Field(default_factory=list)


def _elsewhere() -> dict[Callable[..., Any], Doc]:
    """Descriptions of handlers in modules that do not (yet) use :func:`described`.

    Entries name ``(module, handler)``; one that no longer resolves is skipped (and its
    route then shows up as undescribed in the test), never fatal for the document.
    """
    import importlib

    from gateway.models import Command, CommandRequest

    def m(module: str, name: str) -> Any:
        return getattr(importlib.import_module(f"gateway.web.views.{module}"), name)

    def body(module: str, name: str) -> Any:
        try:
            return m(module, name)
        except (ImportError, AttributeError):
            return Anything

    dev = (("device_id", {"type": "string", "maxLength": 64}),)
    addr = (("address", {"type": "string", "maxLength": 32}),)
    sha = (("sha256", {"type": "string", "maxLength": 96}),)
    camp = (("campaign_id", {"type": "string", "maxLength": 64}),)
    rule = (("rule_id", {"type": "string", "maxLength": 64}),)
    sched = (("schedule_id", {"type": "string", "maxLength": 64}),)
    alert = (("alert_id", {"type": "string", "maxLength": 20}),)
    user = (("username", {"type": "string", "maxLength": 256}),)
    group = (("name", {"type": "string", "maxLength": 64}),)
    any_ok = {"response": Anything}
    none = {"status": 204, "produces": ""}
    entries: list[tuple[str, str, str, dict[str, Any]]] = [
        ("health", "healthz", "Health of every component (no login)", any_ok),
        ("health", "metrics", "Prometheus metrics (no login)", {"produces": "text/plain"}),
        ("session", "login", "Log in: sets the session cookie", {"body": body("session", "LoginBody"), **any_ok}),
        ("session", "logout", "Log out", none),
        ("session", "me", "Who am I, my CSRF token and allowed actions", any_ok),
        ("session", "change_password", "Change one's own password (browser session only)",
         {"body": body("session", "PasswordChange"), **none}),
        ("session", "setup", "First start: create the first admin with the setup code",
         {"body": body("session", "SetupBody"), "status": 201, **any_ok}),
        ("devices", "list_devices", "All devices with their latest values", any_ok),
        ("devices", "get_device", "One device", {"path_params": dev, **any_ok}),
        ("devices", "readings", "Raw reading history, newest first",
         {"path_params": dev, "query": body("devices", "ReadingsParams"), "response": Readings}),
        ("devices", "update_device", "Rename or locate a device",
         {"path_params": dev, "body": body("devices", "DeviceChange"), **any_ok}),
        ("devices", "adopt", "Adopt a device", {"path_params": dev, **any_ok}),
        ("devices", "ignore", "Ignore a device", {"path_params": dev, **any_ok}),
        ("devices", "remove", "Remove a device (its readings stay)", {"path_params": dev, **none}),
        ("devices", "provision", "Mint MQTT credentials (shown once) and adopt",
         {"body": body("devices", "NewDevice"), "status": 201, **any_ok}),
        ("devices", "revoke_credentials", "Revoke a device's MQTT credentials", {"path_params": dev, **none}),
        ("commands", "send", "Send a command; its confirmation follows",
         {"path_params": dev, "body": CommandRequest, "status": 202, "response": Command}),
        ("commands", "get", "One command and its state",
         {"path_params": (("command_id", {"type": "string"}),), "response": Command}),
        ("commands", "list_for", "A device's commands, newest first",
         {"path_params": dev, "query": body("commands", "ListParams"), **any_ok}),
        ("ingest", "telemetry", "HTTP ingest (bearer token only)",
         {"path_params": dev, "body": Anything, "status": 201, **any_ok}),
        ("live", "live", "The live feed (WebSocket upgrade)", {"query": LiveQuery, "status": 101, "produces": ""}),
        ("users", "list_users", "Users", any_ok),
        ("users", "create_user", "Create a user", {"body": body("users", "NewUser"), "status": 201, **any_ok}),
        ("users", "get_user", "One user", {"path_params": user, **any_ok}),
        ("users", "update_user", "Change a user's role, password or disabled flag",
         {"path_params": user, "body": body("users", "UserChange"), **any_ok}),
        ("users", "delete_user", "Delete a user", {"path_params": user, **none}),
        ("tokens", "list_tokens", "API tokens", {"query": TokenQuery, **any_ok}),
        ("tokens", "create_token", "Create an API token (shown once)",
         {"body": body("tokens", "NewToken"), "status": 201, **any_ok}),
        ("tokens", "revoke_token", "Revoke an API token", {"path_params": (("token_id", {"type": "string"}),), **none}),
        ("audit", "audit_trail", "The audit trail, newest first", {"query": body("audit", "AuditQuery"), **any_ok}),
        ("sync", "sync_status", "The cloud uplink: connected, backlog, drops", any_ok),
        ("ble", "nearby", "BLE sensors heard nearby", any_ok),
        ("ble", "adopt", "Adopt a BLE sensor (optionally with its bindkey)",
         {"path_params": addr, "body": body("ble", "AdoptBody"), "body_required": False, **any_ok}),
        ("ble", "ignore", "Ignore a BLE sensor", {"path_params": addr, **any_ok}),
        ("ble", "bindkey", "Set an adopted sensor's bindkey",
         {"path_params": addr, "body": body("ble", "BindkeyBody"), **any_ok}),
        ("ota", "list_firmware", "Firmware images", any_ok),
        ("ota", "signing_key", "The gateway's manifest signing key", any_ok),
        ("ota", "upload", "Upload a firmware image",
         {"consumes": "multipart/form-data", "body": FirmwareUpload, "status": 201, **any_ok}),
        ("ota", "get_firmware", "One firmware image", {"path_params": sha, **any_ok}),
        ("ota", "block", "Block a firmware image", {"path_params": sha, "body": body("ota", "BlockBody"), **any_ok}),
        ("ota", "unblock", "Unblock a firmware image", {"path_params": sha, **any_ok}),
        ("ota", "list_campaigns", "Rollout campaigns", any_ok),
        ("ota", "create_campaign", "Start a rollout campaign",
         {"body": _campaign_request(), "status": 201, **any_ok}),
        ("ota", "get_campaign", "One campaign with its nodes", {"path_params": camp, **any_ok}),
        ("ota", "campaign_history", "A campaign's history", {"path_params": camp, **any_ok}),
        ("ota", "pause", "Pause a campaign", {"path_params": camp, **any_ok}),
        ("ota", "resume", "Resume a campaign", {"path_params": camp, **any_ok}),
        ("ota", "abort", "Abort a campaign", {"path_params": camp, **any_ok}),
        ("ota", "download", "Firmware download for nodes (token or Basic auth)",
         {"path_params": (("name", {"type": "string", "maxLength": 100}),), "query": ImageQuery,
          "produces": "application/octet-stream"}),
        ("ota", "ports", "Serial ports for USB flashing", any_ok),
        ("ota", "start_flash", "Flash a node over USB",
         {"body": body("ota", "FlashBody"), "status": 202, **any_ok}),
        ("ota", "flash_job", "A flash job's progress", {"path_params": (("job_id", {"type": "string"}),), **any_ok}),
        ("rules", "list_rules", "Alert rules", any_ok),
        ("rules", "create_rule", "Create an alert rule (docs/rules.md)",
         {"body": Anything, "status": 201, **any_ok}),
        ("rules", "get_rule", "One alert rule", {"path_params": rule, **any_ok}),
        ("rules", "replace_rule", "Replace an alert rule", {"path_params": rule, "body": Anything, **any_ok}),
        ("rules", "delete_rule", "Delete an alert rule", {"path_params": rule, **none}),
        ("rules", "list_alerts", "Alerts, newest first", {"query": body("rules", "AlertQuery"), **any_ok}),
        ("rules", "get_alert", "One alert with its automation runs", {"path_params": alert, **any_ok}),
        ("rules", "acknowledge", "Acknowledge an alert", {"path_params": alert, **any_ok}),
        ("rules", "list_schedules", "Schedules", any_ok),
        ("rules", "create_schedule", "Create a schedule", {"body": Anything, "status": 201, **any_ok}),
        ("rules", "get_schedule", "One schedule", {"path_params": sched, **any_ok}),
        ("rules", "replace_schedule", "Replace a schedule", {"path_params": sched, "body": Anything, **any_ok}),
        ("rules", "delete_schedule", "Delete a schedule", {"path_params": sched, **none}),
        ("rules", "set_override", "Override a schedule",
         {"path_params": sched, "body": body("rules", "OverrideBody"), "body_required": False, **any_ok}),
        ("rules", "cancel_override", "End a schedule's override", {"path_params": sched, **any_ok}),
        ("rules", "list_groups", "Device groups (tags)", any_ok),
        ("rules", "put_group", "Set a group's devices",
         {"path_params": group, "body": body("rules", "GroupBody"), **any_ok}),
        ("rules", "delete_group", "Delete a group", {"path_params": group, **none}),
        ("rules", "list_runs", "Automation results", {"query": body("rules", "RunQuery"), **any_ok}),
    ]
    table: dict[Callable[..., Any], Doc] = {}
    for module, name, summary, kw in entries:
        try:
            table[m(module, name)] = Doc(summary=summary, **kw)
        except (ImportError, AttributeError):
            continue
    return table


class TokenQuery(BaseModel):
    username: str | None = Field(default=None, max_length=256)
    all: Literal["0", "1", "true", "false"] | None = None
    revoked: Literal["0", "1", "true", "false"] | None = None


class LiveQuery(BaseModel):
    device: str | None = Field(default=None, max_length=64)


class ImageQuery(BaseModel):
    device: str | None = None
    exp: str | None = None
    token: str | None = None


class FirmwareUpload(BaseModel):
    file: bytes = Field(json_schema_extra={"format": "binary"})
    envelope: str | None = None


def _campaign_request() -> type[BaseModel]:
    from gateway.ota.service import CampaignRequest

    return CampaignRequest  # type: ignore[no-any-return]


@functools.cache
def elsewhere() -> dict[Callable[..., Any], Doc]:
    return _elsewhere()


def doc_of(handler: Callable[..., Any]) -> Doc | None:
    own = getattr(handler, _ATTR, None)
    if own is not None:
        return own  # type: ignore[no-any-return]
    return elsewhere().get(handler)


class _Schemas:
    """Collects component schemas of the models the document refers to."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        name = model.__name__ if mode == "validation" else f"{model.__name__}Out"
        if mode == "serialization" and name not in self.components:
            # the same model read and written can differ (computed fields); keep both apart
            pass
        self.components.setdefault(name, schema)
        return {"$ref": REF.format(model=name)}


def _parameters(doc: Doc, schemas: _Schemas, path: str) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    declared = dict(doc.path_params)
    for seg in path.split("/"):
        if seg.startswith("{") and seg.endswith("}"):
            name = seg[1:-1].split(":")[0]
            params.append({"name": name, "in": "path", "required": True,
                           "schema": declared.get(name, {"type": "string"})})
    if doc.query is not None:
        schema = doc.query.model_json_schema(ref_template=REF, mode="validation")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.components.setdefault(name, sub)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
    return params


def _security(handler: Callable[..., Any]) -> tuple[list[dict[str, list[str]]], str | None]:
    access = access_of(handler)
    if access is None or access.action is None:
        return [], None
    if access.bearer_only:
        return [{"bearer": []}], access.action
    return [{"session": [], "csrf": []}, {"bearer": []}], access.action


def build(app: web.Application) -> dict[str, Any]:
    schemas = _Schemas()
    error_ref = schemas.ref(ApiErrorBody, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        if route.method in ("HEAD", "*") or isinstance(route.resource, web.StaticResource):
            continue
        access = access_of(route.handler)
        if access is None or access.page or route.resource is None:
            continue
        path = route.resource.canonical
        doc = doc_of(route.handler)
        if doc is None:
            doc = Doc(summary="(not described)")
        security, action = _security(route.handler)
        op: dict[str, Any] = {
            "operationId": f"{route.method.lower()}_{route.handler.__module__.rsplit('.', 1)[-1]}_"
                           f"{route.handler.__name__}",
            "summary": doc.summary,
            "parameters": _parameters(doc, schemas, path),
            "security": security,
            "responses": {},
        }
        if action is not None:
            op["x-siteward-action"] = action
        if doc.body is not None:
            body_schema = (schemas.ref(doc.body, "validation") if doc.body is not Anything
                           else {"type": "object"})
            op["requestBody"] = {"required": doc.body_required, "content": {doc.consumes: {"schema": body_schema}}}
        ok: dict[str, Any] = {"description": "success"}
        if doc.produces == "application/json":
            ok["content"] = {"application/json": {"schema": schemas.ref(doc.response, "serialization")
                                                  if doc.response not in (None, Anything) else {"type": "object"}}}
        elif doc.produces:
            ok["content"] = {doc.produces: {"schema": {"type": "string"}}}
        op["responses"][str(doc.status)] = ok
        for status, what in (("400", "bad request"), ("401", "not logged in"), ("403", "refused"),
                             ("404", "not found"), ("409", "conflict"), ("413", "too large"),
                             ("422", "not storable"), ("429", "too many attempts"), ("503", "unavailable")):
            op["responses"].setdefault(status, {"description": what,
                                                "content": {"application/json": {"schema": error_ref}}})
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Siteward gateway API",
            "version": gateway.__version__,
            "description": "The local HTTP API of a Siteward gateway (docs/api.md). Generated from the route "
                           "table and the pydantic models the handlers use.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "siteward_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def undescribed(app: web.Application) -> list[str]:
    """``METHOD /path`` of every API route without a description (the test wants none)."""
    out = []
    for route in app.router.routes():
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource) or route.resource is None:
            continue
        access = access_of(route.handler)
        if access is None or access.page:
            continue
        if doc_of(route.handler) is None:
            out.append(f"{route.method} {route.resource.canonical}")
    return out
