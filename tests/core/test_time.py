"""Time is data: unsynchronised clocks are flagged, corrected at sync, node stamps bounded."""

from __future__ import annotations

import time

from gateway.clock import Clock
from gateway.ingest.pipeline import Timekeeper
from gateway.models import TimeFlag
from gateway.settings import TimeSection


class PiClock(Clock):
    """A Raspberry Pi without RTC: boots with a stale wall clock until NTP steps it."""

    def __init__(self, behind_s: float) -> None:
        self.behind = behind_s
        self.is_synced = False

    def wall(self) -> float:
        return time.time() - self.behind

    def synced(self) -> bool:
        return self.is_synced

    def ntp_step(self) -> None:
        self.behind = 0.0
        self.is_synced = True


def test_node_timestamps_within_bounds_are_kept_else_replaced_and_flagged() -> None:
    tk = Timekeeper(Clock(), TimeSection(max_future_skew_s=60, max_age_s=3600))
    now = time.time()
    assert tk.stamp(now - 10) == (now - 10, int(TimeFlag.NODE_TS))
    ts, flags = tk.stamp(now + 86400)  # a node from the future
    assert abs(ts - now) < 5 and flags == int(TimeFlag.TS_REPLACED)
    ts, flags = tk.stamp(0.0)  # a node that never set its clock
    assert flags == int(TimeFlag.TS_REPLACED)


def test_unsynced_gateway_flags_its_own_stamps() -> None:
    clock = PiClock(behind_s=3 * 86400)
    tk = Timekeeper(clock, TimeSection())
    _, flags = tk.stamp(None)
    assert flags == int(TimeFlag.CLOCK_UNSYNCED)
    # a node with NTP knows better than us: its plausible stamp is kept
    assert tk.stamp(time.time())[1] == int(TimeFlag.NODE_TS)


async def test_readings_before_ntp_sync_are_corrected_by_the_measured_step(make_settings) -> None:
    from gateway.app import Gateway

    clock = PiClock(behind_s=2 * 86400.0)
    async with Gateway(make_settings(time={"source": "kernel"}), clock=clock) as gw:
        await gw.ingest.ingest_http("n-1", b'{"temperature": 5}')
        (before,) = await gw.readings.history("n-1")
        assert before.flags & TimeFlag.CLOCK_UNSYNCED and before.ts < time.time() - 86400
        clock.ntp_step()
        await gw.clock_monitor.check()
        await gw.ingest.ingest_http("n-1", b'{"temperature": 6}')
        rows = {r.value: r for r in await gw.readings.history("n-1")}
        fixed = rows[5.0]
        assert abs(fixed.ts - time.time()) < 5, "shifted by the NTP step"
        assert fixed.flags & TimeFlag.CORRECTED and fixed.flags & TimeFlag.CLOCK_UNSYNCED
        assert rows[6.0].flags == 0
        assert gw.health.snapshot()["components"]["clock"]["synchronised"] is True
        ev = await gw.events.query(kind="gateway.clock_synchronised")
        assert abs(ev[0].data["step_s"] - 2 * 86400) < 5
