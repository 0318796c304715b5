"""The store's SQLite files: where they are, how every process opens them, what they weigh.

The store is two files in the data dir: the main one (``siteward.db``: outbox, devices,
everything else) and the history file beside it (``siteward-history.db``, see
``gateway.store.history``). Each has its own WAL and its own write lock.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

HISTORY_SCHEMA = "hist"  # the name the history file is attached under
# Page size of a new main file. Every group commit rewrites the outbox's last, partly
# filled page (and its parent): with 1 KiB pages that floor is a quarter of SQLite's
# 4 KiB default. Measured at 1,000 msg/s, 68 readings a commit: 214 -> 149 B written
# per reading (bench/store_cycle.py, docs/performance.md).
MAIN_PAGE_SIZE = 1024
# Page size of a new history file: a merge touches the last pages of every series, and
# smaller pages make that less (99 -> 85 B per merged reading); below 2 KiB it gains
# nothing more, and charts read long range scans.
HISTORY_PAGE_SIZE = 2048


def history_path(main: Path) -> Path:
    """The history file that belongs to the main database file ``main``."""
    return main.with_name(f"{main.stem}-history{main.suffix or '.db'}")


def connect(path: Path, *, readonly: bool = False, page_size: int | None = None) -> sqlite3.Connection:
    """Open a store file the way every Siteward process must (WAL, FULL sync).

    ``page_size`` applies to a file this call creates; a WAL file keeps the page size it
    was created with.
    """
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
    else:
        fresh = not Path(path).exists() or Path(path).stat().st_size == 0
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        if fresh and page_size is not None:
            conn.execute(f"PRAGMA page_size={int(page_size)}")
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def attach_statement(main: Path, *, readonly: bool) -> tuple[str, tuple[str]]:
    """The ATTACH of the history file that belongs to ``main``, as ``hist`` (SQL, parameters).

    Unqualified ``history`` and ``history_merge`` then resolve there. Only the history
    writer attaches it read-write (``gateway.store.history``); the main writer never
    attaches it, so ingest never waits for this file's lock.
    """
    path = history_path(main)
    # read-only connections are opened by URI (see connect), which makes ATTACH take one
    # too; a plain connection would take "file:..." as a file name and create that file
    name = f"file:{path}?mode=ro" if readonly else str(path)
    return f"ATTACH DATABASE ? AS {HISTORY_SCHEMA}", (name,)


def attach_history(conn: sqlite3.Connection, main: Path, *, readonly: bool) -> None:
    conn.execute(*attach_statement(main, readonly=readonly))
    if not readonly:
        conn.execute(f"PRAGMA {HISTORY_SCHEMA}.journal_mode=WAL")
        conn.execute(f"PRAGMA {HISTORY_SCHEMA}.synchronous=FULL")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
    """BEGIN ``mode`` ... COMMIT on a connection opened with ``isolation_level=None``;
    ROLLBACK and re-raise if the body raises (a failed ROLLBACK does not hide why)."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def file_bytes(path: Path) -> int:
    """Size on disk of the store whose main file is ``path``: both files and their WALs."""
    total = 0
    for base in (path, history_path(path)):
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += Path(str(base) + suffix).stat().st_size
    return total
