"""Errors the auth layer raises; each carries the HTTP status and stable code it maps to,
so the web layer turns any of them into ``{"error": code, "detail": message}``."""

from __future__ import annotations


class AuthError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(AuthError):
    status = 400
    code = "invalid_request"


class NotFound(AuthError):
    status = 404
    code = "not_found"


class Conflict(AuthError):
    status = 409
    code = "conflict"


class LastAdmin(AuthError):
    status = 409
    code = "last_admin"


class SetupError(AuthError):
    """First-admin creation cannot proceed (bad configured hash, setup already done)."""

    status = 409
    code = "setup_error"
