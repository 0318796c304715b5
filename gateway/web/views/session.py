"""Logging in and out, who am I, first-start setup.

Login and setup accept JSON (scripts, the later UI) and plain HTML form posts (the
login page works without JavaScript). Both check the Origin: with no session yet there
is no CSRF token, and a foreign page must not log a browser into an attacker's account.
"""

from __future__ import annotations

import math

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth.errors import AuthError
from gateway.auth.passwords import MIN_LENGTH
from gateway.auth.principal import AuthMethod, Principal
from gateway.auth.sessions import COOKIE_NAME, NewSession
from gateway.auth.setup import WrongSetupCode, complete_setup
from gateway.logs import BurstLogger
from gateway.web.access import principal_of, public, requires
from gateway.web.bodies import is_form, json_ok, parse_body
from gateway.web.errors import ApiError
from gateway.web.keys import AUTH, GATEWAY, STATE
from gateway.web.middlewares import clear_session_cookie, ensure_same_origin, set_session_cookie
from gateway.web.permissions import allowed_actions
from gateway.web.render import Safe, page, tag

log = structlog.get_logger(__name__)
_burst = BurstLogger(log)

routes = web.RouteTableDef()

SETUP_LIMIT_KEY = "#setup"  # not a valid user name, so it never shares a counter with one


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)
    next: str | None = Field(default=None, max_length=2048)


class SetupBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = Field(min_length=1, max_length=64)
    username: str = Field(default="admin", max_length=256)
    password: str = Field(max_length=1024)
    # the HTML form sends it; JSON callers may leave it out
    password_repeat: str | None = Field(default=None, max_length=1024)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(max_length=1024)


def safe_next(target: str | None) -> str:
    """Only a path on this gateway: ``next=//evil.example`` must not become an open redirect."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(ch in target for ch in "\r\n\\") or target.startswith(("/login", "/setup", "/api/")):
        return "/"
    return target


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


def _session_body(principal_or_user: str, role: str, new: NewSession) -> dict[str, object]:
    return {
        "username": principal_or_user,
        "role": role,
        "auth": AuthMethod.SESSION.value,
        "csrf_token": new.csrf,
        "expires_at": new.expires_at,
    }


def _too_many(wait: float) -> ApiError:
    seconds = max(1, math.ceil(wait))
    return ApiError(
        429,
        "too_many_attempts",
        f"too many failed attempts; try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _message(text: str) -> Safe:
    return tag("p", text, class_="error", role="alert")


def _form_page(
    request: web.Request,
    name: str,
    title: str,
    *,
    message: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
    **values: object,
) -> web.Response:
    """A page of the anonymous visitor's forms (login, setup), with ``message`` as its error line."""
    gw = request.app[GATEWAY]
    resp = page(
        name,
        title=title,
        gateway_name=gw.settings.gateway.name,
        status=status,
        message=_message(message) if message else "",
        **values,
    )
    if headers:
        resp.headers.update(headers)
    return resp


def _login_page(
    request: web.Request,
    *,
    next_path: str,
    message: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return _form_page(request, "login.html", "Log in", message=message, status=status, headers=headers,
                      next=next_path)


@routes.get("/login")
@public(page=True)
async def login_page(request: web.Request) -> web.StreamResponse:
    next_path = safe_next(request.query.get("next"))
    auth = request.app[AUTH]
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie and await auth.sessions.resolve(cookie) is not None:
        return see_other(next_path)
    return _login_page(request, next_path=next_path)


@routes.post("/api/v1/login")
@public()
async def login(request: web.Request) -> web.StreamResponse:
    ensure_same_origin(request)
    form = is_form(request)
    try:
        body = await parse_body(request, LoginBody, max_bytes=8 * 1024, allow_form=True)
    except ApiError:
        if form:
            return _login_page(
                request, next_path="/", message="Enter a user name and a password.", status=400
            )
        raise
    auth = request.app[AUTH]
    gw = request.app[GATEWAY]
    address = _address(request)
    next_path = safe_next(body.next)

    wait = auth.limiter.retry_after(body.username, address)
    if wait is not None:
        err = _too_many(wait)
        if form:
            return _login_page(
                request, next_path=next_path, message=f"{err.detail}.", status=429, headers=err.headers
            )
        raise err

    user = await auth.users.authenticate(body.username, body.password)
    if user is None:
        _burst.warning(f"login:{address}", "web.login_failed", address=address)
        lock = auth.limiter.failure(body.username, address)
        if lock is not None:
            await gw.audit.record(
                "anonymous",
                "login.lockout",
                lock.username[:128],
                {
                    "address": address,
                    "scope": lock.scope,
                    "failures": lock.failures,
                    "lockout_s": lock.retry_after_s,
                },
            )
        if form:
            return _login_page(
                request, next_path=next_path, message="Wrong user name or password.", status=401
            )
        raise ApiError(401, "invalid_credentials", "wrong user name or password")

    auth.limiter.success(body.username, address)
    new = await auth.sessions.create(user.username, audit_detail={"address": address})
    resp = see_other(next_path) if form else json_ok(_session_body(user.username, user.role.value, new))
    set_session_cookie(request, resp, new.cookie_value, new.expires_at - auth.sessions.clock())
    return resp


@routes.post("/api/v1/logout")
@requires("session.self")
async def logout(request: web.Request) -> web.StreamResponse:
    principal = principal_of(request)
    if principal.method is AuthMethod.SESSION:
        await request.app[AUTH].sessions.end(principal, audit_detail={"address": _address(request)})
    resp = see_other("/login") if is_form(request) else web.Response(status=204)
    clear_session_cookie(request, resp)
    return resp


def me_body(principal: Principal) -> dict[str, object]:
    return {
        "username": principal.username,
        "role": principal.role.value,
        "auth": principal.method.value,
        "csrf_token": principal.csrf,
        "expires_at": principal.session_expires_at,
        "actions": allowed_actions(principal),
    }


@routes.get("/api/v1/me")
@requires("session.self")
async def me(request: web.Request) -> web.Response:
    return json_ok(me_body(principal_of(request)))


@routes.post("/api/v1/me/password")
@requires("account.password")
async def change_password(request: web.Request) -> web.Response:
    principal = principal_of(request)
    body = await parse_body(request, PasswordChange, max_bytes=8 * 1024)
    auth = request.app[AUTH]
    address = _address(request)
    wait = auth.limiter.retry_after(principal.username, address)
    if wait is not None:
        raise _too_many(wait)
    # a stolen, still-open session must not be enough to take the account over
    if await auth.users.authenticate(principal.username, body.current_password) is None:
        lock = auth.limiter.failure(principal.username, address)
        if lock is not None:
            await request.app[GATEWAY].audit.record(
                principal.username,
                "password.lockout",
                principal.username,
                {"address": address, "failures": lock.failures},
            )
        raise ApiError(403, "wrong_password", "the current password is wrong")
    auth.limiter.success(principal.username, address)
    await auth.users.set_password(
        principal.username,
        body.new_password,
        actor=principal.username,
        keep_session=principal.session_id_hash,
    )
    return web.Response(status=204)


def _setup_page(
    request: web.Request, *, message: str = "", status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return _form_page(request, "setup.html", "First start", message=message, status=status, headers=headers,
                      min_length=MIN_LENGTH)


@routes.get("/setup")
@public(page=True, during_setup=True)
async def setup_page(request: web.Request) -> web.StreamResponse:
    if not await request.app[STATE].setup_required():
        return see_other("/login")
    # appliance hook (issue 8): what first boot found wrong in the boot partition's siteward.toml
    problem = getattr(request.app[GATEWAY], "setup_error", None)
    return _setup_page(request, message=f"Boot configuration problem: {problem}" if problem else "")


@routes.post("/setup")
@public(during_setup=True)
async def setup(request: web.Request) -> web.StreamResponse:
    ensure_same_origin(request)
    form = is_form(request)
    state = request.app[STATE]
    if not await state.setup_required():
        raise ApiError(409, "setup_done", "the gateway already has an administrator")
    try:
        body = await parse_body(request, SetupBody, max_bytes=8 * 1024, allow_form=True)
    except ApiError:
        if form:
            return _setup_page(request, message="Fill in every field.", status=400)
        raise
    auth = request.app[AUTH]
    gw = request.app[GATEWAY]
    address = _address(request)

    wait = auth.limiter.retry_after(SETUP_LIMIT_KEY, address)
    if wait is not None:
        err = _too_many(wait)
        if form:
            return _setup_page(request, message=f"{err.detail}.", status=429, headers=err.headers)
        raise err
    try:
        if body.password_repeat is not None and body.password_repeat != body.password:
            raise ApiError(400, "passwords_differ", "the two passwords differ")
        user = await complete_setup(
            gw.db,
            auth.passwords,
            code=body.code,
            username=body.username,
            password=body.password,
            address=address,
        )
    except WrongSetupCode as exc:
        lock = auth.limiter.failure(SETUP_LIMIT_KEY, address)
        if lock is not None:
            await gw.audit.record(
                "anonymous", "setup.lockout", None, {"address": address, "failures": lock.failures}
            )
        if form:
            return _setup_page(request, message="Wrong setup code.", status=exc.status)
        raise
    except (ApiError, AuthError) as exc:
        if form:
            text = exc.message if isinstance(exc, AuthError) else str(exc.detail)
            return _setup_page(request, message=text[:1].upper() + text[1:] + ".", status=exc.status)
        raise
    state.mark_setup_done()
    log.info("web.setup_complete", username=user.username, address=address)
    new = await auth.sessions.create(user.username, audit_detail={"address": address, "after": "setup"})
    resp = see_other("/") if form else json_ok(_session_body(user.username, user.role.value, new), status=201)
    set_session_cookie(request, resp, new.cookie_value, new.expires_at - auth.sessions.clock())
    return resp
