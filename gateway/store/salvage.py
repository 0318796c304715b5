"""A corrupt database file at start: keep serving, keep what can be read, keep the evidence.

SD cards fail, and a power cut on a card that lies about flushes can corrupt SQLite
despite WAL. Refusing to start would stop collection on the whole site, so
:func:`check_and_salvage` (called by ``Database.open`` before anything else touches the
file) does this instead:

1. ``PRAGMA quick_check`` on the file (and its WAL). "ok" → nothing to do.
2. Otherwise the file, its ``-wal`` and ``-shm`` are renamed to
   ``<name>.corrupt-<UTC time>`` (never deleted: a person may recover more by hand).
3. A new file gets the current schema (the numbered migrations), then every table the new
   schema has is copied from the broken file row by row in rowid order. When a stretch of
   rows cannot be read (a damaged page), the copy probes forward for the next readable
   rowid and goes on, so one bad page loses that page, not the rest of the table.
4. Reading ids must never be reused (they are the cloud's idempotency keys): the new
   AUTOINCREMENT sequence starts above the old one, and above every copied id plus
   :data:`ID_GAP` when the old sequence itself cannot be read.

The :class:`SalvageReport` says what happened; the gateway puts it in /healthz and the
event log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

CHUNK_ROWS = 2000
# when the old id sequence is lost, new readings start this far above the highest copied
# id, so that ids of lost (possibly already synced) readings are not handed out again
ID_GAP = 1_000_000
# how far past an unreadable rowid the copy looks for readable rows again
MAX_PROBE_SPAN = 1 << 40
ID_FLOOR_KEY = "store.salvage_id_floor"


@dataclass
class SalvageReport:
    path: str
    problem: str
    broken_file: str
    at: float = field(default_factory=time.time)
    tables: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> copied, skipped_ranges
    sequence_from: int | None = None
    sequence_lost: bool = False

    @property
    def rows_copied(self) -> int:
        return sum(t["copied"] for t in self.tables.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_copied": self.rows_copied}


def integrity_problem(path: Path) -> str | None:
    """None if ``path`` (with its WAL) passes ``quick_check``; else what is wrong."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"
    result = [str(r[0]) for r in rows]
    if result == ["ok"]:
        return None
    return "; ".join(result[:5]) + (f" (+{len(result) - 5} more)" if len(result) > 5 else "")


def check_and_salvage(path: Path, make_schema: Callable[[sqlite3.Connection], Any]) -> SalvageReport | None:
    """Run before the writer opens ``path``. Returns a report if the file had to be salvaged."""
    problem = integrity_problem(path)
    if problem is None:
        return None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    broken = path.with_name(f"{path.name}.corrupt-{stamp}")
    log.error("store.corrupt", path=str(path), problem=problem, moved_to=str(broken))
    for suffix in ("-wal", "-shm", ""):  # the main file last: its name is what marks the set
        src = Path(str(path) + suffix)
        if src.exists():
            src.rename(Path(str(broken) + suffix))
    report = SalvageReport(path=str(path), problem=problem, broken_file=str(broken))

    new = sqlite3.connect(path, isolation_level=None)
    try:
        new.execute("PRAGMA journal_mode=WAL")
        make_schema(new)
        try:
            old = sqlite3.connect(f"file:{broken}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            log.error("store.salvage_unreadable", error=str(exc))
            return report
        try:
            _copy_all(old, new, report)
        finally:
            old.close()
    finally:
        new.close()
    log.warning("store.salvaged", **{k: v for k, v in report.as_dict().items() if k != "path"})
    return report


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _copy_all(old: sqlite3.Connection, new: sqlite3.Connection, report: SalvageReport) -> None:
    try:
        old_tables = set(_tables(old))
    except sqlite3.DatabaseError as exc:
        # the schema itself is unreadable: nothing can be located in the file any more
        log.error("store.salvage_no_schema", error=str(exc))
        old_tables = set()
    for table in _tables(new):
        if table not in old_tables:
            continue
        try:
            cols = [c for c in _columns(new, table) if c in set(_columns(old, table))]
        except sqlite3.DatabaseError:
            continue
        if cols:
            copy = _copy_plain if _without_rowid(new, table) else _copy_table
            result = copy(old, new, table, cols)
            if result["copied"] or result["skipped_ranges"]:  # the report lists what mattered
                report.tables[table] = result
    _restore_sequence(old, new, report)


def _without_rowid(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
    return bool(row and row[0] and "WITHOUT ROWID" in row[0].upper())


def _copy_plain(old: sqlite3.Connection, new: sqlite3.Connection, table: str, cols: list[str]) -> dict[str, int]:
    """A WITHOUT ROWID table has no rowid to skip damage by: copy in key order until the first error."""
    col_sql = ", ".join(f'"{c}"' for c in cols)
    insert = f'INSERT OR IGNORE INTO "{table}" ({col_sql}) VALUES ({", ".join("?" * len(cols))})'
    copied = skipped = 0
    try:
        cur = old.execute(f'SELECT {col_sql} FROM "{table}"')
        while rows := cur.fetchmany(CHUNK_ROWS):
            new.execute("BEGIN")
            new.executemany(insert, rows)
            new.execute("COMMIT")
            copied += len(rows)
    except sqlite3.DatabaseError:
        skipped = 1
    return {"copied": copied, "skipped_ranges": skipped}


def _copy_table(old: sqlite3.Connection, new: sqlite3.Connection, table: str, cols: list[str]) -> dict[str, int]:
    col_sql = ", ".join(f'"{c}"' for c in cols)
    insert = f'INSERT OR IGNORE INTO "{table}" (rowid, {col_sql}) VALUES ({", ".join("?" * (len(cols) + 1))})'
    # ">= start", not "> last": after a skip the seek must land on the first good row, not in
    # the damaged page that holds the row before it
    select = f'SELECT rowid, {col_sql} FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT ?'
    copied = skipped = 0
    start = -(1 << 62)

    def put(rows: list[Any]) -> None:
        nonlocal copied, start
        new.execute("BEGIN")
        new.executemany(insert, rows)
        new.execute("COMMIT")
        copied += len(rows)
        start = rows[-1][0] + 1

    while True:
        try:
            rows = old.execute(select, (start, CHUNK_ROWS)).fetchall()
        except sqlite3.DatabaseError:
            # damage somewhere in this chunk: go row by row up to it, then skip past it
            while True:
                try:
                    one = old.execute(select, (start, 1)).fetchall()
                except sqlite3.DatabaseError:
                    break
                if not one:
                    return {"copied": copied, "skipped_ranges": skipped}
                put(one)
            nxt = _next_readable(old, table, start - 1)
            if nxt is None or nxt < start:
                break
            skipped += 1
            start = nxt
            continue
        if not rows:
            break
        put(rows)
    return {"copied": copied, "skipped_ranges": skipped}


def _readable(old: sqlite3.Connection, table: str, rowid: int) -> int | None:
    """The first rowid >= ``rowid`` that can be read, None if none; raises if unreadable here."""
    row = old.execute(f'SELECT rowid FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT 1', (rowid,)).fetchone()
    if row is None:
        return None
    # the row itself must be readable too, not only its key
    old.execute(f'SELECT * FROM "{table}" WHERE rowid = ?', (row[0],)).fetchone()
    return int(row[0])


def _next_readable(old: sqlite3.Connection, table: str, last: int) -> int | None:
    """The first readable rowid after a damaged stretch following ``last``: probe forward with
    doubling steps until a seek succeeds, then bisect back to where the damage ends."""
    step = 1
    bad = last
    found: int | None = None
    while step <= MAX_PROBE_SPAN:
        try:
            found = _readable(old, table, last + step)
        except sqlite3.DatabaseError:
            bad = last + step
            step *= 2
            continue
        break
    else:
        return None
    if found is None:
        return None
    lo, hi = bad + 1, found
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            _readable(old, table, mid)
        except sqlite3.DatabaseError:
            lo = mid + 1
        else:
            hi = mid
    try:
        return _readable(old, table, lo)
    except sqlite3.DatabaseError:
        return found


def _old_top_id(old: sqlite3.Connection) -> int | None:
    """The highest reading id the broken file knew, if it can still tell."""
    best: int | None = None
    for sql in ("SELECT max(id) FROM readings", "SELECT seq FROM sqlite_sequence WHERE name = 'readings'",
                "SELECT max(id) FROM history"):
        try:
            row = old.execute(sql).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row and row[0] is not None:
            best = max(best or 0, int(row[0]))
    return best


def _restore_sequence(old: sqlite3.Connection, new: sqlite3.Connection, report: SalvageReport) -> None:
    """Keep reading ids above every id the broken file handed out (they are idempotency keys)."""
    old_top = _old_top_id(old)
    try:
        old_seq: dict[str, int] | None = {r[0]: int(r[1]) for r in old.execute("SELECT name, seq FROM sqlite_sequence")}
    except sqlite3.DatabaseError:
        old_seq = None
    copied_top = 0
    for table in ("readings", "history"):
        with contextlib.suppress(sqlite3.DatabaseError):
            copied_top = max(copied_top, new.execute(f'SELECT max(id) FROM "{table}"').fetchone()[0] or 0)
    if old_top is None:
        report.sequence_lost = True
        floor = copied_top + ID_GAP
    else:
        floor = max(old_top, copied_top)
    report.sequence_from = floor
    auto = [r[0] for r in new.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND sql LIKE '%AUTOINCREMENT%' ORDER BY name")]
    new.execute("BEGIN")
    for name in auto:
        top = new.execute(f'SELECT max(rowid) FROM "{name}"').fetchone()[0] or 0
        seq = top + ID_GAP if old_seq is None else max(old_seq.get(name, 0), top)
        if name == "readings":
            seq = floor
        new.execute("DELETE FROM sqlite_sequence WHERE name = ?", (name,))
        new.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, seq))
    # read back by Database.open through id_floor(): a floor that survives restarts even
    # when the readings table has no AUTOINCREMENT sequence to carry it
    with contextlib.suppress(sqlite3.DatabaseError):
        new.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (ID_FLOOR_KEY, str(floor)))
    new.execute("COMMIT")


def id_floor(conn: sqlite3.Connection) -> int:
    """The lowest id new readings may not go below after a salvage (0 if there never was one)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (ID_FLOOR_KEY,)).fetchone()
    except sqlite3.DatabaseError:
        return 0
    return int(row[0]) if row else 0
