"""The auth stores, bundled once per web application."""

from __future__ import annotations

from gateway.auth.passwords import Passwords
from gateway.auth.principal import AuthMethod, Principal
from gateway.auth.ratelimit import LoginLimiter
from gateway.auth.sessions import SessionStore
from gateway.auth.tokens import TokenStore
from gateway.auth.users import UserStore
from gateway.settings import WebSection
from gateway.store.database import Database


class AuthService:
    def __init__(self, db: Database, web: WebSection, *, passwords: Passwords | None = None) -> None:
        self.db = db
        self.passwords = passwords or Passwords()
        self.users = UserStore(db, self.passwords)
        self.sessions = SessionStore(db, web.session_ttl_s)
        self.tokens = TokenStore(db)
        self.limiter = LoginLimiter(web.login_attempts_per_minute)

    async def still_valid(self, principal: Principal) -> bool:
        """Re-check a principal held by a long-lived connection (logout, expiry,
        revocation, disabling and role changes all end it)."""
        if principal.method is AuthMethod.SESSION:
            return await self.sessions.still_valid(principal)
        return await self.tokens.still_valid(principal)
