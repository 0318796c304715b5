"""Compatibility profiles: topic pattern + payload shape → readings, as data not code.

A profile is a TOML file (shipped ones live in ``gateway/profiles/``; sites add their
own through ``[profiles] dirs``). Each *route* says which topics it takes, where the
device id comes from (a ``{device}`` topic level or a payload field), and how payload
fields become metrics. See docs/profiles.md for the format.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.ingest.errors import Rejected
from gateway.models import DEVICE_ID_PATTERN, METRIC_PATTERN

Kind = Literal["telemetry", "health", "status", "ota_status"]

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_METRIC_RE = re.compile(METRIC_PATTERN)


class FieldMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str = Field(pattern=METRIC_PATTERN)
    unit: str = ""
    scale: float = 1.0


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    kind: Kind = "telemetry"
    # object: every numeric key is a metric; fields: only mapped keys; type_value: one
    # reading per message, metric name in one field and value in another
    values: Literal["object", "fields", "type_value"] = "object"
    device_field: str | None = None
    device_prefix: str = ""
    # "mac": AA:BB:CC:DD:EE:FF → aabbccddeeff, so one sensor is one device whoever relays it
    device_normalise: Literal["none", "mac"] = "none"
    fields: dict[str, FieldMap] = Field(default_factory=dict)
    units: dict[str, str] = Field(default_factory=dict)
    metric_field: str = "type"
    value_field: str = "value"
    unit_field: str | None = "unit"
    ts_field: str | None = "ts"
    attributes: dict[str, str] = Field(default_factory=dict)
    # payload keys that are neither metrics nor attributes (object mode skips them)
    ignore: list[str] = Field(default_factory=list)
    # payload field naming the hub that relayed the reading (kept as attribute "via")
    via_field: str | None = None

    @field_validator("topic")
    @classmethod
    def _topic_ok(cls, v: str) -> str:
        levels = v.split("/")
        for i, lvl in enumerate(levels):
            if lvl == "#" and i != len(levels) - 1:
                raise ValueError("'#' must be the last topic level")
            if ("#" in lvl or "+" in lvl) and lvl not in ("#", "+"):
                raise ValueError(f"bad wildcard in topic level {lvl!r}")
            if "{" in lvl and lvl != "{device}":
                raise ValueError(f"only '{{device}}' may stand as a placeholder, got {lvl!r}")
        return v


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    description: str = ""
    routes: list[Route]
    command_topic: str | None = None
    ota_topic: str | None = None
    # topic filters a device with this profile may use ({device} = its own id)
    acl_publish: list[str] = Field(default_factory=list)
    acl_subscribe: list[str] = Field(default_factory=list)

    def acl(self, device_id: str) -> tuple[list[str], list[str]]:
        sub = lambda t: t.replace("{device}", device_id)  # noqa: E731
        return [sub(t) for t in self.acl_publish], [sub(t) for t in self.acl_subscribe]


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one message said, before it is stored."""

    kind: Kind
    device: str
    profile: str
    values: list[tuple[str, float, str]]  # (metric, value, unit)
    node_ts: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    status: Any = None
    via: str | None = None
    raw: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class _Compiled:
    profile: Profile
    route: Route
    levels: tuple[str, ...]
    device_level: int | None


def _finite_number(v: Any, key: str) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        f = float(v)
        if f != f or f in (float("inf"), float("-inf")):
            raise Rejected("not_finite", f"{key} is not a finite number")
        return f
    raise Rejected("non_numeric", f"{key} is {type(v).__name__}, expected a number")


def _reject_constant(name: str) -> float:
    raise Rejected("not_finite", f"{name} is not a finite number")


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 1
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, dict | list))
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, dict | list))
    return deepest


# built once: json.loads(..., parse_constant=...) makes a new decoder per call (~3% of ingest)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_json(payload: bytes, max_bytes: int, max_depth: int) -> Any:
    """Parse a payload under the limits every source shares."""
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_encoding", "payload is not UTF-8 text") from None
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise Rejected("too_deep", "JSON nesting too deep") from None
    except ValueError as exc:
        if isinstance(exc, Rejected):
            raise
        raise Rejected("bad_json", f"malformed JSON: {exc}") from None
    # nesting can only exceed the limit if there are more brackets than the limit (the walk
    # over the decoded object cost 14% of ingest when done for every flat telemetry message)
    if (isinstance(obj, dict | list) and payload.count(b"{") + payload.count(b"[") > max_depth
            and _depth(obj, max_depth) > max_depth):
        raise Rejected("too_deep", f"JSON nested deeper than {max_depth}")
    return obj


class ProfileSet:
    """All loaded profiles, indexed by first topic level for cheap rejection."""

    def __init__(self, profiles: list[Profile], *, max_payload_bytes: int = 65536, max_depth: int = 8) -> None:
        self.profiles = {p.name: p for p in profiles}
        self.max_payload_bytes = max_payload_bytes
        self.max_depth = max_depth
        self._by_first: dict[str, list[_Compiled]] = {}
        self._wild_first: list[_Compiled] = []
        for p in profiles:
            for r in p.routes:
                levels = tuple(r.topic.split("/"))
                dl = levels.index("{device}") if "{device}" in levels else None
                if dl is None and r.device_field is None:
                    raise ValueError(f"profile {p.name}: route {r.topic} names no device (topic or field)")
                c = _Compiled(p, r, levels, dl)
                if levels[0] in ("+", "#", "{device}"):
                    self._wild_first.append(c)
                else:
                    self._by_first.setdefault(levels[0], []).append(c)

    def get(self, name: str) -> Profile | None:
        return self.profiles.get(name)

    def match(self, topic: str) -> tuple[_Compiled, str | None] | None:
        parts = topic.split("/")
        for c in (*self._by_first.get(parts[0], ()), *self._wild_first):
            dev = _match_levels(c.levels, parts)
            if dev is not False:
                return c, dev  # type: ignore[return-value]
        return None

    def command_topic(self, profile: str | None, device: str) -> str:
        p = self.profiles.get(profile or "native") or self.profiles.get("native")
        tmpl = (p.command_topic if p and p.command_topic else "devices/{device}/command")
        return tmpl.replace("{device}", device)

    def parse(self, topic: str, payload: bytes) -> Parsed:
        hit = self.match(topic)
        if hit is None:
            raise Rejected("unknown_topic", f"no profile takes topic {topic}")
        c, topic_device = hit
        return self.parse_route(c.profile, c.route, topic_device, payload)

    def parse_route(self, profile: Profile, route: Route, topic_device: str | None, payload: bytes) -> Parsed:
        if route.kind == "status":
            # LWT and simple nodes publish bare words ("online"/"offline")
            stripped = payload.strip()
            if stripped and stripped[:1] not in (b"{", b"["):
                if len(stripped) > 64:
                    raise Rejected("too_large", "status word longer than 64 bytes")
                try:
                    word = stripped.decode("utf-8")
                except UnicodeDecodeError:
                    raise Rejected("bad_encoding", "status is not UTF-8 text") from None
                dev = self._device(route, topic_device, {})
                return Parsed("status", dev, profile.name, [], status=word.strip('"'))
        obj = decode_json(payload, self.max_payload_bytes, self.max_depth)
        if not isinstance(obj, dict):
            raise Rejected("not_object", f"expected a JSON object, got {type(obj).__name__}")
        dev = self._device(route, topic_device, obj)
        node_ts = None
        if route.ts_field and route.ts_field in obj:
            node_ts = _parse_ts(obj[route.ts_field])
        attributes = {attr: obj[key] for key, attr in route.attributes.items() if key in obj}
        for k, v in attributes.items():
            if not isinstance(v, str | int | float | bool) or (isinstance(v, str) and len(v) > 64):
                raise Rejected("bad_attribute", f"{k} must be a short scalar")
        via = None
        if route.via_field and route.via_field in obj:
            via = str(obj[route.via_field])[:64]
        if route.kind == "ota_status":
            return Parsed("ota_status", dev, profile.name, [], node_ts, attributes, raw=obj)
        values = self._values(route, obj)
        status = obj if route.kind == "status" else None
        return Parsed(route.kind, dev, profile.name, values, node_ts, attributes, status, via)

    def _device(self, route: Route, topic_device: str | None, obj: dict[str, Any]) -> str:
        if route.device_field is not None:
            raw = obj.get(route.device_field)
            if not isinstance(raw, str | int) or isinstance(raw, bool):
                raise Rejected("bad_device_id", f"payload field {route.device_field!r} missing or not a string")
            raw = str(raw)
            if route.device_normalise == "mac":
                raw = raw.replace(":", "").replace("-", "").lower()
        else:
            raw = topic_device or ""
        dev = route.device_prefix + raw
        if not _DEVICE_RE.match(dev):
            raise Rejected("bad_device_id", f"device id {dev[:80]!r} is not allowed")
        return dev

    def _values(self, route: Route, obj: dict[str, Any]) -> list[tuple[str, float, str]]:
        out: list[tuple[str, float, str]] = []
        skip = {route.ts_field, route.device_field, route.via_field, *route.attributes, *route.ignore}
        if route.values == "type_value":
            metric = obj.get(route.metric_field)
            if not isinstance(metric, str) or not _METRIC_RE.match(metric):
                raise Rejected("bad_metric", f"field {route.metric_field!r} must name a metric")
            if route.value_field not in obj:
                raise Rejected("missing_value", f"field {route.value_field!r} missing")
            value = _finite_number(obj[route.value_field], metric)
            unit = ""
            if route.unit_field and isinstance(obj.get(route.unit_field), str):
                unit = obj[route.unit_field][:16]
            fm = route.fields.get(metric)
            if fm is not None:
                return [(fm.metric, value * fm.scale, fm.unit or unit)]
            return [(metric, value, unit or route.units.get(metric, ""))]
        if route.values == "fields":
            for key, fm in route.fields.items():
                if key in obj and obj[key] is not None:
                    out.append((fm.metric, _finite_number(obj[key], key) * fm.scale, fm.unit))
            if not out and route.kind == "telemetry":
                raise Rejected("no_values", "no known field in payload")
            return out
        # object: every remaining key is a metric
        for key, v in obj.items():
            if key in skip:
                continue
            fm = route.fields.get(key)
            if route.kind == "status" and not isinstance(v, int | float):
                # status words ("on"/"off") become 1/0 readings; other text stays state only
                if isinstance(v, str) and v.lower() in _STATE_WORDS:
                    out.append((fm.metric if fm else key, _STATE_WORDS[v.lower()], ""))
                continue
            if not _METRIC_RE.match(key):
                raise Rejected("bad_metric", f"metric name {key[:40]!r} is not allowed")
            value = _finite_number(v, key)
            if fm is not None:
                out.append((fm.metric, value * fm.scale, fm.unit))
            else:
                out.append((key, value, route.units.get(key, "")))
        if not out and route.kind == "telemetry":
            raise Rejected("no_values", "telemetry without any metric")
        return out


_STATE_WORDS = {"on": 1.0, "off": 0.0, "true": 1.0, "false": 0.0, "open": 1.0, "closed": 0.0}


def _parse_ts(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Rejected("bad_timestamp", "ts must be a number of seconds (or milliseconds) since 1970")
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        raise Rejected("bad_timestamp", "ts is not finite")
    return f / 1000.0 if f > 1e11 else f


def _match_levels(pattern: tuple[str, ...], parts: list[str]) -> str | bool | None:
    """Return the {device} level (or None when there is none) on match, False otherwise."""
    dev: str | None = None
    n = len(parts)
    for i, lvl in enumerate(pattern):
        if lvl == "#":
            return dev
        if i >= n:
            return False
        if lvl == "+":
            continue
        if lvl == "{device}":
            if not parts[i]:
                return False
            dev = parts[i]
            continue
        if lvl != parts[i]:
            return False
    return dev if n == len(pattern) else False


def _load_file(path: Path | Any) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return Profile.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"profile {path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"profile {path}: bad value for '{key}': {first['msg']}") from None


def load_profiles(extra_dirs: list[Path] | tuple[Path, ...] = (), enabled: list[str] | None = None,
                  **limits: int) -> ProfileSet:
    found: dict[str, Profile] = {}
    shipped = resources.files("gateway") / "profiles"
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            p = _load_file(entry)
            found[p.name] = p
    for d in extra_dirs:
        for f in sorted(Path(d).glob("*.toml")):
            p = _load_file(f)
            found[p.name] = p  # a site may override a shipped profile by name
    if enabled is not None:
        missing = [n for n in enabled if n not in found]
        if missing:
            raise ValueError(f"profiles.enabled names unknown profile(s): {', '.join(missing)}")
        found = {n: p for n, p in found.items() if n in enabled or n == "native"}
    return ProfileSet(list(found.values()), **limits)
