"""``siteward sync``: run the uplink until SIGTERM/SIGINT, then stop cleanly.

Also :func:`run_sync_subprocess`, which ``siteward run`` (development) uses to start the
sync next to the gateway as a child process, the same split as production's two
systemd units, so that development exercises what production runs: a sync that can
crash, hang or be killed without touching the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

import structlog

from gateway import systemd_notify
from gateway.settings import Settings

log = structlog.get_logger(__name__)

CHILD_STOP_S = 10.0
# EX_TEMPFAIL: not an error of the sync, but it must be started again
EXIT_STORE_REPLACED = 75


async def run_sync(settings: Settings) -> None:
    from cloud_sync.service import SyncService

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    svc = SyncService(settings)
    await svc.start()
    # systemd (Type=notify, siteward-sync.service): READY once the store is open and the loops
    # run (a store that never comes fails the start after TimeoutStartSec, and systemd retries);
    # the watchdog, gated on the loops' health, starts with it
    waiting = systemd_notify.Notifier()
    waiting.status("waiting for the gateway's store")
    ready = asyncio.ensure_future(svc.ready.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    stopped.cancel()
    if stop.is_set():
        await svc.stop("shutdown")
        return
    notifier = systemd_notify.announce_ready(svc.supervisor, "syncing", waiting)
    svc.status_hook = notifier.status  # STATUS= says what the link is doing
    replaced = asyncio.Event()

    def start_over() -> None:  # on the new file: systemd (or siteward run) restarts us
        replaced.set()
        stop.set()

    svc.on_store_replaced = start_over
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        await svc.stop("store replaced" if replaced.is_set() else "shutdown")
    if replaced.is_set():
        raise SystemExit(EXIT_STORE_REPLACED)


async def run_sync_subprocess(argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run ``siteward … sync`` as a child until cancelled; an exit is an error (the
    caller's supervisor restarts it with backoff)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *argv,
                                                env={**os.environ, **(env or {})})
    log.info("sync.child_started", pid=proc.pid)
    try:
        rc = await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(CHILD_STOP_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        raise
    raise RuntimeError(f"sync process exited with status {rc}")
