"""The formats of alert rules, automations and schedules: one set of pydantic models for the
config file (``[[rules.threshold]]``, ``[[rules.schedule]]``, ...) and the API (the same
objects as JSON, with ``"kind"``).

Validation is the user interface here: every error names the field it is about
(``rules.threshold.0.above``; ``above`` in an API answer) and says what would be
accepted, because the person reading it is a technician on a site, not a developer.

What is checked beyond types:

- the metric exists: the built-in catalogue below, ``[rules] known_metrics``, and (API)
  the metrics the gateway's profiles declare or its devices have actually sent;
- the threshold is possible: a catalogued metric has physical limits (humidity 0-100 %),
  and a rule that could never fire, would always fire, or could never clear is refused;
- schedule times and cron-like fields are in range, and a schedule fires at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.models import DeviceId, FiniteFloat, MetricName
from gateway.rules.cron import CronError, CronSpec, daily, parse_at, parse_cron, parse_days

T = TypeVar("T")

# physical limits (lowest, highest possible value) of metrics Siteward knows; None: unbounded.
# Not alarm levels: they only let a rule that can never fire (humidity above 120 %) be refused.
METRIC_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "temperature": (-273.15, None),
    "dewpoint": (-273.15, None),
    "humidity": (0.0, 100.0),
    "moisture": (0.0, 100.0),
    "soil_moisture": (0.0, 100.0),
    "battery": (0.0, 100.0),
    "battery_voltage": (0.0, None),
    "pressure": (0.0, None),
    "co2": (0.0, None),
    "tvoc": (0.0, None),
    "voc": (0.0, None),
    "pm1": (0.0, None),
    "pm25": (0.0, None),
    "pm10": (0.0, None),
    "illuminance": (0.0, None),
    "voltage": (None, None),
    "current": (None, None),
    "power": (None, None),
    "energy": (None, None),
    "power_factor": (-1.0, 1.0),
    "frequency": (0.0, None),
    "rssi": (-150.0, 20.0),
    "heap": (0.0, None),
    "uptime": (0.0, None),
    "relay": (0.0, 1.0),
    "motion": (0.0, 1.0),
    "occupancy": (0.0, 1.0),
    "contact": (0.0, 1.0),
    "door": (0.0, 1.0),
    "water_leak": (0.0, 1.0),
    "weight": (None, None),
    "distance": (0.0, None),
    "speed": (0.0, None),
    "wind_speed": (0.0, None),
    "rain": (0.0, None),
    "flow": (None, None),
    "level": (None, None),
}

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}

RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RuleId = Annotated[str, Field(pattern=RULE_ID_PATTERN)]
TagName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
KindName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
CommandName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]

MAX_ARGS_JSON = 2048
MAX_DURATION_S = 30 * 86400.0

# set while a [rules] section validates: the known_metrics it declares (see RulesConfig)
_CONFIG_METRICS: ContextVar[frozenset[str] | None] = ContextVar("siteward_rule_metrics", default=None)

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(v: Any) -> Any:
    """Seconds as a number, or a string such as ``"90s"``, ``"5m"``, ``"1h30m"``, ``"2d"``."""
    if isinstance(v, str):
        text = v.strip().lower()
        try:
            return float(text)
        except ValueError:
            pass
        pos, total = 0, 0.0
        for m in _DURATION_RE.finditer(text):
            if text[pos:m.start()].strip():
                break
            total += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos == 0 or text[pos:].strip():
            raise ValueError(f"{v!r} is not a duration (seconds, or e.g. \"90s\", \"5m\", \"1h30m\", \"2d\")")
        return total
    return v


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0, le=MAX_DURATION_S)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0, le=MAX_DURATION_S)]


def _small_args(v: dict[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"args must be plain JSON: {exc}") from None
    if len(text) > MAX_ARGS_JSON:
        raise ValueError(f"args are too large ({len(text)} characters, at most {MAX_ARGS_JSON})")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- targets -----------------------------------------------------------------------------------

class Target(_Model):
    """Which devices a rule or schedule is about: exactly one of the fields."""

    device: DeviceId | None = None
    # a group defined in [rules.groups] / the API, or a tag a device reports in attributes["tags"]
    tag: TagName | None = None
    # all devices of a kind ("node", "ble", ...) or of a profile ("smartplug", ...)
    kind: KindName | None = None
    profile: KindName | None = None
    all: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [n for n in ("device", "tag", "kind", "profile") if getattr(self, n) is not None]
        if self.all:
            given.append("all")
        if len(given) != 1:
            raise ValueError("give exactly one of device, tag, kind, profile or all = true"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def matches(self, device_id: str, kind: str | None, profile: str | None, tags: Collection[str],
                groups: Mapping[str, frozenset[str]]) -> bool:
        if self.device is not None:
            return device_id == self.device
        if self.tag is not None:
            return device_id in groups.get(self.tag, ()) or self.tag in tags
        if self.kind is not None:
            return kind == self.kind
        if self.profile is not None:
            return profile == self.profile
        return self.all

    def describe(self) -> str:
        for n in ("device", "tag", "kind", "profile"):
            v = getattr(self, n)
            if v is not None:
                return f"{n} {v}"
        return "all devices"



# -- automations ---------------------------------------------------------------------------------

class Action(_Model):
    """Send a command when the rule's alert is raised (``fire``) or cleared (``clear``)."""

    when: Literal["fire", "clear"] = "fire"
    # the device to command; default: the device the alert is about
    device: DeviceId | None = None
    command: CommandName
    args: Annotated[dict[str, Any], Field(default_factory=dict)]
    # no second run of this action for the same device within this time (flapping inputs)
    cooldown_s: Duration = 300.0
    timeout_s: float | None = Field(default=None, gt=0, le=3600)

    _args = field_validator("args")(_small_args)


# -- alert rules ----------------------------------------------------------------------------------

class _RuleBase(_Model):
    id: RuleId
    name: str | None = Field(default=None, max_length=128)
    severity: Severity = "warning"
    enabled: bool = True


def _check_metric(v: str, info: ValidationInfo) -> str:
    ctx = info.context if isinstance(info.context, dict) else None
    if ctx is not None and "metrics" in ctx:
        known = ctx["metrics"]
        if known is None:  # stored rules were checked when they were made
            return v
        known = frozenset(known) | METRIC_LIMITS.keys()
    else:
        known = frozenset(_CONFIG_METRICS.get() or ()) | METRIC_LIMITS.keys()
    if v not in known:
        raise ValueError(f"unknown metric {v!r}: not in Siteward's catalogue, not declared by a profile and not "
                         "sent by any device (list it in [rules] known_metrics if a device will send it)")
    return v


def _limits(info: ValidationInfo) -> tuple[str | None, float | None, float | None]:
    metric = info.data.get("metric")
    lo, hi = METRIC_LIMITS.get(metric, (None, None)) if metric else (None, None)
    return metric, lo, hi


def _check_above(v: float | None, info: ValidationInfo) -> float | None:
    metric, lo, hi = _limits(info)
    if v is None:
        return v
    if hi is not None and v >= hi:
        raise ValueError(f"impossible threshold: {metric} is never above {hi:g}")
    if lo is not None and v < lo:
        raise ValueError(f"impossible threshold: {metric} is never below {lo:g}, so it would always be above {v:g}")
    return v


def _check_below(v: float | None, info: ValidationInfo) -> float | None:
    metric, lo, hi = _limits(info)
    if v is None:
        return v
    if lo is not None and v <= lo:
        raise ValueError(f"impossible threshold: {metric} is never below {lo:g}")
    if hi is not None and v > hi:
        raise ValueError(f"impossible threshold: {metric} is never above {hi:g}, so it would always be below {v:g}")
    return v


def _check_hysteresis(v: float, info: ValidationInfo) -> float:
    metric, lo, hi = _limits(info)
    above, below = info.data.get("above"), info.data.get("below")
    if above is not None and lo is not None and above - v < lo:
        raise ValueError(f"the alert could never clear: {metric} would have to fall to {above - v:g}, "
                         f"below its lowest possible value {lo:g}")
    if below is not None and hi is not None and below + v > hi:
        raise ValueError(f"the alert could never clear: {metric} would have to rise to {below + v:g}, "
                         f"above its highest possible value {hi:g}")
    return v


class ThresholdRule(_RuleBase):
    """A metric above or below a level for at least ``for_s``; clears past the level by ``hysteresis``."""

    kind: Literal["threshold"] = "threshold"
    target: Target
    metric: MetricName
    above: FiniteFloat | None = None
    below: FiniteFloat | None = None
    hysteresis: FiniteFloat = Field(default=0.0, ge=0)
    for_s: Duration = 0.0
    actions: list[Action] = Field(default_factory=list, max_length=8)

    _metric = field_validator("metric")(_check_metric)
    _above = field_validator("above")(_check_above)
    _below = field_validator("below")(_check_below)
    _hyst = field_validator("hysteresis")(_check_hysteresis)

    @model_validator(mode="after")
    def _one_level(self) -> ThresholdRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        return self


class BatteryRule(_RuleBase):
    """Battery below a level (percent by default); a threshold rule with battery defaults."""

    kind: Literal["battery"] = "battery"
    target: Target
    metric: MetricName = "battery"
    below: FiniteFloat = 20.0
    hysteresis: FiniteFloat = Field(default=5.0, ge=0)
    for_s: Duration = 0.0
    actions: list[Action] = Field(default_factory=list, max_length=8)

    _metric = field_validator("metric")(_check_metric)
    _below = field_validator("below")(_check_below)
    _hyst = field_validator("hysteresis")(_check_hysteresis)

    @property
    def above(self) -> None:
        return None


class OfflineRule(_RuleBase):
    """A device offline (last will, status or heartbeat timeout) for longer than ``for_s``."""

    kind: Literal["offline"] = "offline"
    target: Target
    for_s: Duration = 300.0
    actions: list[Action] = Field(default_factory=list, max_length=8)


class SilentRule(_RuleBase):
    """Nothing heard from a device (a BLE sensor's advertisements) for ``for_s``."""

    kind: Literal["silent"] = "silent"
    target: Target
    for_s: PositiveDuration = 1800.0
    actions: list[Action] = Field(default_factory=list, max_length=8)


def _gateway_actions(v: list[Action]) -> list[Action]:
    for i, a in enumerate(v):
        if a.device is None:
            raise ValueError(f"actions.{i}.device is required: a gateway-level alert has no device of its own")
    return v


class DiskRule(_RuleBase):
    """The gateway's data disk has less than ``free_below_percent`` free."""

    kind: Literal["disk"] = "disk"
    free_below_percent: float = Field(default=10.0, gt=0, lt=100)
    hysteresis: float = Field(default=2.0, ge=0, lt=100)
    actions: list[Action] = Field(default_factory=list, max_length=8)

    _actions = field_validator("actions")(_gateway_actions)

    @field_validator("hysteresis")
    @classmethod
    def _reachable(cls, v: float, info: ValidationInfo) -> float:
        level = info.data.get("free_below_percent")
        if level is not None and level + v > 100:
            raise ValueError(f"the alert could never clear: {level + v:g} % free is more than the whole disk")
        return v


class BacklogRule(_RuleBase):
    """The oldest reading not yet acknowledged by the cloud is older than ``older_than_s``."""

    kind: Literal["backlog"] = "backlog"
    older_than_s: PositiveDuration = 3600.0
    actions: list[Action] = Field(default_factory=list, max_length=8)

    _actions = field_validator("actions")(_gateway_actions)


AlertRule = ThresholdRule | BatteryRule | OfflineRule | SilentRule | DiskRule | BacklogRule
RULE_MODELS: dict[str, type[AlertRule]] = {
    "threshold": ThresholdRule, "battery": BatteryRule, "offline": OfflineRule, "silent": SilentRule,
    "disk": DiskRule, "backlog": BacklogRule,
}
GATEWAY_KINDS = frozenset({"disk", "backlog"})


# -- schedules ---------------------------------------------------------------------------------------

def _cron_parsed(parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``; what it refuses as the plain ValueError a validator reports."""
    try:
        return parse(text)
    except CronError as exc:
        raise ValueError(str(exc)) from None


class ScheduleEvent(_Model):
    """One recurring moment: ``at`` (``"HH:MM"``) on ``days``, or a ``cron`` expression; and what to send."""

    at: str | None = None
    # cron day-of-week field: "*", "mon-fri", "sat,sun", "1-5" (0 and 7 are Sunday)
    days: str = "*"
    # minute hour day-of-month month day-of-week, in the site's time zone
    cron: str | None = None
    # relay shorthand: command "relay" with args {"state": ...}
    state: Literal["on", "off"] | None = None
    command: CommandName | None = None
    args: Annotated[dict[str, Any], Field(default_factory=dict)]

    _args = field_validator("args")(_small_args)

    @field_validator("at")
    @classmethod
    def _at(cls, v: str | None) -> str | None:
        if v is not None:
            _cron_parsed(parse_at, v)
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: str) -> str:
        _cron_parsed(parse_days, v)
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        spec = _cron_parsed(parse_cron, v)
        if not spec.can_fire():
            raise ValueError(f"{v!r} never happens (no date matches its day and month fields)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleEvent:
        if (self.at is None) == (self.cron is None):
            raise ValueError("give exactly one of 'at' (with optional 'days') or 'cron'")
        if self.cron is not None and self.days != "*":
            raise ValueError("'days' goes with 'at'; a cron expression has its own day-of-week field")
        if self.state is None and self.command is None:
            raise ValueError("give 'state' (\"on\"/\"off\") or a 'command'")
        if self.state is not None and self.command not in (None, "relay"):
            raise ValueError("'state' is the relay shorthand; with another command put the state in 'args'")
        return self

    def spec(self) -> CronSpec:
        if self.cron is not None:
            return parse_cron(self.cron)
        assert self.at is not None
        return daily(self.at, self.days)

    def request(self) -> tuple[str, dict[str, Any]]:
        if self.state is not None:
            return "relay", {**self.args, "state": self.state}
        assert self.command is not None
        return self.command, dict(self.args)

    def describe(self) -> str:
        when = self.cron if self.cron is not None else f"{self.at} on {self.days}"
        cmd, args = self.request()
        return f"{when}: {cmd} {json.dumps(args, sort_keys=True)}"


class Schedule(_Model):
    kind: Literal["schedule"] = "schedule"
    id: RuleId
    name: str | None = Field(default=None, max_length=128)
    enabled: bool = True
    target: Target
    events: list[ScheduleEvent] = Field(min_length=1, max_length=48)


# -- the [rules] section ---------------------------------------------------------------------------------

class WebhookConfig(_Model):
    """Optional local webhook: every alert transition at or above ``min_severity`` is POSTed as JSON."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    min_severity: Severity = "warning"
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    # attempts after the first; a delivery that still fails is counted and dropped
    retries: int = Field(default=3, ge=0, le=10)
    backoff_s: float = Field(default=1.0, gt=0, le=60)
    queue_max: int = Field(default=1000, ge=1, le=100_000)
    # e.g. Authorization; kept out of logs and API answers
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    verify_tls: bool = True


class RulesConfig(_Model):
    """``[rules]``: engine timing, groups, webhook, and the rules and schedules defined in the file.

    Rules defined here are read-only through the API (change the file); rules made through
    the API live in the database. Both kinds run the same way.
    """

    enabled: bool = True
    # how often durations, offline times and silences are checked
    tick_s: float = Field(default=1.0, ge=0.05, le=60)
    # how often gateway facts (disk, cloud backlog) are read
    check_interval_s: float = Field(default=15.0, ge=0.1, le=3600)
    # metrics a rule may name beyond the built-in catalogue
    known_metrics: list[MetricName] = Field(default_factory=list)
    groups: dict[TagName, list[DeviceId]] = Field(default_factory=dict)
    webhook: WebhookConfig | None = None
    threshold: list[ThresholdRule] = Field(default_factory=list)
    battery: list[BatteryRule] = Field(default_factory=list)
    offline: list[OfflineRule] = Field(default_factory=list)
    silent: list[SilentRule] = Field(default_factory=list)
    disk: list[DiskRule] = Field(default_factory=list)
    backlog: list[BacklogRule] = Field(default_factory=list)
    schedule: list[Schedule] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _with_known_metrics(cls, data: Any, handler: Any) -> Any:
        # nested rules check their metric against known_metrics, which they cannot see:
        # hand it down for the duration of this (synchronous) validation
        known = data.get("known_metrics") if isinstance(data, dict) else None
        token = _CONFIG_METRICS.set(frozenset(k for k in known or () if isinstance(k, str)))
        try:
            return handler(data)
        finally:
            _CONFIG_METRICS.reset(token)

    @model_validator(mode="after")
    def _unique_ids(self) -> RulesConfig:
        seen: dict[str, str] = {}
        for kind in RULE_MODELS:
            for i, r in enumerate(getattr(self, kind)):
                where = f"{kind}.{i}"
                if r.id in seen:
                    raise ValueError(f"{where}.id: rule id {r.id!r} is already used by {seen[r.id]}")
                seen[r.id] = where
        sched: dict[str, int] = {}
        for i, s in enumerate(self.schedule):
            if s.id in sched:
                raise ValueError(f"schedule.{i}.id: schedule id {s.id!r} is already used by schedule.{sched[s.id]}")
            sched[s.id] = i
        return self

    def rules(self) -> list[AlertRule]:
        return [r for kind in RULE_MODELS for r in getattr(self, kind)]


class UnknownKind(ValueError):
    """The ``kind`` field of an API body names no rule type."""


def parse_rule(data: Any, *, metrics: frozenset[str] | set[str] | None) -> AlertRule:
    """An API body (or stored JSON) with ``"kind"`` as the matching rule model.

    ``metrics``: the metric names besides the catalogue a rule may name; None skips the
    check (rules read back from the database were checked when they were made).
    Raises :class:`pydantic.ValidationError` whose locations are the rule's own fields.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    model = RULE_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownKind(f"kind must be one of {', '.join(RULE_MODELS)}")
    return model.model_validate(data, context={"metrics": metrics})
