"""Server-rendered pages from ``templates/`` with the standard library.

Templates use ``string.Template`` placeholders (``$name``); every value is HTML-escaped
unless wrapped in :class:`Safe` (used only for fragments this module itself built from
escaped parts). The page family of issue 5 may move to a template engine; it changes
this module and the template files, not the views' calls to :func:`page`.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Iterable
from pathlib import Path
from string import Template

from aiohttp import web

import gateway

TEMPLATES = Path(__file__).parent / "templates"


class Safe(str):
    """Markup that is already escaped."""

    __slots__ = ()


def esc(value: object) -> str:
    return value if isinstance(value, Safe) else html.escape(str(value), quote=True)


def join(parts: Iterable[str]) -> Safe:
    return Safe("".join(esc(p) for p in parts))


def tag(name: str, text: object = "", **attrs: object) -> Safe:
    """``<name attr="...">text</name>`` with everything escaped; ``class_`` -> ``class``,
    ``data_x`` -> ``data-x``; attributes set to None are left out."""
    rendered = "".join(
        f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None
    )
    return Safe(f"<{name}{rendered}>{esc(text)}</{name}>")


@functools.cache
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


def render(name: str, **values: object) -> Safe:
    return Safe(_template(name).substitute({k: esc(v) for k, v in values.items()}))


def page(
    name: str,
    *,
    title: str,
    status: int = 200,
    gateway_name: str = "Siteward",
    header: Safe | str = "",
    **values: object,
) -> web.Response:
    body = render(name, **values)
    text = render(
        "layout.html",
        title=title,
        gateway_name=gateway_name,
        header=header,
        body=body,
        version=gateway.__version__,
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
