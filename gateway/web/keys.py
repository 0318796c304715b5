"""Typed keys for what the web application keeps on itself and on requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.auth.principal import Principal
from gateway.auth.service import AuthService

# the running Gateway (gateway.app.Gateway); typed loosely to keep web importable on its own
GATEWAY: web.AppKey[Any] = web.AppKey("siteward_gateway", object)
AUTH = web.AppKey("siteward_auth", AuthService)
STATE: web.AppKey[Any] = web.AppKey("siteward_web_state", object)

# request[PRINCIPAL]: set by the auth middleware for every authenticated request
# (typed request keys arrived in aiohttp 3.12; older releases take the plain string)
PRINCIPAL: Any = (web.RequestKey("siteward_principal", Principal) if hasattr(web, "RequestKey")
                  else "siteward_principal")
