"""Talking to systemd: READY, STATUS and the watchdog (``Type=notify``, ``WatchdogSec=``).

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (``@name`` means the abstract namespace), so no library is needed.
Outside systemd (development, tests without the variable) every call is a no-op.

Readiness means *serving*: the CLI sends ``READY=1`` only after the broker and the web
server listen. The watchdog is fed by :func:`watchdog_loop`, itself a supervised task, and
only while (a) the event loop answers promptly and (b) no supervised task has been
unhealthy for longer than a grace period. A wedged loop feeds nothing, so systemd kills
and restarts the process after ``WatchdogSec``; a task that keeps failing is restarted the
same way, since a fresh process is the one remedy left to the supervisor. The grace keeps
a short backoff (a dropped uplink, a brief disk error) from costing a restart.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# a loop that needs longer than this to run a trivial callback is not serving anyone
MAX_LOOP_LAG_S = 5.0
# how long a supervised task may stay unhealthy (backing off) before the watchdog stops
UNHEALTHY_GRACE_S = 180.0
# a restart cannot empty a full disk: tasks failing for that are reported (/healthz "disk"
# and "store"), not restarted, or a full card would turn into a restart loop
NO_RESTART_ERRORS = ("database or disk is full", "No space left on device")


class Notifier:
    """Sends sd_notify messages; inert when ``$NOTIFY_SOCKET`` is not set."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval_s = self._watchdog_interval(env)
        self.sent: list[str] = []  # what was sent, for /healthz and tests

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec:
            return None
        # WATCHDOG_PID names the process the watchdog is meant for (not a child we forked)
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1_000_000 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields (``ready=1`` → ``READY=1``); False if not under systemd."""
        if self.address is None:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # never block the event loop on a stalled receiver: a lost ping is only a ping
                s.setblocking(False)
                s.connect(addr)
                s.send(message.encode())
        except OSError as exc:
            # systemd gone (shutdown) or the socket not reachable: never fatal to the gateway
            log.warning("systemd.notify_failed", error=str(exc))
            return False
        self.sent.append(message)
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self) -> bool:
        return self.notify(stopping=1, status="stopping")


async def loop_lag(timeout_s: float = MAX_LOOP_LAG_S) -> float | None:
    """Seconds the loop took to run a callback scheduled now; None if over ``timeout_s``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[float] = loop.create_future()
    t0 = time.monotonic()
    loop.call_soon(lambda: fut.done() or fut.set_result(time.monotonic() - t0))
    try:
        return await asyncio.wait_for(fut, timeout_s)
    except TimeoutError:
        return None


class HealthGate:
    """Decides whether the supervised tasks are healthy enough to feed the watchdog."""

    def __init__(self, tasks: Callable[[], dict[str, dict[str, Any]]], *, grace_s: float = UNHEALTHY_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tasks = tasks
        self._grace = grace_s
        self._clock = clock
        self._bad_since: dict[str, float] = {}

    def check(self) -> tuple[bool, str]:
        now = self._clock()
        worst: tuple[float, str] | None = None
        health = self._tasks()
        for name, state in health.items():
            error = str(state.get("last_error") or "")
            if state.get("ok", False) or any(m in error for m in NO_RESTART_ERRORS):
                self._bad_since.pop(name, None)
                continue
            since = self._bad_since.setdefault(name, now)
            if worst is None or since < worst[0]:
                worst = (since, name)
        for gone in set(self._bad_since) - set(health):
            del self._bad_since[gone]
        if worst is None:
            return True, "all supervised tasks healthy"
        bad_for = now - worst[0]
        reason = f"task {worst[1]} unhealthy for {bad_for:.0f}s"
        return bad_for <= self._grace, reason


async def watchdog_loop(notifier: Notifier, gate: HealthGate, *, interval_s: float | None = None) -> None:
    """Feed the watchdog at half its timeout while the gate says healthy (runs forever)."""
    period = interval_s or ((notifier.watchdog_interval_s or 0) / 2) or 10.0
    starving = False
    while True:
        lag = await loop_lag()
        ok, reason = gate.check()
        if lag is None:
            ok, reason = False, f"event loop lag over {MAX_LOOP_LAG_S}s"
        if ok:
            notifier.notify(watchdog=1)
            if starving:
                log.info("systemd.watchdog_resumed")
                starving = False
        elif not starving:
            # said once: systemd will restart us when WatchdogSec passes without a ping
            log.error("systemd.watchdog_starved", reason=reason)
            notifier.status(f"unhealthy: {reason}")
            starving = True
        await asyncio.sleep(period)


def announce_ready(supervisor: Any, status: str, notifier: Notifier | None = None) -> Notifier:
    """Send READY=1 now and, when systemd asked for a watchdog, feed it from a task of
    ``supervisor`` (a :class:`gateway.supervisor.Supervisor`) gated on its tasks' health.

    Call it once the process serves; call ``.stopping()`` on the result at shutdown.
    """
    notifier = notifier or Notifier()
    if notifier.watchdog_interval_s:
        gate = HealthGate(supervisor.health)
        supervisor.start("systemd.watchdog", lambda: watchdog_loop(notifier, gate))
    notifier.ready(status)
    return notifier
