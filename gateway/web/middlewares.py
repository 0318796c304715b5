"""Errors, first-start gate, authentication, authorisation, CSRF and security headers.

Order (outermost first): errors -> auth. The auth middleware, for every request:

1. finds the route's access declaration (none: refused);
2. until the first admin exists, answers 503 ``setup_required`` for everything not
   marked ``during_setup``;
3. authenticates: ``Authorization: Bearer`` if present (a bad one is refused, never
   "fall back to the cookie"), else the session cookie;
4. for cookie-authenticated requests: refuses a foreign ``Origin`` and, on every
   state-changing method, a missing or wrong CSRF token. Bearer requests need no CSRF
   token: a browser never attaches an Authorization header across sites by itself;
5. asks :func:`gateway.web.permissions.authorise`.

Security headers are added in ``on_response_prepare`` so that every response gets them,
including static files, errors and WebSocket upgrades.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.auth.errors import AuthError
from gateway.auth.principal import AuthMethod, Principal, Role
from gateway.auth.sessions import COOKIE_NAME
from gateway.auth.setup import setup_required
from gateway.store.database import Database, StoreClosed
from gateway.web.access import STATIC_ACCESS, Access, access_of
from gateway.web.bodies import is_form
from gateway.web.errors import ApiError, error_response
from gateway.web.keys import AUTH, GATEWAY, PRINCIPAL, STATE
from gateway.web.permissions import authorise

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"

# No inline script or style, nothing from another host: the UI must work with the
# internet unplugged anyway, and this turns an injected <script> into a no-op.
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # not "no-referrer": with it, browsers send "Origin: null" on same-origin form posts,
    # which the Origin check must refuse; "same-origin" still leaks nothing to other sites
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


class WebState:
    """Per-application state the middlewares share."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._setup_done = False
        self.live_connections = 0

    async def setup_required(self) -> bool:
        # Once an admin exists one always does (the last admin cannot be removed), so
        # the answer is cached then; before that, ask the database each time, so an
        # admin created by another process (the CLI) is seen at once.
        if self._setup_done:
            return False
        if await setup_required(self._db):
            return True
        self._setup_done = True
        return False

    def mark_setup_done(self) -> None:
        self._setup_done = True


def wants_html(request: web.Request) -> bool:
    if request.path.startswith("/api/"):
        return False
    return "text/html" in request.headers.get("Accept", "")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if _is_page(request) and wants_html(request):
            return _error_page(request, exc)
        return exc.response()
    except AuthError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or wants_html(request):
            raise
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        code = (exc.reason or "error").lower().replace(" ", "_")
        return error_response(exc.status, code, headers=headers)
    except StoreClosed:
        return error_response(503, "shutting_down", "the gateway is stopping")
    except (HttpProcessingError, ValueError) as exc:
        if not _malformed_body(exc):
            log.exception("web.unhandled", method=request.method, path=request.path)
            return error_response(500, "internal", "unexpected error; see the gateway log")
        return error_response(400, "invalid_body", "the request body could not be parsed")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("web.unhandled", method=request.method, path=request.path)
        if wants_html(request):
            raise web.HTTPInternalServerError(text="Internal error; see the gateway log.") from None
        return error_response(500, "internal", "unexpected error; see the gateway log")


_PAGE_ERRORS = {
    403: ("Not allowed", "Your role does not include this page. Ask an administrator if you need it."),
    404: ("Not found", "There is nothing here (any more): it may have been removed."),
}


def _is_page(request: web.Request) -> bool:
    access = access_of(request.match_info.handler) if request.match_info.http_exception is None else None
    return access is not None and access.page


def _error_page(request: web.Request, exc: ApiError) -> web.Response:
    """A page refused or missing gets a page, not a JSON document, in the browser."""
    from gateway.web.render import page

    heading, text = _PAGE_ERRORS.get(exc.status, ("Something went wrong", str(exc.detail or exc.error)))
    gw = request.app[GATEWAY]
    return page("error.html", title=heading, status=exc.status, gateway_name=gw.settings.gateway.name,
                principal=request.get(PRINCIPAL), heading=heading, text=text)


def _malformed_body(exc: Exception) -> bool:
    """True for aiohttp's own complaints about a client's body (a multipart form without a
    boundary, a part with a bad header): the client's mistake, answered 400, not a crash.
    Found by the schemathesis run in tests/ui/test_openapi.py."""
    if isinstance(exc, HttpProcessingError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return where.endswith(("aiohttp/multipart.py", "aiohttp/web_request.py", "aiohttp/helpers.py"))


def _route_access(request: web.Request) -> Access | None:
    route = request.match_info.route
    if isinstance(route.resource, web.StaticResource):
        return STATIC_ACCESS
    return access_of(request.match_info.handler)


def same_origin(request: web.Request) -> bool:
    """False if the request names a foreign Origin (absent is fine: not a browser, or a
    same-origin GET, which browsers send without one)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == request.host.lower()


def ensure_same_origin(request: web.Request) -> None:
    if not same_origin(request):
        raise ApiError(403, "cross_origin", "request from another site refused")


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/')}")


def _count_refusal(request: web.Request, access: Access) -> None:
    # HTTP ingest auth failures are "bad input" the operator should see in /metrics
    if access.bearer_only:
        request.app[GATEWAY].metrics.rejected.labels(reason="http_unauthorised").inc()


async def _device_principal(request: web.Request, secret: str) -> Principal | None:
    """An HTTP device authenticates with the secret minted for it, for its own URL only."""
    device_id = request.match_info.get("device_id")
    if not device_id or not secret:
        return None
    login = await request.app[GATEWAY].credentials.verify_fresh(device_id, secret)
    if login is None:
        return None
    return Principal(username=f"device:{device_id}", role=Role.VIEWER, method=AuthMethod.DEVICE,
                     device_id=device_id)


async def _authenticate(request: web.Request, access: Access) -> Principal:
    auth = request.app[AUTH]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        principal = await auth.tokens.resolve(value) if scheme.lower() == "bearer" and value.strip() else None
        if principal is None and access.bearer_only and scheme.lower() == "bearer":
            principal = await _device_principal(request, value.strip())
        if principal is None:
            _count_refusal(request, access)
            raise ApiError(
                401,
                "invalid_token",
                "the bearer token is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="siteward", error="invalid_token"'},
            )
        return principal
    if access.bearer_only:
        _count_refusal(request, access)
        raise ApiError(
            401,
            "unauthorised",
            "this endpoint needs Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="siteward"'},
        )
    cookie = request.cookies.get(COOKIE_NAME)
    principal = await auth.sessions.resolve(cookie) if cookie else None
    if principal is None:
        if access.page:
            raise login_redirect(request)
        raise ApiError(
            401,
            "unauthorised",
            "log in, or send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="siteward"'},
        )
    return principal


async def _check_csrf(request: web.Request, principal: Principal) -> None:
    offered: Any = request.headers.get(CSRF_HEADER)
    if offered is None and is_form(request):
        offered = (await request.post()).get(CSRF_FIELD)
    expected = principal.csrf or ""
    if (
        not isinstance(offered, str)
        or not offered
        or not hmac.compare_digest(offered.encode(), expected.encode())
    ):
        raise ApiError(403, "csrf", f"missing or wrong CSRF token (send the {CSRF_HEADER} header)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.http_exception is not None:
        return await handler(request)  # 404 / 405 from the router
    access = _route_access(request)
    if access is None:
        log.error("web.route_without_access_rule", path=request.path)
        raise ApiError(403, "forbidden", "this route declares no access rule")
    if not access.during_setup and await request.app[STATE].setup_required():
        if access.page:
            raise web.HTTPSeeOther("/setup")
        raise ApiError(503, "setup_required", "the gateway has no admin yet: open /setup")
    if access.action is None or (access.public_if and getattr(request.app[GATEWAY].settings.web, access.public_if)):
        return await handler(request)

    principal = await _authenticate(request, access)
    if principal.method is AuthMethod.SESSION:
        ensure_same_origin(request)
        if request.method not in SAFE_METHODS:
            await _check_csrf(request, principal)
    # known before the decision so that a refused page can still show who is logged in and the
    # navigation they may use; the handler itself only ever runs after authorise() said yes
    request[PRINCIPAL] = principal
    if not authorise(principal, access.action):
        _count_refusal(request, access)
        raise ApiError(403, "forbidden", f"role {principal.role.value!r} may not do {access.action!r}")
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h["Server"] = "Siteward"  # not the Python/aiohttp versions
    for name, value in SECURITY_HEADERS.items():
        h.setdefault(name, value)
    if not request.path.startswith("/static/"):
        # API answers and pages carry per-user data: never keep them in a shared cache
        h.setdefault("Cache-Control", "no-store")


def cookie_secure(request: web.Request) -> bool:
    return bool(request.app[GATEWAY].settings.web.tls or request.secure)


def set_session_cookie(
    request: web.Request, response: web.StreamResponse, value: str, max_age: float
) -> None:
    response.set_cookie(
        COOKIE_NAME,
        value,
        max_age=int(max_age),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(request),
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(
        COOKIE_NAME, path="/", httponly=True, samesite="Strict", secure=cookie_secure(request)
    )
