"""Where the store's disk writes come from: bytes written per reading, by layout and commit size.

    python -m bench.store_wear [--quick] [--json-only]

No broker, no network: one process replays the commit pattern of N devices x 3 metrics
publishing at a fixed total rate, in simulated time, and reads its own ``write_bytes``
from /proc/self/io. Connections come from ``gateway.store.files.connect`` (WAL and
``synchronous=FULL`` as Siteward opens them). The readings table of each layout is
defined here, not taken from the migrations, so a layout keeps meaning the same thing
while Siteward's schema changes. The database is first filled with a minute of history
so every series already owns its own index leaf pages, as on a running site.

Layouts compared (readings rows: id, series_id, ts, value, flags, source):
  indexed        id AUTOINCREMENT + index (series_id, ts): Siteward's layout until
                 18c5813 (every commit rewrites one index leaf per series it touches)
  no_index       the same without the (series_id, ts) index: what the index costs
  no_index_rowid no index and a plain rowid (no AUTOINCREMENT): what the sqlite_sequence
                 row, rewritten by every commit, costs; the hot path since 18c5813
  staging        each commit appends to an unindexed readings_hot table; every
                 ``--move-s`` simulated seconds one transaction moves those rows into
                 the indexed table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import pick_workdir_parent, proc_write_bytes

LAYOUTS = ("indexed", "no_index", "no_index_rowid", "staging")
_COLUMNS = ("series_id INTEGER NOT NULL, ts REAL NOT NULL, value REAL NOT NULL,"
            " flags INTEGER NOT NULL DEFAULT 0, source INTEGER NOT NULL DEFAULT 0")
INSERT = "INSERT INTO {t} (id, series_id, ts, value, flags, source) VALUES (?, ?, ?, ?, 0, 0)"


def _open(path: Path, layout: str) -> sqlite3.Connection:
    from gateway.store.files import connect

    conn = connect(path)
    conn.execute("CREATE TABLE series (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, metric TEXT NOT NULL,"
                 " unit TEXT NOT NULL DEFAULT '', UNIQUE (device_id, metric))")
    autoinc = " AUTOINCREMENT" if layout in ("indexed", "no_index", "staging") else ""
    conn.execute(f"CREATE TABLE readings (id INTEGER PRIMARY KEY{autoinc}, {_COLUMNS})")
    if layout in ("indexed", "staging"):
        conn.execute("CREATE INDEX readings_series_ts ON readings (series_id, ts)")
    if layout == "staging":
        conn.execute(f"CREATE TABLE readings_hot (id INTEGER PRIMARY KEY, {_COLUMNS})")
    return conn


def _series(conn: sqlite3.Connection, devices: int, metrics: int) -> list[list[int]]:
    out: list[list[int]] = []
    conn.execute("BEGIN")
    for d in range(devices):
        row = []
        for m in range(metrics):
            cur = conn.execute("INSERT INTO series (device_id, metric, unit) VALUES (?, ?, '')",
                               (f"dev-{d:03d}", f"m{m}"))
            row.append(int(cur.lastrowid or 0))
        out.append(row)
    conn.execute("COMMIT")
    return out


def run_case(work: Path, layout: str, interval_ms: float, *, rate: float, devices: int, metrics: int,
             history_s: float, sim_s: float, move_s: float, autocheckpoint: int | None) -> dict[str, Any]:
    db = work / f"{layout}-{interval_ms:g}.db"
    conn = _open(db, layout)
    if autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
    series = _series(conn, devices, metrics)
    next_id = 1
    t_sim = 1_700_000_000.0
    # history: a minute of readings, so every series owns its own index leaves
    rows = []
    for k in range(int(history_s * rate)):
        d = k % devices
        for m in range(metrics):
            rows.append((next_id, series[d][m], t_sim + k / rate, 20.0 + m))
            next_id += 1
    conn.execute("BEGIN")
    conn.executemany(INSERT.format(t="readings"), rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    t_sim += history_s

    per_commit = max(1, round(rate * interval_ms / 1000.0))  # messages per group commit
    commits = max(1, int(sim_s * rate / per_commit))
    table = "readings_hot" if layout == "staging" else "readings"
    sql = INSERT.format(t=table)
    msg = 0
    next_move = t_sim + move_s
    moves = 0
    wb0 = proc_write_bytes_self()
    w0 = time.perf_counter()
    lat: list[float] = []
    for _ in range(commits):
        rows = []
        for _ in range(per_commit):
            d = msg % devices
            ts = t_sim + msg / rate
            for m in range(metrics):
                rows.append((next_id, series[d][m], ts, 20.0 + m))
                next_id += 1
            msg += 1
        c0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        if layout == "staging" and t_sim + msg / rate >= next_move:
            conn.execute("INSERT INTO readings SELECT * FROM readings_hot")
            conn.execute("DELETE FROM readings_hot")
            next_move += move_s
            moves += 1
        conn.execute("COMMIT")
        lat.append(time.perf_counter() - c0)
    wall = time.perf_counter() - w0
    written = proc_write_bytes_self() - wb0
    readings = msg * metrics
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return {"layout": layout, "commit_interval_ms": interval_ms, "readings_per_commit": per_commit * metrics,
            "commits": commits, "readings": readings, "bytes_per_reading": written / readings,
            "bytes_per_commit": written / commits, "ms_per_commit": wall * 1000 / commits, "moves": moves,
            # the tail shows the commits that also ran SQLite's automatic WAL checkpoint
            "commit_ms_p50": _pct(lat, 0.5), "commit_ms_p99": _pct(lat, 0.99), "commit_ms_max": max(lat) * 1000}


def _pct(vals: list[float], q: float) -> float:
    v = sorted(vals)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))] * 1000


def proc_write_bytes_self() -> int:
    return proc_write_bytes(os.getpid())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store_wear", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--rate", type=float, default=1000.0, help="messages/s over all devices")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--metrics", type=int, default=3)
    ap.add_argument("--move-s", type=float, default=30.0, help="staging layout: move interval")
    ap.add_argument("--intervals", default="5,20,100,1000", help="commit intervals, ms")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--sim-s", type=float, default=30.0, help="simulated seconds measured per case")
    ap.add_argument("--wal-autocheckpoint", type=int, default=None,
                    help="PRAGMA wal_autocheckpoint for the writer (default: SQLite's 1000 pages)")
    args = ap.parse_args(argv)
    sim_s = 5.0 if args.quick else args.sim_s
    intervals = [float(x) for x in args.intervals.split(",")]
    if args.quick:
        intervals = [5.0, 100.0]
    work = Path(tempfile.mkdtemp(prefix="siteward-wear-", dir=pick_workdir_parent()))
    results = []
    try:
        for layout in args.layouts.split(","):
            for ms in intervals:
                r = run_case(work, layout, ms, rate=args.rate, devices=args.devices, metrics=args.metrics,
                             history_s=60.0, sim_s=sim_s, move_s=args.move_s,
                             autocheckpoint=args.wal_autocheckpoint)
                results.append(r)
                if not args.json_only:
                    print(f"{layout:9s} commit every {ms:6g} ms ({r['readings_per_commit']:5d} readings): "
                          f"{r['bytes_per_reading']:7.0f} bytes/reading, {r['bytes_per_commit'] / 1024:7.1f} "
                          f"KiB/commit, commit p50 {r['commit_ms_p50']:5.1f} p99 {r['commit_ms_p99']:5.1f} "
                          f"max {r['commit_ms_max']:5.1f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"rate_msgs_per_s": args.rate, "devices": args.devices, "metrics": args.metrics,
                      "simulated_s": sim_s, "move_s": args.move_s,
                      "results": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                                  for r in results]}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
