"""The in-flight window: how much may be published and not yet acknowledged-and-recorded.

A unit holds its slot from publish until its PUBACK is *recorded in the store*, not
merely received: then "in flight" means exactly "would be sent again after a crash",
and the window bounds the duplicates any single fault can cause.
"""

from __future__ import annotations

from cloud_sync.lanes import Unit


class Window:
    def __init__(self, max_units: int, max_bytes: int, *, reserved: int) -> None:
        self.max_units = max_units
        self.max_bytes = max_bytes
        # slots the backlog may not take, so events and live readings always find one
        self.backlog_limit = max(1, max_units - reserved) if max_units > 1 else 1
        self.count = 0
        self.nbytes = 0
        self._held: set[Unit] = set()

    def has_room(self) -> bool:
        return self.count < self.max_units and self.nbytes < self.max_bytes

    def backlog_room(self) -> bool:
        # the byte bound is shared: a window full of large backlog batches leaves a quarter for live ones
        return self.count < self.backlog_limit and self.nbytes < self.max_bytes * 3 // 4

    def take(self, u: Unit) -> None:
        if u in self._held:
            return
        self._held.add(u)
        self.count += 1
        self.nbytes += u.nbytes

    def release(self, u: Unit) -> None:
        if u not in self._held:
            return
        self._held.discard(u)
        self.count -= 1
        self.nbytes -= u.nbytes

    def empty(self) -> bool:
        return self.count == 0
