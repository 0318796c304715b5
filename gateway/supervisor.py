"""Supervised background tasks: each logs its failures, restarts with backoff, and
shows in /healthz. Nothing in the gateway runs as a bare ``create_task``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 60.0
# a task that ran this long before failing is considered to have been healthy
HEALTHY_RUN_S = 30.0


@dataclass
class TaskState:
    name: str
    factory: Callable[[], Awaitable[None]]
    task: asyncio.Task[None] | None = None
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float = field(default_factory=time.time)
    running: bool = False
    backing_off: bool = False


class Supervisor:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._tasks: dict[str, TaskState] = {}
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        if name in self._tasks:
            raise ValueError(f"task {name!r} already supervised")
        st = TaskState(name, factory)
        self._tasks[name] = st
        st.task = asyncio.create_task(self._run(st), name=f"supervised:{name}")

    async def _run(self, st: TaskState) -> None:
        backoff = INITIAL_BACKOFF_S
        while not self._stopping:
            began = time.monotonic()
            st.running, st.backing_off = True, False
            try:
                await st.factory()
                if self._stopping:
                    return
                raise RuntimeError("task returned unexpectedly")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                st.running = False
                st.last_error = f"{type(exc).__name__}: {exc}"
                st.last_error_at = time.time()
                st.restarts += 1
                self._metrics.task_restarts.labels(task=st.name).inc()
                if time.monotonic() - began > HEALTHY_RUN_S:
                    backoff = INITIAL_BACKOFF_S
                delay = backoff * (0.5 + random.random())
                log.error("task.failed", task=st.name, error=st.last_error, restart_in_s=round(delay, 2),
                          exc_info=exc)
                st.backing_off = True
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def health(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "ok": st.running and not st.backing_off,
                "restarts": st.restarts,
                "last_error": st.last_error,
                "last_error_at": st.last_error_at,
            }
            for name, st in self._tasks.items()
        }

    async def stop(self) -> None:
        self._stopping = True
        tasks = [st.task for st in self._tasks.values() if st.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
