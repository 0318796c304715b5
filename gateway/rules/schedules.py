"""Schedules: relays (or any command) at times of day / days of week, in the site's time zone.

Each schedule keeps a persisted **high-water mark**: the wall time up to which its
occurrences have been dealt with. An occurrence runs only if its instant lies after the
mark, and the mark moves in the same transaction that records the commands to send, so:

- **restart**: nothing at or before the mark runs again; occurrences missed while the
  gateway was down lie after it and are caught up at start;
- **clock jumps forward** (NTP sets a Pi's clock after boot): the window from the mark to
  the new time is caught up once. Per schedule and command only the *latest* occurrence in
  the window runs ("relay off" at 08:30 supersedes "relay on" at 07:00 when both were
  jumped over): the device ends in the state the schedule prescribes now, without a burst
  of contradictory commands. Superseded occurrences are counted, not run;
- **clock steps back** by up to ``REARM_AFTER_S``: occurrences already run lie before the
  mark and do not run twice. A step back larger than that means the clock had been badly
  wrong ahead: the mark is reset to the new time (logged), so the schedule is not frozen
  for hours or days.

The loop sleeps on the monotonic clock but never longer than ``MAX_NAP_S``, and reads the
wall clock afresh each time, so a step is noticed within seconds. Times are computed by
:mod:`gateway.rules.cron` (DST rules are described there).

An **override** (UI/API) holds a relay in a state, or pauses the schedule, until a given
time or until the schedule's next occurrence. Occurrences before its end are recorded as
overridden, not run; when it ends (or is cancelled) the schedule's current state is
applied again if the override had changed anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.rules.automations import Actuator, Job
from gateway.rules.cron import CronSpec
from gateway.rules.models import Schedule
from gateway.rules.targets import Targets
from gateway.store.database import Database

log = structlog.get_logger(__name__)

MAX_NAP_S = 5.0
MIN_NAP_S = 0.05
# a backward step of the wall clock smaller than this keeps the mark (no double runs)
REARM_AFTER_S = 3600.0
# a step back smaller than this is scheduling jitter, not worth a log line
STEP_NOTICE_S = 1.0


class ScheduleError(Exception):
    pass


@dataclass(slots=True)
class Override:
    state: str | None  # "on"/"off": the relay is held so; None: the schedule is paused
    until: float
    by: str
    set_at: float
    # something was held or suppressed: when the override ends, apply the schedule again
    changed: bool = False


@dataclass(slots=True)
class _State:
    high_water: float
    override: Override | None = None
    seen: float = 0.0  # the wall time of the latest tick, to notice steps back
    next_due: float | None = None  # cached next occurrence after the mark


@dataclass(slots=True)
class _Compiled:
    spec: Schedule
    events: list[tuple[int, CronSpec, str, dict[str, Any]]]  # (index, when, command, args)


def _key(command: str) -> str:
    # occurrences of the same command supersede each other (relay on / relay off)
    return command


class Scheduler:
    def __init__(self, *, db: Database, actuator: Actuator, targets: Targets, metrics: Metrics, clock: Clock,
                 timezone: str) -> None:
        self._db = db
        self._actuator = actuator
        self._targets = targets
        self._metrics = metrics
        self._clock = clock
        self.tz = ZoneInfo(timezone)
        self._schedules: dict[str, _Compiled] = {}
        self._state: dict[str, _State] = {}
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- definitions ------------------------------------------------------------------------------
    def set_schedules(self, schedules: Iterable[Schedule]) -> None:
        self._schedules = {}
        for s in schedules:
            events = []
            for i, ev in enumerate(s.events):
                cmd, args = ev.request()
                events.append((i, ev.spec(), cmd, args))
            self._schedules[s.id] = _Compiled(s, events)
        for st in self._state.values():
            st.next_due = None
        self._changed.set()

    async def load(self) -> None:
        now = self._clock.wall()
        for r in await self._db.fetchall("SELECT schedule_id, high_water, override FROM schedule_state"):
            ov = Override(**json.loads(r[2])) if r[2] else None
            self._state[r[0]] = _State(high_water=r[1], override=ov, seen=max(r[1], now))
            if r[1] > now + REARM_AFTER_S:
                # persisted by a clock that was far ahead of this one: see the module docstring
                log.warning("schedule.rearmed", schedule=r[0], mark=r[1], now=now, reason="mark in the future at start")
                self._state[r[0]].high_water = now
                self._state[r[0]].seen = now

    async def forget(self, schedule_id: str) -> None:
        self._state.pop(schedule_id, None)
        await self._db.write(lambda c: c.execute("DELETE FROM schedule_state WHERE schedule_id = ?",
                                                 (schedule_id,)))

    # -- the loop ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The supervised schedules task."""
        while True:
            nap = await self.tick()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), nap)

    async def tick(self, now: float | None = None) -> float:
        """Run what is due as of ``now`` (wall time); returns how long the loop may sleep."""
        async with self._lock:
            now = self._clock.wall() if now is None else now
            nap = MAX_NAP_S
            for sid, sc in self._schedules.items():
                if not sc.spec.enabled:
                    continue
                st = self._state.get(sid)
                if st is None:
                    # a new schedule starts from now: it does not replay the past
                    st = self._state[sid] = _State(high_water=now, seen=now)
                    await self._save(sid, st, [])
                    continue
                if now < st.seen - STEP_NOTICE_S:
                    self._stepped_back(sid, st, st.seen - now, now)
                st.seen = now
                await self._tick_one(sid, sc, st, now)
                due = st.next_due
                if st.override is not None:
                    due = min(due, st.override.until) if due is not None else st.override.until
                if due is not None:
                    nap = min(nap, max(due - now, MIN_NAP_S))
            return nap

    def _stepped_back(self, sid: str, st: _State, step: float, now: float) -> None:
        if step > REARM_AFTER_S and st.high_water > now:
            log.warning("schedule.rearmed", schedule=sid, step_s=round(step, 1),
                        note="the clock stepped back a long way: occurrences from now on run when their time comes")
            st.high_water = now
            st.next_due = None
        else:
            log.info("schedule.clock_stepped_back", schedule=sid, step_s=round(step, 3),
                     note="occurrences already run will not run again")

    def _next_due(self, sc: _Compiled, after: float) -> float | None:
        found = [t for _, spec, _, _ in sc.events if (t := spec.next_after(after, self.tz)) is not None]
        return min(found) if found else None

    async def _tick_one(self, sid: str, sc: _Compiled, st: _State, now: float) -> None:
        ov = st.override
        if st.next_due is None:
            st.next_due = self._next_due(sc, st.high_water)
        ov_over = ov is not None and now >= ov.until
        if (st.next_due is None or now < st.next_due) and not ov_over:
            return
        # latest occurrence per command within (mark, now]
        due: dict[str, tuple[float, int, str, dict[str, Any]]] = {}
        superseded = 0
        for idx, spec, cmd, args in sc.events:
            last = spec.last_at_or_before(now, self.tz)
            if last is None or last <= st.high_water:
                continue
            # more than one occurrence of this event in the window: only the latest counts
            if (nxt := spec.next_after(st.high_water, self.tz)) is not None and nxt < last:
                superseded += 1
            k = _key(cmd)
            if k in due:
                superseded += 1
                if due[k][0] > last:
                    continue
            due[k] = (last, idx, cmd, args)
        overridden = 0
        if ov is not None:
            for k, (t, *_rest) in list(due.items()):
                if t < ov.until:
                    del due[k]
                    overridden += 1
                    ov.changed = True
            if ov_over:
                st.override = None
                if ov.changed:
                    # the override ends: the schedule's state as of now applies again
                    for k, item in self._current(sc, now).items():
                        due.setdefault(k, item)
                log.info("schedule.override_ended", schedule=sid, by=ov.by)
        jobs: list[Job] = []
        for k, (t, idx, cmd, args) in sorted(due.items(), key=lambda kv: kv[1][0]):
            trigger = "resume" if ov_over and t < (ov.until if ov else 0) else "schedule"
            for device in await self._targets.members(sc.spec.target):
                jobs.append(Job(origin="schedule", origin_id=sid, action_key=f"{idx}:{k}", trigger=trigger,
                                device=device, command=cmd, args=dict(args),
                                detail={"occurrence": t, "late_s": round(now - t, 3)}))
        st.high_water = max(st.high_water, now)
        st.next_due = self._next_due(sc, st.high_water)
        if superseded:
            self._metrics.schedule_occurrences.labels(outcome="superseded").inc(superseded)
        if overridden:
            self._metrics.schedule_occurrences.labels(outcome="overridden").inc(overridden)
        if due:
            self._metrics.schedule_occurrences.labels(outcome="run").inc(len(due))
            log.info("schedule.run", schedule=sid, commands=[v[2] for v in due.values()], devices=len(jobs),
                     superseded=superseded)
        await self._save(sid, st, jobs)

    def _current(self, sc: _Compiled, now: float) -> dict[str, tuple[float, int, str, dict[str, Any]]]:
        out: dict[str, tuple[float, int, str, dict[str, Any]]] = {}
        for idx, spec, cmd, args in sc.events:
            last = spec.last_at_or_before(now, self.tz)
            if last is not None and (_key(cmd) not in out or out[_key(cmd)][0] <= last):
                out[_key(cmd)] = (last, idx, cmd, args)
        return out

    async def _save(self, sid: str, st: _State, jobs: list[Job]) -> None:
        now = self._clock.wall()
        ov = json.dumps(asdict(st.override)) if st.override is not None else None
        mark = st.high_water

        def save(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO schedule_state (schedule_id, high_water, override, updated_at) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT(schedule_id) DO UPDATE SET high_water = excluded.high_water,"
                      " override = excluded.override, updated_at = excluded.updated_at", (sid, mark, ov, now))
            # the commands are recorded with the mark that says they were decided: never both or neither
            Actuator.insert(c, jobs, now)

        await self._db.write(save)
        self._actuator.accept(jobs)

    # -- overrides -----------------------------------------------------------------------------------------
    async def set_override(self, schedule_id: str, *, state: str | None, until: float | None, by: str) -> Override:
        async with self._lock:
            sc = self._schedules.get(schedule_id)
            if sc is None:
                raise ScheduleError(f"no schedule {schedule_id}")
            now = self._clock.wall()
            st = self._state.get(schedule_id)
            if st is None:
                st = self._state[schedule_id] = _State(high_water=now, seen=now)
            if until is None:
                until = self._next_due(sc, now)
                if until is None:
                    raise ScheduleError("the schedule has no next occurrence to hold the override until")
            if until <= now:
                raise ScheduleError("the override must end in the future")
            ov = Override(state=state, until=until, by=by, set_at=now, changed=state is not None)
            st.override = ov
            jobs: list[Job] = []
            if state is not None:
                for device in await self._targets.members(sc.spec.target):
                    jobs.append(Job(origin="schedule", origin_id=schedule_id, action_key="override",
                                    trigger="override", device=device, command="relay", args={"state": state},
                                    detail={"by": by, "until": until}))
            await self._save(schedule_id, st, jobs)
            self._changed.set()
            log.info("schedule.override_set", schedule=schedule_id, state=state, until=until, by=by)
            return ov

    async def clear_override(self, schedule_id: str, *, by: str) -> bool:
        """End the override now; the schedule's current state is applied again if it had changed anything."""
        async with self._lock:
            st = self._state.get(schedule_id)
            if st is None or st.override is None:
                return False
            # ending is what the tick does when the time is up: let it do exactly that now
            st.override.until = self._clock.wall()
            log.info("schedule.override_cancelled", schedule=schedule_id, by=by)
        await self.tick()
        return True

    # -- reading ------------------------------------------------------------------------------------------------
    def status(self, schedule_id: str, upcoming: int = 5) -> dict[str, Any]:
        sc = self._schedules.get(schedule_id)
        st = self._state.get(schedule_id)
        out: dict[str, Any] = {"high_water": st.high_water if st else None,
                               "override": asdict(st.override) if st and st.override else None, "next": []}
        if sc is not None and sc.spec.enabled:
            t = max(self._clock.wall(), st.high_water if st else 0.0)
            for _ in range(upcoming):
                nxt = self._next_due(sc, t)
                if nxt is None:
                    break
                out["next"].append({"at": nxt, "events": [ev.describe() for i, ev in enumerate(sc.spec.events)
                                                          if sc.events[i][1].next_after(t, self.tz) == nxt]})
                t = nxt
        return out

    def health(self) -> dict[str, Any]:
        return {"schedules": len(self._schedules),
                "overrides": sum(1 for s in self._state.values() if s.override is not None)}
