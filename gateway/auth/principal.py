"""Who is making a web/API request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    TECHNICIAN = "technician"
    VIEWER = "viewer"


class AuthMethod(StrEnum):
    SESSION = "session"  # browser: cookie + CSRF token
    TOKEN = "token"  # scripts: Authorization: Bearer <API token>
    # an HTTP device: Authorization: Bearer <its own minted secret>, good only for posting
    # its own readings (see gateway.web.permissions.authorise)
    DEVICE = "device"


@dataclass(frozen=True, slots=True)
class Principal:
    username: str
    role: Role
    method: AuthMethod
    # session only: the token every state-changing request must echo back
    csrf: str | None = None
    # session only: which row to delete on logout
    session_id_hash: str | None = None
    session_expires_at: float | None = None
    # token only: for the audit trail and revocation
    token_id: str | None = None
    # device only: the one device whose readings this principal may post
    device_id: str | None = None

    @property
    def via(self) -> dict[str, str]:
        """How this principal authenticated, for audit details."""
        if self.method is AuthMethod.TOKEN and self.token_id:
            return {"via": "token", "token_id": self.token_id}
        return {"via": self.method.value}
