"""One error shape for the whole API: ``{"error": code, "detail": ...}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into a JSON response."""

    def __init__(
        self, status: int, error: str, detail: Any = None, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.error, self.detail, headers=self.headers)


def error_response(
    status: int, error: str, detail: Any = None, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": error}
    if detail is not None:
        body["detail"] = detail
    return web.json_response(body, status=status, headers=headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", what)
