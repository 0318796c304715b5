"""The live bus: committed readings and state changes, fanned out to live viewers.

Publishing never blocks and never fails: each subscriber has a bounded queue; when a
viewer (a phone on weak Wi-Fi) falls behind, its oldest updates are dropped and
counted, and the rest of the gateway does not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.metrics import Metrics

Event = dict[str, Any]


class Subscription:
    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()


class LiveBus:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._subs: set[Subscription] = set()
        self._metrics = metrics

    def publish(self, event: Event) -> None:
        for sub in self._subs:
            q = sub.queue
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                sub.dropped += 1
                if self._metrics is not None:
                    self._metrics.live_dropped.inc()
            q.put_nowait(event)

    def publish_many(self, events: list[Event]) -> None:
        if self._subs:
            for e in events:
                self.publish(e)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @contextlib.asynccontextmanager
    async def subscribe(self, maxsize: int = 1000) -> AsyncIterator[Subscription]:
        sub = Subscription(maxsize)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
