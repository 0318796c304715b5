"""USB flash jobs started from the web UI: esptool in a subprocess, progress on the live bus.

One job per serial port at a time; each job is a task owned here (cancelled at stop, its
esptool process killed). Progress and the outcome go to the live bus as
``{"type": "flash", "job": ..., "state": ..., "stage": ..., "progress": ...}`` so the
technician's page shows a progress bar; the outcome is also an event and in the audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from firmware.tools import flash as fl

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

MAX_JOBS_KEPT = 50


@dataclass
class FlashJob:
    id: str
    port: str
    firmware: str
    erase: bool
    actor: str
    state: str = "queued"  # queued | running | done | failed
    stage: str | None = None
    progress: float | None = None
    error: str | None = None
    message: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None


class FlashJobs:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.jobs: dict[str, FlashJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        gw.on_stop(self.stop)

    def busy(self, port: str) -> FlashJob | None:
        return next((j for j in self.jobs.values() if j.port == port and j.state in ("queued", "running")), None)

    def start(self, *, port: str, path: Path, firmware: str, erase: bool, actor: str) -> FlashJob:
        job = FlashJob(id="f-" + secrets.token_hex(5), port=port, firmware=firmware, erase=erase, actor=actor,
                       started_at=time.time())
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest].state in ("queued", "running"):
                break
            del self.jobs[oldest]
        self._tasks[job.id] = asyncio.create_task(self._run(job, path), name=f"flash:{job.id}")
        return job

    async def _run(self, job: FlashJob, path: Path) -> None:
        def progress(stage: str, pct: float | None) -> None:
            job.stage = stage
            if pct is not None:
                job.progress = pct
            self._publish(job)

        job.state = "running"
        self._publish(job)
        cfg = self.gw.settings.ota
        try:
            await fl.flash(job.port, path, erase=job.erase, esptool=cfg.esptool, on_progress=progress)
            job.state, job.progress, job.message = "done", 100.0, "flashed and verified"
        except fl.FlashError as exc:
            job.state, job.error, job.message = "failed", exc.code, exc.message
        except asyncio.CancelledError:
            job.state, job.error, job.message = "failed", "cancelled", "the gateway stopped during flashing"
            raise
        except Exception as exc:  # a job must always end in a state the UI can show
            log.exception("flash.crashed", job=job.id)
            job.state, job.error, job.message = "failed", "internal", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()
            self._publish(job)
            self._tasks.pop(job.id, None)
            with contextlib.suppress(Exception):
                await self.gw.events.record("ota.flash", None, {"job": job.id, "port": job.port,
                                                                "state": job.state, "error": job.error})

    def _publish(self, job: FlashJob) -> None:
        self.gw.bus.publish({"type": "flash", **self.as_dict(job)})

    @staticmethod
    def as_dict(job: FlashJob) -> dict[str, Any]:
        d = asdict(job)
        d["job"] = d.pop("id")
        return d

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def list_ports() -> list[dict[str, Any]]:
    """Serial ports the gateway sees (USB-serial adapters of ESP32 boards)."""
    from serial.tools import list_ports as lp

    return [{"port": p.device, "description": p.description, "vid": p.vid, "pid": p.pid, "serial": p.serial_number}
            for p in lp.comports()]
