"""When a schedule event happens: cron-like fields, turned into instants in the site's time zone.

A :class:`CronSpec` is the five classic cron fields (minute, hour, day of month, month,
day of week) parsed into sets. ``"07:30"`` with ``days = "mon-fri"`` is the friendly form
of the same thing. Instants are computed from *local* dates and times with
:mod:`zoneinfo`, so a 07:00 event stays at 07:00 on the wall across DST changes:

- a local time that does not exist (spring forward, 02:30 in Europe/Berlin on the last
  Sunday of March) is taken with the offset in force before the change (PEP 495,
  ``fold=0``), i.e. it happens as late after the change as it would have happened after
  02:00: 03:30 local. Order and spacing of a day's events are kept, nothing is skipped;
- a local time that happens twice (fall back) is taken once, at its first occurrence.

Pure functions of (spec, instant, zone): no clock is read here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

# enough days to find any day-of-month/month/day-of-week combination that exists at all
# (a 29 February that must be a given weekday recurs within 28 years; 4 years cover every
# combination without a weekday constraint, which is what can_fire() checks first)
_SEARCH_DAYS = 366 * 28 + 7

_DOW_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTH_NAMES = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_AT_RE = re.compile(r"^(\d{1,2}):(\d{2})$")


class CronError(ValueError):
    """A field that cannot be parsed or is out of range; the message names the field."""


@dataclass(frozen=True, slots=True)
class CronSpec:
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]  # 0 = Sunday, as cron
    dom_any: bool
    dow_any: bool

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom_ok = d.day in self.doms
        dow_ok = (d.weekday() + 1) % 7 in self.dows
        # classic cron: when both day fields are restricted, either one matching is enough
        if not self.dom_any and not self.dow_any:
            return dom_ok or dow_ok
        return dom_ok and dow_ok

    def _instants(self, d: date, tz: ZoneInfo) -> Iterable[float]:
        for h in self.hours:
            for m in self.minutes:
                yield datetime(d.year, d.month, d.day, h, m, tzinfo=tz).timestamp()

    def next_after(self, t: float, tz: ZoneInfo) -> float | None:
        """The first instant strictly after ``t``; None if the spec never fires."""
        start = datetime.fromtimestamp(t, tz).date() - timedelta(days=1)
        best: float | None = None
        for offset in range(_SEARCH_DAYS):
            d = start + timedelta(days=offset)
            if best is not None and d > datetime.fromtimestamp(best, tz).date() + timedelta(days=1):
                return best
            if not self.day_matches(d):
                continue
            for inst in self._instants(d, tz):
                if inst > t and (best is None or inst < best):
                    best = inst
        return best

    def last_at_or_before(self, t: float, tz: ZoneInfo) -> float | None:
        """The latest instant at or before ``t``; None if there is none within the search span."""
        start = datetime.fromtimestamp(t, tz).date() + timedelta(days=1)
        best: float | None = None
        for offset in range(_SEARCH_DAYS):
            d = start - timedelta(days=offset)
            if best is not None and d < datetime.fromtimestamp(best, tz).date() - timedelta(days=1):
                return best
            if not self.day_matches(d):
                continue
            for inst in self._instants(d, tz):
                if inst <= t and (best is None or inst > best):
                    best = inst
        return best

    def can_fire(self) -> bool:
        probe = date(2024, 1, 1)
        return any(self.day_matches(probe + timedelta(days=i)) for i in range(_SEARCH_DAYS))


def parse_field(text: str, name: str, lo: int, hi: int, names: dict[str, int] | None = None) -> set[int]:
    """One cron field: ``*``, ``5``, ``1-5``, ``*/15``, ``mon-fri``, lists of those."""
    text = text.strip().lower()
    if not text:
        raise CronError(f"{name}: empty field")
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_s = part.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) < 1:
                raise CronError(f"{name}: step {step_s!r} must be a positive whole number")
            step = int(step_s)
        if rng == "*":
            a, b = lo, hi
        else:
            first, dash, last = rng.partition("-")
            a = _value(first, name, lo, hi, names)
            b = _value(last, name, lo, hi, names) if dash else (hi if step_s else a)
            if b < a:
                raise CronError(f"{name}: range {rng!r} runs backwards")
        out.update(range(a, b + 1, step))
    return out


def _value(tok: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> int:
    if names and tok in names:
        return names[tok]
    if not tok.isdigit():
        raise CronError(f"{name}: {tok!r} is not a number" + (f" or a name ({', '.join(names)})" if names else ""))
    v = int(tok)
    if not lo <= v <= hi:
        raise CronError(f"{name}: {v} is out of range {lo}-{hi}")
    return v


def _dows(text: str) -> set[int]:
    # 7 is Sunday too, as in cron
    return {d % 7 for d in parse_field(text, "day-of-week", 0, 7, _DOW_NAMES)}


def parse_cron(text: str) -> CronSpec:
    fields = text.split()
    if len(fields) != 5:
        raise CronError(f"cron needs 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}")
    minute, hour, dom, month, dow = fields
    return CronSpec(
        minutes=tuple(sorted(parse_field(minute, "minute", 0, 59))),
        hours=tuple(sorted(parse_field(hour, "hour", 0, 23))),
        doms=frozenset(parse_field(dom, "day-of-month", 1, 31)),
        months=frozenset(parse_field(month, "month", 1, 12, _MONTH_NAMES)),
        dows=frozenset(_dows(dow)),
        dom_any=dom.strip() == "*",
        dow_any=dow.strip() == "*",
    )


def parse_at(text: str) -> tuple[int, int]:
    m = _AT_RE.match(text.strip())
    if not m:
        raise CronError(f"{text!r} is not a time of day (HH:MM)")
    h, mi = int(m.group(1)), int(m.group(2))
    if h > 23:
        raise CronError(f"hour {h} is out of range 0-23")
    if mi > 59:
        raise CronError(f"minute {mi} is out of range 0-59")
    return h, mi


def parse_days(text: str) -> frozenset[int]:
    return frozenset(_dows(text))


def daily(at: str, days: str = "*") -> CronSpec:
    h, mi = parse_at(at)
    dows = parse_days(days)
    return CronSpec(minutes=(mi,), hours=(h,), doms=frozenset(range(1, 32)), months=frozenset(range(1, 13)),
                    dows=dows, dom_any=True, dow_any=days.strip() == "*")
