"""A minute of the store at 1,000 msg/s: bytes written by ingest, merge, release and checkpoint.

    python -m bench.store_cycle [--quick] [--json-only]

No broker: one process drives Siteward's own ``Database`` and ``Maintenance`` (the real
code) with 100 devices x 3 metrics at 1,000 msg/s, committed in batches of the size the
20 ms group commit makes (23 messages, 68 readings), with the cloud keeping up. After a
few minutes of warm-up (so history already holds every series), it measures one minute
of ingest and then the maintenance run that follows it, reading its own ``write_bytes``
from /proc/self/io around each step. Temporary files count: SQLite's sorter wrote them.

Each case runs in a fresh directory in the same process, and the shipped settings are
compared with a reference case (4 KiB main pages, SQLite's default) in the same run.
What a reading costs the SD card at steady state is ``ingest + maintenance`` per reading.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import pick_workdir_parent, proc_write_bytes

DEVICES, METRICS = 100, ("t", "h", "p")
RATE = 1000  # messages/s
# what a 20 ms group commit holds at 1,000 msg/s: 44 commits/s (measured through the
# gateway), so 23 messages, 68 readings
BATCH = 23  # messages per commit


def _wb() -> int:
    return proc_write_bytes(os.getpid())


async def _minute(db: Any, start: float, seconds: float) -> int:
    from gateway.models import Reading

    n = int(RATE * seconds)
    batch: list[Reading] = []
    for i in range(n):
        dev = f"dev-{i % DEVICES:03d}"
        batch += [Reading(device=dev, metric=m, value=float(i % 97), unit="", ts=start + i / RATE) for m in METRICS]
        if len(batch) >= BATCH * len(METRICS):
            await db.add_readings(batch)
            batch = []
    if batch:
        await db.add_readings(batch)
    return n * len(METRICS)


async def run_case(work: Path, main_page_size: int, *, warmup_min: int, seconds: float) -> dict[str, Any]:
    import gateway.store.database as database
    from gateway.metrics import Metrics
    from gateway.store.readings import Maintenance, Outbox

    saved = database.MAIN_PAGE_SIZE
    database.MAIN_PAGE_SIZE = main_page_size
    try:
        db = database.Database(work / "siteward.db", Metrics(), commit_interval_ms=0)
        await db.open()
    finally:
        database.MAIN_PAGE_SIZE = saved
    try:
        await Outbox(db).register("cloud")
        m = Maintenance(db, db.metrics, retention_days=30, quota_mb=100_000, quota_policy="drop_oldest")
        ack = functools.partial(db.write, lambda c: c.execute(
            "UPDATE outbox_consumers SET acked_id = (SELECT max(id) FROM readings)"))
        t0 = time.time() - 3600
        for k in range(warmup_min):
            await _minute(db, t0 + k * seconds, seconds)
            await ack()
            await m.run_once()
        await db.checkpoint("TRUNCATE")
        a = _wb()
        readings = await _minute(db, t0 + warmup_min * seconds, seconds)
        b = _wb()
        await ack()
        c = _wb()
        began = time.perf_counter()
        await m.run_once()
        took = time.perf_counter() - began
        d = _wb()
        await db.checkpoint("TRUNCATE")  # anything still in the WAL is written by the next one
        e = _wb()
        page = int((await db.fetchone("PRAGMA main.page_size"))[0])
        return {
            "main_page_size": page,
            "readings": readings,
            "ingest_bytes_per_reading": (b - a) / readings,
            "maintenance_bytes_per_reading": (d - c + e - d) / readings,
            "steady_bytes_per_reading": (b - a + e - c) / readings,
            "maintenance_s": took,
        }
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store_cycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 s 'minutes', one warm-up")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    from gateway.store.files import MAIN_PAGE_SIZE

    seconds, warmup = (10.0, 1) if args.quick else (60.0, 3)
    cases: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="siteward-store-cycle-", dir=pick_workdir_parent()))
    try:
        for name, page in (("reference_4k_pages", 4096), ("shipped", MAIN_PAGE_SIZE)):
            work = root / name
            work.mkdir()
            cases[name] = asyncio.run(run_case(work, page, warmup_min=warmup, seconds=seconds))
            if not args.json_only:
                c = cases[name]
                print(f"{name}: main pages {c['main_page_size']} B: ingest {c['ingest_bytes_per_reading']:.0f}"
                      f" + maintenance {c['maintenance_bytes_per_reading']:.0f}"
                      f" = {c['steady_bytes_per_reading']:.0f} B/reading (maintenance {c['maintenance_s']:.2f} s)",
                      file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ref, new = cases["reference_4k_pages"], cases["shipped"]
    summary = {
        "steady_bytes_per_reading": new["steady_bytes_per_reading"],
        "reference_steady_bytes_per_reading": ref["steady_bytes_per_reading"],
        "vs_reference": new["steady_bytes_per_reading"] / ref["steady_bytes_per_reading"],
        "target_bytes_per_reading": 300,
        "met": new["steady_bytes_per_reading"] <= 300,
        "cases": cases,
        "setup": {"devices": DEVICES, "metrics": len(METRICS), "msgs_per_s": RATE, "readings_per_commit":
                  BATCH * len(METRICS), "minute_s": seconds, "warmup_minutes": warmup},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
