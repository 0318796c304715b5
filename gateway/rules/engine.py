"""The rules engine: decides when an alert is raised and cleared.

Inputs, none of them a poll of the store:

- every committed reading, from :meth:`Ingest.add_observer` (synchronous, right after the
  commit). The hot path is one dict lookup per reading in the index
  ``(device, metric) → entry``, built on first sight of a pair, so 1,000 rules cost what
  the rules that match the reading cost, not what all of them cost. Each entry also keeps
  the *quiet band*: the open interval of values in which none of its rules would change
  state (below every limit not yet crossed, above every clear level of an open alert). A
  value inside it, which is nearly every value on a healthy site, costs two comparisons
  however many rules match; only values outside it, or pairs with a duration running, are
  evaluated rule by rule;
- every online/offline transition, from :meth:`DeviceRegistry.add_observer` (last will,
  status, heartbeat timeout, first message);
- a tick (``[rules] tick_s``) for what only time reveals: a threshold held long enough
  with no reading since, a device offline long enough, a sensor silent;
- gateway facts (disk, cloud backlog) every ``check_interval_s``.

A :class:`Track` is the state of one rule for one device. Deciding is synchronous and only
flips in-memory state; persisting the decision (the alert row and its event) is the job of
the supervised transitions task, which picks up the tracks marked dirty. The dirty set is
keyed by track, so it is bounded by rules x devices whatever the input does, and ingest
never waits for it. A raise and clear that happen before the task gets to them are both
persisted (a spike is not lost); several are one alert (no storm).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.clock import Clock
from gateway.devices.registry import DeviceRegistry
from gateway.metrics import Metrics
from gateway.models import Reading
from gateway.rules.alerts import Alert, AlertStore
from gateway.rules.models import GATEWAY_KINDS, AlertRule
from gateway.rules.targets import Targets

log = structlog.get_logger(__name__)

# how often the (device, metric) index is rebuilt, so that tags a device reports about
# itself and changes of its kind or profile are picked up
INDEX_REFRESH_S = 60.0

Trigger = str  # "fire" or "clear"
TransitionListener = Callable[[Trigger, AlertRule | None, Alert], Awaitable[None]]


@dataclass(slots=True)
class GatewayFacts:
    disk_free_percent: float | None = None
    # age of the oldest reading the cloud has not acknowledged; None when nothing waits or
    # nobody consumes the outbox
    backlog_age_s: float | None = None


FactsProbe = Callable[[], Awaitable[GatewayFacts]]


class Compiled:
    """A rule's numbers, pulled out of the model once, for the hot path."""

    __slots__ = ("above", "clear_at", "for_s", "id", "kind", "label", "limit", "metric", "spec")

    def __init__(self, spec: AlertRule) -> None:
        self.spec = spec
        self.id = spec.id
        self.kind = spec.kind
        self.label = spec.name or spec.id
        self.metric = ""
        self.above = False
        self.limit = 0.0
        self.clear_at = 0.0
        self.for_s = float(getattr(spec, "for_s", 0.0))
        if spec.kind in ("threshold", "battery"):
            self.metric = spec.metric  # type: ignore[union-attr]
            above = getattr(spec, "above", None)
            self.above = above is not None
            hyst = spec.hysteresis  # type: ignore[union-attr]
            self.limit = float(above if above is not None else spec.below)  # type: ignore[union-attr]
            self.clear_at = self.limit - hyst if self.above else self.limit + hyst
        elif spec.kind == "disk":
            self.limit = spec.free_below_percent
            self.clear_at = spec.free_below_percent + spec.hysteresis
        elif spec.kind == "backlog":
            self.limit = spec.older_than_s


@dataclass(slots=True)
class Episode:
    value: float | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Clearing:
    value: float | None
    reason: str


class Track:
    """One rule for one device ('' for gateway-level rules)."""

    __slots__ = ("active", "clearing", "device", "entry", "episode", "key", "last_value", "pending_seen",
                 "pending_since", "rule")

    def __init__(self, key: tuple[str, str], rule: Compiled | None, active: bool) -> None:
        self.key = key
        self.device = key[1]
        self.rule = rule
        # what the rule says now; the alert store says what has been persisted
        self.active = active
        self.pending_since: float | None = None  # reading time of the first breach
        self.pending_seen = 0.0  # gateway time of the first breach
        self.last_value: float | None = None
        self.episode: Episode | None = None  # raised, not yet persisted
        self.clearing: Clearing | None = None
        self.entry: Entry | None = None  # the index entry of a threshold track


class Entry:
    """The threshold tracks of one (device, metric) pair and their quiet band."""

    __slots__ = ("hi", "lo", "tracks")

    def __init__(self, tracks: tuple[Track, ...]) -> None:
        self.tracks = tracks
        self.lo = -math.inf
        self.hi = math.inf
        for tr in tracks:
            tr.entry = self
        self.refresh()

    def refresh(self) -> None:
        """Recompute the band after any of the tracks changed state. Bounds are strict, so a
        value exactly on a limit is evaluated in full (and then decided exactly)."""
        lo, hi = -math.inf, math.inf
        for tr in self.tracks:
            c = tr.rule
            if tr.pending_since is not None or c is None:
                lo, hi = math.inf, -math.inf  # a duration is running: every value counts
                break
            if c.above:
                if tr.active:
                    lo = max(lo, c.clear_at)
                else:
                    hi = min(hi, c.limit)
            elif tr.active:
                hi = min(hi, c.clear_at)
            else:
                lo = max(lo, c.limit)
        self.lo, self.hi = lo, hi


_NO_RULES = Entry(())


class Engine:
    def __init__(self, *, registry: DeviceRegistry, targets: Targets, alerts: AlertStore, metrics: Metrics,
                 clock: Clock, facts: FactsProbe | None = None) -> None:
        self._registry = registry
        self._targets = targets
        self._alerts = alerts
        self._metrics = metrics
        self._clock = clock
        self._facts = facts
        self._listeners: list[TransitionListener] = []
        self._rules: dict[str, Compiled] = {}
        self._by_metric: dict[str, list[Compiled]] = {}
        self._offline_rules: list[Compiled] = []
        self._silent_rules: list[Compiled] = []
        self._gateway_rules: list[Compiled] = []
        self._index: dict[tuple[str, str], Entry] = {}
        self._index_built = 0.0
        self._members: dict[str, list[str]] = {}  # silent rule id -> device ids
        self._tracks: dict[tuple[str, str], Track] = {}
        self._timed: dict[tuple[str, str], Track] = {}  # offline and silent tracks
        self._pending: set[Track] = set()
        self._offline_since: dict[str, tuple[float, str]] = {}
        self._open: dict[tuple[str, str], Alert] = {}
        self._dirty: dict[tuple[str, str], Track] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.evaluations = 0  # tracks evaluated one by one (readings outside the quiet band)
        self.readings_seen = 0

    def add_listener(self, fn: TransitionListener) -> None:
        """``fn(trigger, rule, alert)`` after an alert was raised ("fire") or cleared ("clear") and persisted."""
        self._listeners.append(fn)

    # -- rules ------------------------------------------------------------------------------------
    def set_rules(self, rules: Iterable[AlertRule]) -> None:
        """Replace the rules in force. Tracks of unchanged rules keep their state; open
        alerts of rules now gone are cleared by the next :meth:`sweep`."""
        old = self._rules
        new = {r.id: Compiled(r) for r in rules if r.enabled}
        for rid, c in new.items():
            if rid in old and old[rid].spec == c.spec:
                new[rid] = old[rid]
        self._rules = new
        for key, tr in list(self._tracks.items()):
            if new.get(key[0]) is not tr.rule:
                del self._tracks[key]
                self._timed.pop(key, None)
                self._pending.discard(tr)
        by_metric: dict[str, list[Compiled]] = {}
        for c in new.values():
            if c.metric:
                by_metric.setdefault(c.metric, []).append(c)
        self._by_metric = by_metric
        self._offline_rules = [c for c in new.values() if c.kind == "offline"]
        self._silent_rules = [c for c in new.values() if c.kind == "silent"]
        self._gateway_rules = [c for c in new.values() if c.kind in GATEWAY_KINDS]
        self.refresh_targets()
        kinds: dict[str, int] = {}
        for c in new.values():
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        for kind in ("threshold", "battery", "offline", "silent", "disk", "backlog"):
            self._metrics.rules_loaded.labels(kind=kind).set(kinds.get(kind, 0))

    def refresh_targets(self) -> None:
        """Forget which devices each rule covers (groups changed); worked out again on demand."""
        self._index.clear()
        self._members.clear()
        self._index_built = self._clock.mono()

    @property
    def rules(self) -> dict[str, Compiled]:
        return self._rules

    async def load(self) -> None:
        for a in await self._alerts.open_alerts():
            self._open[(a.rule_id, a.device or "")] = a
        # a device that went quiet while the gateway was down has been offline since it was last heard
        for d in await self._registry.list_devices():
            if not d.online and d.last_seen is not None:
                self._offline_since[d.id] = (d.last_seen, "offline when the gateway started")
        self._update_gauge()

    # -- inputs (synchronous: called on the ingest path and from the registry) --------------------
    def on_readings(self, ids: list[int], readings: list[Reading]) -> None:
        index = self._index
        self.readings_seen += len(readings)
        for r in readings:
            entry = index.get((r.device, r.metric))
            if entry is None:
                entry = self._lookup(r.device, r.metric)
            value = r.value
            if entry.lo < value < entry.hi:
                continue  # no rule of this pair would change state
            self.evaluations += len(entry.tracks)
            for tr in entry.tracks:
                try:
                    self._observe(tr, value, r.ts)
                except Exception:  # a bug in one rule must not stop the others
                    self._metrics.rules_errors.labels(where="observe").inc()
                    log.exception("rules.observe_failed", rule=tr.key[0], device=tr.device)
            entry.refresh()

    def _lookup(self, device: str, metric: str) -> Entry:
        rules = self._by_metric.get(metric)
        entry = _NO_RULES
        if rules:
            tracks = tuple(self._track(c, device) for c in rules if self._targets.matches(c.spec.target, device))
            if tracks:
                entry = Entry(tracks)
        self._index[(device, metric)] = entry
        return entry

    def matching(self, device: str, metric: str) -> int:
        """How many rules a reading of this pair is checked against (for the benchmark and tests)."""
        entry = self._index.get((device, metric)) or self._lookup(device, metric)
        return len(entry.tracks)

    def _observe(self, tr: Track, value: float, ts: float) -> None:
        c = tr.rule
        assert c is not None
        tr.last_value = value
        if tr.active:
            if (value <= c.clear_at) if c.above else (value >= c.clear_at):
                self._deactivate(tr, value, f"{c.metric} back to {value:g}")
            return
        if (value > c.limit) if c.above else (value < c.limit):
            since = tr.pending_since
            if since is None:
                since = tr.pending_since = ts
                tr.pending_seen = self._clock.wall()
                if c.for_s > 0:
                    self._pending.add(tr)
            if ts - since >= c.for_s:
                self._activate(tr, value, self._level_message(c, value, ts - since, tr.device))
        elif tr.pending_since is not None:
            # back inside the limit before the duration was up: the count starts again
            tr.pending_since = None
            self._pending.discard(tr)

    def on_online(self, device: str, online: bool, reason: str, ts: float) -> None:
        if online:
            self._offline_since.pop(device, None)
            for c in self._offline_rules:
                tr = self._tracks.get((c.id, device))
                if tr is not None and tr.active:
                    self._deactivate(tr, None, "back online")
            return
        self._offline_since[device] = (ts, reason)
        for c in self._offline_rules:
            if c.for_s <= 0 and self._targets.matches(c.spec.target, device):
                self._activate(self._track(c, device), 0.0, f"{c.label}: {device} is offline ({reason})",
                               {"reason": reason})

    # -- time ---------------------------------------------------------------------------------------
    async def tick(self, now: float | None = None) -> None:
        """Durations, offline times and silences, as of ``now`` (wall time)."""
        now = self._clock.wall() if now is None else now
        for tr in list(self._pending):
            c = tr.rule
            if c is None or tr.pending_since is None or tr.active:
                self._pending.discard(tr)
                if tr.entry is not None:
                    tr.entry.refresh()
                continue
            held = now - tr.pending_seen
            if held >= c.for_s and tr.last_value is not None:
                # no reading since the first breach says otherwise: the condition has held
                self._activate(tr, tr.last_value, self._level_message(c, tr.last_value, held, tr.device))
        for device in [d for d in self._offline_since if self._registry.get_cached(d) is None]:
            del self._offline_since[device]  # removed from the registry: nothing to alert about
        for c in self._offline_rules:
            for device, (since, reason) in list(self._offline_since.items()):
                known = self._tracks.get((c.id, device))
                if known is not None and known.active:
                    continue
                if now - since >= c.for_s and self._targets.matches(c.spec.target, device):
                    tr = self._track(c, device)
                    if not tr.active:
                        self._activate(tr, round(now - since, 1),
                                       f"{c.label}: {device} offline for {now - since:.0f} s ({reason})",
                                       {"reason": reason, "offline_since": since})
        for tr in list(self._timed.values()):
            if tr.active and tr.rule is not None and tr.rule.kind == "offline" and tr.device not in self._offline_since:
                self._deactivate(tr, None, "back online")
        for c in self._silent_rules:
            members = self._members.get(c.id)
            if members is None:
                members = self._members[c.id] = await self._targets.members(c.spec.target)
            for device in members:
                dev = self._registry.get_cached(device)
                if dev is None or dev.last_seen is None:
                    continue
                quiet = now - dev.last_seen
                tr = self._tracks.get((c.id, device))
                if quiet >= c.for_s:
                    tr = tr or self._track(c, device)
                    if not tr.active:
                        self._activate(tr, round(quiet, 1),
                                       f"{c.label}: nothing heard from {device} for {quiet:.0f} s",
                                       {"last_seen": dev.last_seen})
                elif tr is not None and tr.active:
                    self._deactivate(tr, round(quiet, 1), "heard again")
        if self._clock.mono() - self._index_built >= INDEX_REFRESH_S:
            self.refresh_targets()

    async def check_gateway(self, now: float | None = None) -> None:
        """Disk and cloud backlog rules, then :meth:`sweep`."""
        if self._gateway_rules and self._facts is not None:
            facts = await self._facts()
            for c in self._gateway_rules:
                tr = self._track(c, "")
                if c.kind == "disk":
                    free = facts.disk_free_percent
                    if free is None:
                        continue
                    if free < c.limit and not tr.active:
                        self._activate(tr, round(free, 2),
                                       f"{c.label}: data disk has {free:.1f} % free (below {c.limit:g} %)")
                    elif tr.active and free >= c.clear_at:
                        self._deactivate(tr, round(free, 2), f"{free:.1f} % free")
                else:
                    age = facts.backlog_age_s
                    if age is not None and age > c.limit and not tr.active:
                        self._activate(tr, round(age, 1), f"{c.label}: the oldest reading the cloud has not "
                                                          f"acknowledged is {age:.0f} s old (limit {c.limit:g} s)")
                    elif tr.active and (age is None or age <= c.limit):
                        self._deactivate(tr, None if age is None else round(age, 1), "cloud backlog caught up")
        await self.sweep()
        self._update_gauge()

    async def sweep(self) -> None:
        """Clear open alerts that no rule stands behind any more (rule removed or disabled,
        device removed or no longer targeted)."""
        for key, _alert in list(self._open.items()):
            rid, device = key
            c = self._rules.get(rid)
            reason = None
            if c is None:
                reason = "rule removed or disabled"
            elif device and c.kind not in GATEWAY_KINDS:
                if self._registry.get_cached(device) is None:
                    reason = "device removed"
                elif not self._targets.matches(c.spec.target, device):
                    reason = "device no longer targeted by the rule"
            if reason is None:
                continue
            tr = self._tracks.pop(key, None) or Track(key, c, True)
            tr.entry = None
            # the index may still hold this track: rebuild it from the tracks that remain
            self.refresh_targets()
            self._timed.pop(key, None)
            self._pending.discard(tr)
            tr.active = True
            self._deactivate(tr, None, reason)

    # -- transitions ---------------------------------------------------------------------------------
    def _track(self, c: Compiled, device: str) -> Track:
        key = (c.id, device)
        tr = self._tracks.get(key)
        if tr is None:
            tr = self._tracks[key] = Track(key, c, key in self._open)
            if c.kind in ("offline", "silent"):
                self._timed[key] = tr
        return tr

    def _activate(self, tr: Track, value: float | None, message: str, data: dict[str, Any] | None = None) -> None:
        if tr.active:
            return
        tr.active = True
        tr.pending_since = None
        self._pending.discard(tr)
        tr.episode = Episode(value, message, data or {})
        self._mark(tr)

    def _deactivate(self, tr: Track, value: float | None, reason: str) -> None:
        if not tr.active:
            return
        tr.active = False
        tr.clearing = Clearing(value, reason)
        self._mark(tr)

    def _mark(self, tr: Track) -> None:
        self._dirty[tr.key] = tr
        self._wake.set()
        if tr.entry is not None:
            tr.entry.refresh()

    @staticmethod
    def _level_message(c: Compiled, value: float, held: float, device: str) -> str:
        side = "above" if c.above else "below"
        held_txt = f" for {held:.0f} s" if c.for_s > 0 else ""
        return f"{c.label}: {c.metric} {value:g} {side} {c.limit:g}{held_txt} ({device})"

    async def run(self) -> None:
        """The supervised transitions task: persists what the decisions above marked."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Persist every pending transition now (also used at stop, and by tests)."""
        async with self._lock:
            while self._dirty:
                key = next(iter(self._dirty))
                tr = self._dirty.pop(key)
                try:
                    await self._persist(tr)
                except BaseException:
                    # keep it for the next attempt (the supervisor restarts the task)
                    self._dirty.setdefault(key, tr)
                    raise

    async def _persist(self, tr: Track) -> None:
        key = tr.key
        ep = tr.episode
        if ep is not None:
            if key not in self._open and tr.rule is not None:
                c = tr.rule
                alert, created = await self._alerts.raise_(
                    rule_id=c.id, device=tr.device or None, kind=c.kind, severity=c.spec.severity,
                    message=ep.message, value=ep.value, data=ep.data)
                self._open[key] = alert
                self._update_gauge()
                if created:
                    await self._tell("fire", c.spec, alert)
            if tr.episode is ep:
                tr.episode = None
        open_alert = self._open.get(key)
        if not tr.active and open_alert is not None:
            cl = tr.clearing or Clearing(None, "condition no longer holds")
            cleared = await self._alerts.clear(open_alert.id, reason=cl.reason, value=cl.value)
            if self._open.get(key) is open_alert:
                del self._open[key]
            self._update_gauge()
            if cleared is not None:
                await self._tell("clear", tr.rule.spec if tr.rule else None, cleared)

    async def _tell(self, trigger: Trigger, rule: AlertRule | None, alert: Alert) -> None:
        for fn in self._listeners:
            try:
                await fn(trigger, rule, alert)
            except Exception:  # the alert stands; an automation or webhook problem is its own
                self._metrics.rules_errors.labels(where="listener").inc()
                log.exception("rules.listener_failed", trigger=trigger, alert_id=alert.id)

    # -- state ----------------------------------------------------------------------------------------
    def note_acknowledged(self, alert: Alert) -> None:
        key = (alert.rule_id, alert.device or "")
        if key in self._open:
            self._open[key] = alert

    def open_count(self, rule_id: str) -> int:
        return sum(1 for k in self._open if k[0] == rule_id)

    def open_alert(self, rule_id: str, device: str | None) -> Alert | None:
        return self._open.get((rule_id, device or ""))

    def _update_gauge(self) -> None:
        counts = {"info": 0, "warning": 0, "critical": 0}
        for a in self._open.values():
            counts[a.severity] = counts.get(a.severity, 0) + 1
        for sev, n in counts.items():
            self._metrics.alerts_open.labels(severity=sev).set(n)

    def health(self) -> dict[str, Any]:
        return {"rules": len(self._rules), "open_alerts": len(self._open), "tracks": len(self._tracks),
                "pending_transitions": len(self._dirty), "evaluations": self.evaluations,
                "offline_devices": len(self._offline_since), "at": time.time()}
