"""Server-rendered pages from ``templates/`` with Jinja2, autoescaping on.

Every value placed in a template is HTML-escaped unless it is :class:`Safe` markup
(built here by :func:`tag` from escaped parts). Pages get one common context from
:func:`render_page`: who is looking, what they may do (so a viewer is not shown buttons
the server would refuse anyway), the CSRF token for the page's scripts, the navigation.
Scripts and styles are files under ``static/``: the CSP allows nothing inline.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from aiohttp import web
from markupsafe import Markup, escape

import gateway
from gateway.auth.principal import Principal
from gateway.web.keys import GATEWAY, PRINCIPAL
from gateway.web.permissions import allowed_actions

TEMPLATES = Path(__file__).parent / "templates"

# Markup that is already escaped (Jinja's own type, so templates leave it alone)
Safe = Markup

# (path, label, action needed to see it): the navigation, in the order it is shown
NAV: tuple[tuple[str, str, str], ...] = (
    ("/", "Overview", "devices.read"),
    ("/devices", "Devices", "devices.read"),
    ("/ble", "Nearby BLE", "devices.read"),
    ("/alerts", "Alerts", "rules.read"),
    ("/firmware", "Firmware", "ota.read"),
    ("/export", "Export", "devices.read"),
    ("/audit", "Audit", "audit.read"),
    ("/users", "Users", "users.admin"),
    ("/account", "Account", "session.self"),
)


def esc(value: object) -> Markup:
    return escape(value)


def join(parts: Iterable[object]) -> Markup:
    return Markup("").join(escape(p) for p in parts)


def tag(name: str, text: object = "", **attrs: object) -> Markup:
    """``<name attr="...">text</name>`` with everything escaped; ``class_`` -> ``class``,
    ``data_x`` -> ``data-x``; attributes set to None are left out."""
    rendered = "".join(
        f' {k.rstrip("_").replace("_", "-")}="{escape(v)}"' for k, v in attrs.items() if v is not None
    )
    return Markup(f"<{name}{rendered}>{escape(text)}</{name}>")


def format_value(value: object) -> str:
    """At most 3 decimals, no trailing zeros: the same rule as ``static/js/ui.js``, so a
    value does not change look when the live feed updates it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    text = f"{round(float(value), 3):.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(max(0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        # a misspelt variable is a bug to see in tests, not an empty cell in production
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["value"] = format_value
    env.filters["duration"] = format_duration
    env.filters["bytes"] = format_bytes
    env.globals["time_tag"] = time_tag
    return env


@functools.cache
def environment() -> jinja2.Environment:
    return _environment()


def render(name: str, **values: object) -> Markup:
    return Markup(environment().get_template(name).render(**values))


def time_tag(ts: float | None, tz: ZoneInfo, *, never: str = "never") -> Markup:
    """A ``<time>`` in the site's time zone; ``static/js/ui.js`` re-renders it in the
    browser's zone and keeps relative times current."""
    if ts is None:
        return tag("time", never)
    dt = datetime.fromtimestamp(ts, tz)
    shown = dt.strftime("%H:%M:%S") if abs(time.time() - ts) < 86400 else dt.strftime("%Y-%m-%d %H:%M")
    return tag("time", shown, datetime=dt.isoformat(timespec="seconds"), data_ts=f"{ts:.3f}")


def page(
    name: str,
    *,
    title: str,
    status: int = 200,
    gateway_name: str = "Siteward",
    principal: Principal | None = None,
    current: str = "",
    **values: object,
) -> web.Response:
    """A whole page; ``principal`` None for the pages of anonymous visitors (login, setup)."""
    actions = set(allowed_actions(principal)) if principal is not None else set()
    nav = [(path, label, path == current) for path, label, action in NAV if action in actions]
    text = render(
        name,
        title=title,
        gateway_name=gateway_name,
        principal=principal,
        csrf=(principal.csrf or "") if principal is not None else "",
        can=actions,
        nav=nav,
        version=gateway.__version__,
        **values,
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def render_page(request: web.Request, name: str, *, title: str, current: str = "", status: int = 200,
                **values: Any) -> web.Response:
    """A page for the logged-in principal of ``request`` (handlers behind ``requires(page=True)``)."""
    gw = request.app[GATEWAY]
    return page(name, title=title, status=status, gateway_name=gw.settings.gateway.name,
                principal=request.get(PRINCIPAL), current=current,
                tz=ZoneInfo(gw.settings.gateway.timezone), **values)
