"""Web tests: a real gateway (real SQLite file, real aiohttp server on a free port) and
HTTP clients that behave like a browser (cookie jar, CSRF token) or a script (bearer)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.settings import Settings

ADMIN = "admin"
ADMIN_PASSWORD = "correct horse battery"  # tests/conftest.py make_settings
USER_PASSWORD = "another fine password"


@dataclass
class Resp:
    status: int
    headers: Any
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.text[:200]!r}>"


class Client:
    """A browser (cookies + CSRF token) or, with ``token``, a script (bearer, no cookies)."""

    def __init__(self, base: str, *, token: str | None = None, origin: str | None = None) -> None:
        self.base = base
        self.token = token
        jar: aiohttp.abc.AbstractCookieJar = aiohttp.DummyCookieJar() if token else aiohttp.CookieJar(unsafe=True)
        self.http = aiohttp.ClientSession(cookie_jar=jar)
        self.csrf: str | None = None
        self.origin = origin

    async def close(self) -> None:
        await self.http.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        csrf: bool = True,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> Resp:
        h = dict(headers or {})
        if self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            h.setdefault("X-CSRF-Token", self.csrf)
        if self.origin:
            h.setdefault("Origin", self.origin)
        kw.setdefault("allow_redirects", False)
        async with self.http.request(method, self.base + path, json=json_body, data=data, headers=h, **kw) as r:
            return Resp(r.status, r.headers, await r.text())

    async def get(self, path: str, **kw: Any) -> Resp:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Resp:
        return await self.call("POST", path, json_body=body, **kw)

    async def login(self, username: str, password: str) -> Resp:
        r = await self.post("/api/v1/login", {"username": username, "password": password})
        if r.status == 200:
            self.csrf = r.json["csrf_token"]
        return r

    def cookie(self) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == "siteward_session":
                return c.value
        return None


class Site:
    """One running gateway and the clients talking to it."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.base = f"http://127.0.0.1:{gw.web_port}"
        self._clients: list[Client] = []
        self._admin: Client | None = None

    def client(self, **kw: Any) -> Client:
        c = Client(self.base, **kw)
        self._clients.append(c)
        return c

    async def admin(self) -> Client:
        if self._admin is None:
            self._admin = self.client()
            r = await self._admin.login(ADMIN, ADMIN_PASSWORD)
            assert r.status == 200, r
        return self._admin

    async def user(self, username: str, role: str, password: str = USER_PASSWORD) -> Client:
        """Create a user through the API (as admin) and return a logged-in browser."""
        admin = await self.admin()
        r = await admin.post("/api/v1/users", {"username": username, "password": password, "role": role})
        assert r.status == 201, r
        c = self.client()
        r = await c.login(username, password)
        assert r.status == 200, r
        return c

    async def token(self, username: str = ADMIN, name: str = "test") -> tuple[str, str]:
        """A bearer token for ``username`` (made by the admin): (token id, token)."""
        admin = await self.admin()
        r = await admin.post("/api/v1/tokens", {"name": name, "username": username})
        assert r.status == 201, r
        return r.json["id"], r.json["token"]

    async def script(self, username: str = ADMIN) -> Client:
        _, token = await self.token(username)
        return self.client(token=token)

    async def audit(self, action: str | None = None) -> list[dict[str, Any]]:
        entries = await self.gw.audit.query(action=action, limit=1000)
        return [e.model_dump() for e in entries]

    async def close(self) -> None:
        for c in self._clients:
            await c.close()


@pytest.fixture
def start_site(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """``async with start_site(web={...}) as site:`` for tests that need special settings."""

    @contextlib.asynccontextmanager
    async def start(**sections: dict[str, Any]) -> AsyncIterator[Site]:
        from gateway.app import Gateway

        async with Gateway(make_settings(**sections)) as gw:
            site = Site(gw)
            try:
                yield site
            finally:
                await site.close()

    return start


@pytest.fixture
async def site(start_site: Callable[..., Any]) -> AsyncIterator[Site]:
    async with start_site() as s:
        yield s
