"""Which ids of one id space (readings or events) the cloud has, and which are on their way.

The cloud acknowledges messages (QoS 1 PUBACK) in any order, and a message covers a
range of ids. A :class:`Ledger` keeps

* ``base``: every id <= base is acknowledged *and recorded in the store* (the watermark
  retention relies on);
* ``acked``: recorded ranges above ``base`` (a live lane runs ahead of the backlog);
* ``inflight``: ranges published and not yet acknowledged;
* ``unrecorded``: acknowledged ranges whose record is still being written.

Nothing here does I/O; the scheduler asks it for the lowest id range nobody has claimed.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

Range = tuple[int, int]  # inclusive [first, last]


class RangeSet:
    """Disjoint, sorted, merged inclusive integer ranges. Small in practice (a few dozen)."""

    __slots__ = ("_r",)

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._r: list[list[int]] = []
        for lo, hi in ranges:
            self.add(lo, hi)

    def __iter__(self) -> Iterator[Range]:
        return ((lo, hi) for lo, hi in self._r)

    def __len__(self) -> int:
        return len(self._r)

    def __bool__(self) -> bool:
        return bool(self._r)

    def __repr__(self) -> str:
        return f"RangeSet({[tuple(r) for r in self._r]})"

    def add(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        r = self._r
        # first range that could touch [lo, hi] (ends at lo-1 or later)
        i = bisect_right([x[1] for x in r], lo - 2)
        j = i
        while j < len(r) and r[j][0] <= hi + 1:
            lo, hi = min(lo, r[j][0]), max(hi, r[j][1])
            j += 1
        r[i:j] = [[lo, hi]]

    def remove(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        out: list[list[int]] = []
        for a, b in self._r:
            if b < lo or a > hi:
                out.append([a, b])
                continue
            if a < lo:
                out.append([a, lo - 1])
            if b > hi:
                out.append([hi + 1, b])
        self._r = out

    def contains(self, x: int) -> bool:
        i = bisect_right([a for a, _ in self._r], x) - 1
        return i >= 0 and self._r[i][1] >= x

    def covered(self, lo: int, hi: int) -> int:
        """How many ids of [lo, hi] the set covers."""
        return sum(max(0, min(b, hi) - max(a, lo) + 1) for a, b in self._r)

    def first(self) -> Range | None:
        return (self._r[0][0], self._r[0][1]) if self._r else None

    def max(self) -> int | None:
        return self._r[-1][1] if self._r else None

    def pop_first(self) -> Range:
        a, b = self._r.pop(0)
        return a, b

    def clear(self) -> list[Range]:
        out = list(self)
        self._r = []
        return out


def first_gap(sets: Iterable[RangeSet], start: int, end: int | None) -> Range | None:
    """Lowest range within [start, end] (end None: unbounded) that none of ``sets`` covers.

    An unbounded gap is returned with its last id as -1.
    """
    merged = RangeSet()
    for s in sets:
        for lo, hi in s:
            merged.add(lo, hi)
    cand = start
    for lo, hi in merged:
        if hi < cand:
            continue
        if lo > cand:
            gap_end = lo - 1 if end is None else min(lo - 1, end)
            return (cand, gap_end) if end is None or cand <= end else None
        cand = hi + 1
    if end is not None and cand > end:
        return None
    return cand, (-1 if end is None else end)


class Ledger:
    def __init__(self, base: int = 0, acked: Iterable[Range] = ()) -> None:
        self.base = base
        self.acked = RangeSet(r for r in acked if r[1] > base)
        self.inflight = RangeSet()
        self.unrecorded = RangeSet()
        self._normalise()

    def _normalise(self) -> None:
        self.acked.remove(0, self.base)
        while (first := self.acked.first()) is not None and first[0] <= self.base + 1:
            self.base = max(self.base, self.acked.pop_first()[1])

    # -- what to send next --------------------------------------------------------------
    def next_unclaimed(self, start: int, end: int | None) -> Range | None:
        """Lowest id range in [start, end] neither acknowledged nor on its way."""
        return first_gap((self.acked, self.inflight, self.unrecorded), max(start, self.base + 1), end)

    # -- the life of a range ------------------------------------------------------------
    def claim(self, lo: int, hi: int) -> None:
        self.inflight.add(lo, hi)

    def broker_acked(self, lo: int, hi: int) -> None:
        self.inflight.remove(lo, hi)
        self.unrecorded.add(lo, hi)

    def recorded(self, lo: int, hi: int) -> None:
        self.unrecorded.remove(lo, hi)
        self.acked.add(lo, hi)
        self._normalise()

    def release_inflight(self) -> list[Range]:
        """The connection died: what was in flight is to be sent again."""
        return self.inflight.clear()
