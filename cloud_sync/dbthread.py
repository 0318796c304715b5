"""One SQLite connection on a thread of its own, opened there on first use and closed there.

The sync reads the store (``outbox.StoreReader``) and writes its own tables
(``state.StateStore``) each through such a connection: sqlite3 calls never run on the
event loop, and a connection is only ever touched by the one thread that made it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ConnectionThread:
    def __init__(self, path: Path, thread_name: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        """The connection, as this user of the store needs it (pragmas, read-only or not)."""
        raise NotImplementedError

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    async def _on_thread(self, fn: Callable[[Callable[[sqlite3.Connection], T]], T],
                         arg: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
