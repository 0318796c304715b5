"""Schedules in the site's time zone: DST, clock jumps, restarts and overrides, under a clock the
test moves. Decisions are read back from the automation_runs table they are written to."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.rules.conftest import FakeClock

TZ = "Europe/Berlin"
ON_OFF = [{"at": "07:00", "state": "on"}, {"at": "19:00", "state": "off"}]


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def sched(events: list[dict[str, Any]], sid: str = "lights") -> dict[str, Any]:
    return {"id": sid, "target": {"device": "relay-1"}, "events": events}


async def runs(site) -> list[tuple[str, str, float]]:
    """(trigger, relay state, occurrence instant or None) of every decided command, oldest first."""
    out = await site.runs(origin="schedule")
    return [(r.trigger, r.args.get("state"), r.detail.get("occurrence")) for r in reversed(out)]


async def tick_at(site, clock: FakeClock, when: float) -> None:
    clock.t = when
    await site.rules.scheduler.tick()


async def test_daily_time_stays_on_the_wall_clock_across_spring_forward(open_site, clock) -> None:
    clock.t = utc("2024-03-29T12:00")
    async with open_site(timezone=TZ, schedule=[sched([{"at": "07:00", "state": "on"}])]) as site:
        await site.rules.scheduler.tick()  # a new schedule starts from now
        await tick_at(site, clock, utc("2024-03-30T05:59:59"))
        assert await runs(site) == []
        await tick_at(site, clock, utc("2024-03-30T06:00"))  # 07:00 CET
        await tick_at(site, clock, utc("2024-03-31T04:59:59"))
        await tick_at(site, clock, utc("2024-03-31T05:00"))  # 07:00 CEST, the day the clocks went forward
        assert await runs(site) == [("schedule", "on", utc("2024-03-30T06:00")),
                                    ("schedule", "on", utc("2024-03-31T05:00"))]


async def test_a_time_inside_the_spring_forward_gap_runs_once_shifted_by_the_gap(open_site, clock) -> None:
    clock.t = utc("2024-03-30T12:00")
    async with open_site(timezone=TZ, schedule=[sched([{"at": "02:30", "state": "on"}])]) as site:
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-03-31T01:29"))
        assert await runs(site) == []
        # 02:30 does not exist on 31 March in Berlin: it runs at 03:30 CEST (01:30 UTC)
        await tick_at(site, clock, utc("2024-03-31T01:30"))
        await tick_at(site, clock, utc("2024-03-31T12:00"))
        await tick_at(site, clock, utc("2024-04-01T00:30"))  # 02:30 CEST the next night
        assert await runs(site) == [("schedule", "on", utc("2024-03-31T01:30")),
                                    ("schedule", "on", utc("2024-04-01T00:30"))]


async def test_a_time_that_happens_twice_at_fall_back_runs_once(open_site, clock) -> None:
    clock.t = utc("2024-10-26T12:00")
    async with open_site(timezone=TZ, schedule=[sched([{"at": "02:30", "state": "on"}])]) as site:
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-10-27T00:30"))  # 02:30 CEST, the first time
        await tick_at(site, clock, utc("2024-10-27T01:30"))  # 02:30 CET, the same wall time again
        await tick_at(site, clock, utc("2024-10-27T01:45"))
        await tick_at(site, clock, utc("2024-10-28T01:30"))  # 02:30 CET the next night
        assert await runs(site) == [("schedule", "on", utc("2024-10-27T00:30")),
                                    ("schedule", "on", utc("2024-10-28T01:30"))]


async def test_clock_jump_forward_runs_the_missed_occurrence_once(open_site, clock) -> None:
    clock.t = utc("2024-06-10T04:59")  # 06:59 CEST
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        clock.step(31 * 60)  # NTP: the Pi's clock was half an hour behind
        await site.rules.scheduler.tick()
        await site.rules.scheduler.tick()
        assert await runs(site) == [("schedule", "on", utc("2024-06-10T05:00"))]


async def test_clock_jump_over_several_occurrences_runs_only_the_latest(open_site, clock) -> None:
    clock.t = utc("2024-06-10T04:59")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        clock.step(13 * 3600)  # to 19:59 CEST: 07:00 on and 19:00 off were both jumped over
        await site.rules.scheduler.tick()
        assert await runs(site) == [("schedule", "off", utc("2024-06-10T17:00"))]
        assert site.metrics.schedule_occurrences.labels(outcome="superseded")._value.get() == 1


async def test_clock_step_back_does_not_run_an_occurrence_twice(open_site, clock) -> None:
    clock.t = utc("2024-06-10T04:59")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-10T05:00:05"))
        clock.step(-300)  # the clock was 5 minutes fast; NTP sets it back
        await site.rules.scheduler.tick()
        clock.advance(300)
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-10T17:00"))
        assert [r[:2] for r in await runs(site)] == [("schedule", "on"), ("schedule", "off")]


async def test_a_long_step_back_rearms_instead_of_freezing_the_schedule(open_site, clock) -> None:
    clock.t = utc("2024-06-11T06:00")  # a clock a day ahead at boot
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        clock.step(-86400)
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-10T17:00"))  # the real 19:00 CEST: runs
        assert await runs(site) == [("schedule", "off", utc("2024-06-10T17:00"))]


async def test_restart_neither_repeats_nor_loses_an_occurrence(open_site, clock) -> None:
    clock.t = utc("2024-06-10T04:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-10T05:00:01"))
    clock.t = utc("2024-06-10T05:05")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        assert len(await runs(site)) == 1
    # down from 07:05 to 09:00 the next day: 19:00 off and 07:00 on were missed; on is what applies now
    clock.t = utc("2024-06-11T07:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        assert await runs(site) == [("schedule", "on", utc("2024-06-10T05:00")),
                                    ("schedule", "on", utc("2024-06-11T05:00"))]


async def test_override_holds_the_relay_then_the_schedule_resumes(open_site, clock) -> None:
    clock.t = utc("2024-06-10T10:00")  # 12:00 CEST: the lights are on by schedule
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        await site.rules.override("lights", state="off", until=utc("2024-06-10T13:00"), by="tech", via={})
        await tick_at(site, clock, utc("2024-06-10T12:00"))
        assert await runs(site) == [("override", "off", None)]
        await tick_at(site, clock, utc("2024-06-10T13:00"))  # over: back to what the schedule says now
        await tick_at(site, clock, utc("2024-06-10T17:00"))
        assert await runs(site) == [("override", "off", None), ("resume", "on", utc("2024-06-10T05:00")),
                                    ("schedule", "off", utc("2024-06-10T17:00"))]


async def test_pause_until_later_suppresses_the_occurrences_it_covers(open_site, clock) -> None:
    clock.t = utc("2024-06-10T16:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        await site.rules.override("lights", state=None, until=utc("2024-06-10T18:00"), by="tech", via={})
        await tick_at(site, clock, utc("2024-06-10T17:00"))  # 19:00 off: paused
        assert await runs(site) == []
        await tick_at(site, clock, utc("2024-06-10T18:00"))
        assert await runs(site) == [("resume", "off", utc("2024-06-10T17:00"))]
        assert site.metrics.schedule_occurrences.labels(outcome="overridden")._value.get() == 1


async def test_override_until_the_next_occurrence_hands_back_without_a_double_command(open_site, clock) -> None:
    clock.t = utc("2024-06-10T10:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        status = await site.rules.override("lights", state="off", until=None, by="tech", via={})
        assert status["override"]["until"] == utc("2024-06-10T17:00")
        await tick_at(site, clock, utc("2024-06-10T17:00"))
        assert await runs(site) == [("override", "off", None), ("schedule", "off", utc("2024-06-10T17:00"))]


async def test_cancelled_override_resumes_and_overrides_survive_restart(open_site, clock) -> None:
    clock.t = utc("2024-06-10T10:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.rules.scheduler.tick()
        await site.rules.override("lights", state="off", until=utc("2024-06-10T14:00"), by="tech", via={})
    clock.t = utc("2024-06-10T11:00")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        assert site.rules.scheduler.status("lights")["override"]["state"] == "off"
        await site.rules.scheduler.tick()
        await site.rules.cancel_override("lights", by="tech", via={})
        assert await runs(site) == [("override", "off", None), ("resume", "on", utc("2024-06-10T05:00"))]
        assert site.rules.scheduler.status("lights")["override"] is None


async def test_schedule_commands_reach_the_commander_and_are_audited(open_site, clock) -> None:
    clock.t = utc("2024-06-10T04:59")
    async with open_site(timezone=TZ, schedule=[sched(ON_OFF)]) as site:
        await site.registry.ensure("relay-1", profile="native")
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-10T05:00"))
        await site.rules.settle()
        assert [(t, p["command"], p["args"]) for t, p in site.published] == [
            ("devices/relay-1/command", "relay", {"state": "on"})]
        run = (await site.runs())[0]
        assert run.state == "sent" and run.command_id == site.published[0][1]["id"]
        audit = await site.db.fetchall("SELECT actor, action, target FROM audit")
        assert [tuple(a) for a in audit] == [("schedule:lights", "schedule.command", "relay-1")]


async def test_weekday_cron_schedule(open_site, clock) -> None:
    clock.t = utc("2024-06-07T12:00")  # a Friday
    async with open_site(timezone=TZ, schedule=[sched([{"cron": "0 7 * * mon-fri", "state": "on"}])]) as site:
        await site.rules.scheduler.tick()
        await tick_at(site, clock, utc("2024-06-08T05:00"))  # Saturday
        await tick_at(site, clock, utc("2024-06-09T05:00"))  # Sunday
        assert await runs(site) == []
        await tick_at(site, clock, utc("2024-06-10T05:00"))  # Monday
        assert await runs(site) == [("schedule", "on", utc("2024-06-10T05:00"))]
