"""How a route declares who may call it.

Stack ``@requires("devices.read")`` or ``@public()`` under the route decorator. The
auth middleware reads the declaration; a handler without one is refused (deny by
default), so forgetting it fails closed and shows up in the route-table test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from gateway.auth.principal import Principal
from gateway.web.keys import PRINCIPAL

_ATTR = "__siteward_access__"

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


@dataclass(frozen=True, slots=True)
class Access:
    # the permissions action; None for public routes
    action: str | None
    # machine endpoints (HTTP ingest): bearer token only, refusals counted in /metrics
    bearer_only: bool = False
    # HTML pages: an anonymous visitor is sent to /login, not given a JSON 401
    page: bool = False
    # reachable before the first admin exists (health, the setup page, static assets)
    during_setup: bool = False
    # the name of a boolean [web] setting that, when true, makes the route public
    public_if: str | None = None


def requires(action: str, *, bearer_only: bool = False, page: bool = False,
             public_if: str | None = None) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        setattr(handler, _ATTR, Access(action=action, bearer_only=bearer_only, page=page, public_if=public_if))
        return handler

    return mark


def public(*, page: bool = False, during_setup: bool = False) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        setattr(handler, _ATTR, Access(action=None, page=page, during_setup=during_setup))
        return handler

    return mark


STATIC_ACCESS = Access(action=None, during_setup=True)


def access_of(handler: object) -> Access | None:
    return getattr(handler, _ATTR, None)


def principal_of(request: web.Request) -> Principal:
    """The authenticated principal; only valid in handlers behind ``requires``."""
    return request[PRINCIPAL]  # type: ignore[no-any-return]
