"""Small asyncio guards the sync's loops share.

Python 3.11's ``asyncio.wait_for`` can swallow a cancellation when the awaited future
completes in the same instant (fixed in 3.12); aiomqtt uses it for every publish and
connect. A loop that catches the resulting normal return or ``MqttError`` would then run
on after being cancelled, and whoever awaits it (a task group, the supervisor at stop)
would wait forever. Every long-running loop here calls :func:`checkpoint` once per turn;
our own code uses ``asyncio.timeout``, which has no such race.
"""

from __future__ import annotations

import asyncio


def checkpoint() -> None:
    """Raise ``CancelledError`` if this task was asked to stop, even if the request was eaten."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, within: float | None) -> bool:
    """Wait for ``event`` at most ``within`` seconds; True if it was set."""
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True
