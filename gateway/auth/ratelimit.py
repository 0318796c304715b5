"""Login rate limiting with lock-out.

Failures are counted per (user name, client address) in a sliding one-minute window.
The ``limit``-th failure locks that pair out for ``lockout_s``; while locked, attempts
are answered 429 with ``Retry-After`` *before* any password is checked, so guessing
costs the gateway no argon2 work. A second, looser limit counts failures per address
across all user names, so one laptop cannot spray many names at the limit each.

Keying on the pair (not the name alone) means an attacker elsewhere on the LAN cannot
lock the real technician out of their own account.

State is in memory: a restart forgets it, which costs an attacker a reboot of the
gateway per minute, which is no help. Keys come from the network, so the table is
bounded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0
ADDRESS_FACTOR = 4  # per-address limit = limit x this, across user names
_MAX_KEYS = 10_000


@dataclass(slots=True)
class _State:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Lockout:
    """A lock-out that has just begun (for the audit trail)."""

    scope: str  # "user" (name + address) or "address" (address, any name)
    username: str
    address: str
    failures: int
    retry_after_s: float


class LoginLimiter:
    def __init__(
        self,
        limit: int,
        *,
        lockout_s: float = WINDOW_S,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.lockout_s = lockout_s
        self.window_s = window_s
        self.clock = clock
        self._states: dict[tuple[str, str], _State] = {}

    def _keys(self, username: str, address: str) -> tuple[tuple[str, str], tuple[str, str]]:
        # "\0" cannot occur in a user name, so the address-wide key never collides
        return (username.strip().lower()[:128], address), ("\0", address)

    def retry_after(self, username: str, address: str) -> float | None:
        """Seconds until this pair may try again, or None if it may try now."""
        now = self.clock()
        wait = 0.0
        for key in self._keys(username, address):
            st = self._states.get(key)
            if st is not None and st.locked_until > now:
                wait = max(wait, st.locked_until - now)
        return wait or None

    def failure(self, username: str, address: str) -> Lockout | None:
        """Count a failed attempt; returns the lock-out it started, if any."""
        now = self.clock()
        started: Lockout | None = None
        user_key, addr_key = self._keys(username, address)
        for key, limit, scope in (
            (user_key, self.limit, "user"),
            (addr_key, self.limit * ADDRESS_FACTOR, "address"),
        ):
            st = self._states.get(key)
            if st is None:
                self._prune(now)
                st = self._states[key] = _State()
            while st.failures and st.failures[0] <= now - self.window_s:
                st.failures.popleft()
            st.failures.append(now)
            if len(st.failures) >= limit and st.locked_until <= now:
                st.locked_until = now + self.lockout_s
                count = len(st.failures)
                st.failures.clear()
                if started is None:
                    started = Lockout(
                        scope=scope,
                        username=user_key[0],
                        address=address,
                        failures=count,
                        retry_after_s=self.lockout_s,
                    )
        return started

    def success(self, username: str, address: str) -> None:
        self._states.pop(self._keys(username, address)[0], None)

    def _prune(self, now: float) -> None:
        if len(self._states) < _MAX_KEYS:
            return
        for key in [
            k
            for k, st in self._states.items()
            if st.locked_until <= now and (not st.failures or st.failures[-1] <= now - self.window_s)
        ]:
            del self._states[key]
        if len(self._states) >= _MAX_KEYS:
            # still full of live entries: a flood of distinct names; forget the oldest half
            for key in list(self._states)[: _MAX_KEYS // 2]:
                del self._states[key]
