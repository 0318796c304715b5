"""Reconnect pacing: exponential backoff with jitter, capped, reset by a healthy session.

Jitter matters on a fleet: after a cloud outage every gateway retries, and without it
they would all knock at the same second. "Equal jitter" keeps at least half of the
nominal delay, so a gateway never hammers a broker that refuses it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# A session that lasted this long, or got a PUBACK, counts as a success: a broker that
# accepts and at once drops the connection must not reset the pacing (reconnect loop).
STABLE_SESSION_S = 10.0


class Backoff:
    def __init__(self, initial_s: float, cap_s: float, *, rng: Callable[[], float] = random.random) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self._rng = rng
        self.attempt = 0

    def nominal(self) -> float:
        return min(self.cap_s, self.initial_s * (2 ** min(self.attempt, 32)))

    def next_delay(self) -> float:
        d = self.nominal()
        self.attempt += 1
        return d / 2 + self._rng() * d / 2

    def reset(self) -> None:
        self.attempt = 0
