"""Mint per-device MQTT credentials into a Siteward data dir, with Siteward's own code.

    python -m bench.mint DATA_DIR COUNT [--prefix bench-]

Prints one JSON object on stdout: ``creds`` (a list of [device id, username,
password]) and ``commit_interval_ms`` (the store's default in this code). bench.ingest
runs it through ``bench.isolated`` from the source snapshot under test, so the
credentials are written by the same code revision the gateway then runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


async def mint(data: Path, count: int, prefix: str) -> list[tuple[str, str, str]]:
    from gateway.devices.credentials import Credentials
    from gateway.metrics import Metrics
    from gateway.store.database import Database

    db = Database(data / "siteward.db", Metrics())
    await db.open()
    try:
        creds = Credentials(db)
        await creds.load()
        ids = [f"{prefix}{i:03d}" for i in range(count)]
        passwords = await asyncio.gather(*(creds.mint(d) for d in ids))
        # client id = username = device id: the ACL ties the session to the device
        return [(d, d, p) for d, p in zip(ids, passwords, strict=True)]
    finally:
        await db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("count", type=int)
    ap.add_argument("--prefix", default="bench-")
    args = ap.parse_args()
    import structlog

    # the store logs its migration at INFO; stdout must carry only the JSON
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from gateway.settings import StoreSection

    args.data_dir.mkdir(parents=True, exist_ok=True)
    creds = asyncio.run(mint(args.data_dir, args.count, args.prefix))
    print(json.dumps({"creds": creds, "commit_interval_ms": StoreSection().commit_interval_ms}))


if __name__ == "__main__":
    main()
