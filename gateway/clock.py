"""Wall time and whether it can be trusted.

A Raspberry Pi has no RTC: at boot its clock is wherever the last shutdown left it
(fake-hwclock) until NTP steps it. Readings record whether the clock was synchronised;
when synchronisation arrives, the :class:`ClockMonitor` measures the step against the
monotonic clock so readings taken before it can be shifted by exactly that much.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

_TIME_ERROR = 5  # adjtimex() return value while the kernel considers the clock unsynchronised


class _Timex(ctypes.Structure):
    _fields_ = [  # ctypes layout of struct timex (linux/timex.h)
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


class Clock:
    """The gateway's view of time. Tests substitute a clock they control."""

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def synced(self) -> bool:
        return True


class KernelClock(Clock):
    """Asks the kernel (adjtimex), as timedatectl does: no daemon-specific files."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name, use_errno=True) if name else None

    def synced(self) -> bool:
        if self._libc is None:
            return False
        tx = _Timex()
        return int(self._libc.adjtimex(ctypes.byref(tx))) != _TIME_ERROR


class FixedClock(Clock):
    def __init__(self, synced: bool) -> None:
        self._synced = synced

    def synced(self) -> bool:
        return self._synced


class ClockMonitor:
    """Watches for the unsynchronised → synchronised transition and the step with it."""

    def __init__(self, clock: Clock, on_sync: Callable[[float], Awaitable[None]],
                 interval_s: float = 5.0) -> None:
        self.clock = clock
        self._on_sync = on_sync
        self._interval = interval_s
        self.synced = clock.synced()
        # wall - mono while unsynchronised; the step is how much this jumps at sync
        self._offset = clock.wall() - clock.mono()
        self.last_step_s: float | None = None

    async def check(self) -> None:
        now_synced = self.clock.synced()
        offset = self.clock.wall() - self.clock.mono()
        if now_synced and not self.synced:
            step = offset - self._offset
            self.last_step_s = step
            log.info("clock.synchronised", step_s=round(step, 3))
            await self._on_sync(step)
        elif not now_synced:
            self._offset = offset
        self.synced = now_synced

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)
