"""Request bodies and query strings in, JSON out: validated by pydantic at the edge.

Error details list where and what, never the offending input: a rejected login body
must not echo its password back (or into a log).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.web.errors import ApiError

M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_BODY = 64 * 1024
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def is_form(request: web.Request) -> bool:
    return request.content_type in FORM_TYPES


def describe(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        out.append({"field": loc, "problem": err["msg"]})
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def loads_strict(data: bytes | str) -> Any:
    """``json.loads`` without NaN/Infinity (not JSON, and not storable)."""
    return json.loads(data, parse_constant=_reject_constant)


async def read_limited(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it exceeds ``max_bytes`` (chunked bodies too)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "too_large", f"body is larger than {max_bytes} bytes")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > max_bytes:
            raise ApiError(413, "too_large", f"body is larger than {max_bytes} bytes")
    return bytes(buf)


async def read_object(request: web.Request, max_bytes: int = DEFAULT_MAX_BODY) -> dict[str, Any] | None:
    """The body as a JSON object; None when it is empty; 400 when it is not JSON or not an object."""
    raw = await read_limited(request, max_bytes)
    if not raw.strip():
        return None
    try:
        data = loads_strict(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return data


def validated(model: type[M], data: Any) -> M:
    """``data`` as ``model``, or 400 with what is wrong where."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", describe(exc)) from None


async def parse_body(
    request: web.Request, model: type[M], *, max_bytes: int = DEFAULT_MAX_BODY, allow_form: bool = False
) -> M:
    """A JSON body (or, where a plain HTML form posts, a form) as ``model``."""
    data: dict[str, Any] | None
    if allow_form and is_form(request):
        if request.content_length is not None and request.content_length > max_bytes:
            raise ApiError(413, "too_large", f"body is larger than {max_bytes} bytes")
        form = await request.post()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
    else:
        data = await read_object(request, max_bytes)
        if data is None:
            raise ApiError(400, "invalid_json", "a JSON body is required")
    return validated(model, data)


def parse_query(request: web.Request, model: type[M]) -> M:
    if any(len(request.query.getall(k)) > 1 for k in request.query):
        raise ApiError(400, "invalid_query", "each query parameter may be given once")
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise ApiError(400, "invalid_query", describe(exc)) from None


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def paged(key: str, items: Sequence[Any], limit: int) -> dict[str, Any]:
    """``{key: [items]}``, one page of a newest-first list; a full page adds ``next_before_id`` (its last
    item's id), where the next page starts, as more may follow."""
    body: dict[str, Any] = {key: [i.model_dump(mode="json") for i in items]}
    if len(items) == limit:
        body["next_before_id"] = items[-1].id
    return body


def json_ok(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.json_response(data, status=status, headers=headers, dumps=dumps)
