"""How the uplink is doing, for people and for Prometheus, on both sides of the process line.

* In the sync process, :class:`Figures` keeps the live figures (connected since when,
  last error, send rate, duplicates re-sent, ...), mirrored into the process's own
  Prometheus registry and written every few seconds to the ``sync_status`` row.
* In the gateway process, :func:`read_sync_view` combines that row with what only the
  store knows (backlog count and age of the oldest unsent reading, drops by policy),
  for ``GET /api/v1/sync``; :class:`GatewaySyncGauges` puts the same figures on the
  gateway's ``/metrics``. They read the store, never the sync process, so they still
  tell the truth when the sync process is down.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud_sync.outbox import OUTBOX_CONSUMER, backlog_of

RATE_WINDOW_S = 10.0
# the status row is "fresh" (the sync process alive) when younger than this many intervals
STALE_INTERVALS = 3.0
GAUGE_REFRESH_S = 2.0


class SyncMetrics:
    """The sync process's own Prometheus registry (served on ``cloud.metrics_port``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connected = Gauge("siteward_sync_connected", "1 while connected to the cloud broker", registry=r)
        self.readings_acked = Counter("siteward_sync_readings_acked", "Readings acknowledged by the cloud",
                                      registry=r)
        self.messages_acked = Counter("siteward_sync_messages_acked", "Messages acknowledged by the cloud",
                                      ["kind"], registry=r)
        self.bytes_acked = Counter("siteward_sync_bytes_acked", "Payload bytes acknowledged by the cloud",
                                   registry=r)
        self.duplicates = Gauge("siteward_sync_duplicates_resent", "Readings re-sent after faults (ever)",
                                registry=r)
        self.sessions = Counter("siteward_sync_sessions", "Connections established", registry=r)
        self.errors = Counter("siteward_sync_link_errors", "Connections lost or refused, by kind", ["kind"],
                              registry=r)
        self.inflight = Gauge("siteward_sync_inflight_messages", "Published, not yet acknowledged", registry=r)
        self.backlog = Gauge("siteward_sync_backlog_readings", "Readings not yet acknowledged", registry=r)
        self.downlink = Counter("siteward_sync_downlink", "Downlink commands, by outcome", ["outcome"], registry=r)
        self.task_restarts = Counter("siteward_sync_task_restarts", "Supervised task restarts", ["task"],
                                     registry=r)


class Figures:
    def __init__(self, metrics: SyncMetrics | None = None) -> None:
        self.metrics = metrics or SyncMetrics()
        self.started_at = time.time()
        self.connected = False
        self.connected_since: float | None = None
        self.disconnected_since: float | None = time.time()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.sessions = 0
        self.readings_acked = 0
        self.messages_acked = 0
        self.bytes_acked = 0
        self.duplicates_resent = 0
        self.last_ack_at: float | None = None
        self.backlog_count = 0
        self.backlog_oldest_ts: float | None = None
        self.inflight = 0
        self._rate: deque[tuple[float, int]] = deque()

    def link_up(self) -> None:
        self.connected = True
        self.connected_since = time.time()
        self.disconnected_since = None
        self.sessions += 1
        self.metrics.connected.set(1)
        self.metrics.sessions.inc()

    def link_down(self, kind: str, error: str | None) -> None:
        if self.connected:
            self.disconnected_since = time.time()
        self.connected = False
        self.connected_since = None
        self.metrics.connected.set(0)
        if error is not None:
            self.last_error = error
            self.last_error_at = time.time()
            self.metrics.errors.labels(kind=kind).inc()

    def acked(self, kind: str, readings: int, messages: int, nbytes: int) -> None:
        now = time.monotonic()
        self.readings_acked += readings
        self.messages_acked += messages
        self.bytes_acked += nbytes
        self.last_ack_at = time.time()
        if readings:
            self._rate.append((now, readings))
            self.metrics.readings_acked.inc(readings)
        if messages:
            self.metrics.messages_acked.labels(kind=kind).inc(messages)
            self.metrics.bytes_acked.inc(nbytes)

    def send_rate(self) -> float:
        now = time.monotonic()
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        return round(sum(n for _, n in self._rate) / RATE_WINDOW_S, 1)

    def snapshot(self) -> dict[str, Any]:
        self.metrics.duplicates.set(self.duplicates_resent)
        self.metrics.inflight.set(self.inflight)
        self.metrics.backlog.set(self.backlog_count)
        return {
            "connected": self.connected,
            "connected_since": self.connected_since,
            "disconnected_since": self.disconnected_since,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "sessions": self.sessions,
            "send_rate": self.send_rate(),
            "readings_acked": self.readings_acked,
            "messages_acked": self.messages_acked,
            "bytes_acked": self.bytes_acked,
            "duplicates_resent": self.duplicates_resent,
            "last_ack_at": self.last_ack_at,
            "inflight": self.inflight,
            "started_at": self.started_at,
        }


# -- the gateway's side -----------------------------------------------------------------------
def read_sync_view(db_path: Path, *, enabled: bool, status_interval_s: float) -> dict[str, Any]:
    """Everything ``GET /api/v1/sync`` shows; index lookups only. Runs off the event loop."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2)
    try:
        conn.execute("PRAGMA busy_timeout=2000")
        row = conn.execute("SELECT acked_id FROM outbox_consumers WHERE name = ?", (OUTBOX_CONSUMER,)).fetchone()
        base = int(row[0]) if row else 0
        acked = [(int(a), int(b)) for a, b in conn.execute(
            "SELECT first_id, last_id FROM sync_acked WHERE lane = 'readings'")]
        count, oldest = backlog_of(conn, base, acked)
        status_row = conn.execute("SELECT updated_at, data FROM sync_status WHERE id = 1").fetchone()
        state = {k: int(v) for k, v in conn.execute("SELECT name, value FROM sync_state")}
        dropped = conn.execute("SELECT value FROM counters WHERE name = 'dropped_quota'").fetchone()
    finally:
        conn.close()
    now = time.time()
    status: dict[str, Any] = json.loads(status_row[1]) if status_row else {}
    age = now - float(status_row[0]) if status_row else None
    running = age is not None and age < max(STALE_INTERVALS * status_interval_s, 10.0)
    dropped_total = int(dropped[0]) if dropped else 0
    return {
        "enabled": enabled,
        "process": {"running": running, "status_age_s": round(age, 1) if age is not None else None,
                    "started_at": status.get("started_at"), "pid": status.get("pid")},
        # a stale row must not claim a live connection
        "connected": bool(status.get("connected")) and running,
        "connected_since": status.get("connected_since") if running else None,
        "disconnected_since": status.get("disconnected_since"),
        "last_error": status.get("last_error"),
        "last_error_at": status.get("last_error_at"),
        "backlog": {"count": count, "oldest_ts": oldest,
                    "oldest_age_s": round(now - oldest, 1) if oldest is not None else None},
        "watermark": base,
        "send_rate": status.get("send_rate", 0.0) if running else 0.0,
        "readings_acked": status.get("readings_acked", 0),
        "duplicates_resent": state.get("dups.resent", status.get("duplicates_resent", 0)),
        "dropped_by_policy": dropped_total,
        "dropped_reported": state.get("drops.reported", 0),
        "sessions": status.get("sessions", 0),
    }


class GatewaySyncGauges:
    """The sync figures on the gateway's /metrics, refreshed from the store every 2 s.

    Off the event loop (a thread reads the store) and independent of the sync process:
    a dead sync process shows as ``siteward_sync_process_up 0`` with the backlog growing.
    """

    def __init__(self, db_path: Path, registry: CollectorRegistry, *, status_interval_s: float) -> None:
        self._path = db_path
        self._interval = status_interval_s
        self.view: dict[str, Any] | None = None
        self.error: str | None = None
        g = {
            "up": Gauge("siteward_sync_process_up", "1 while the sync process reports in", registry=registry),
            "connected": Gauge("siteward_sync_connected", "1 while the uplink is connected", registry=registry),
            "backlog": Gauge("siteward_sync_backlog_readings", "Readings not yet acknowledged by the cloud",
                             registry=registry),
            "age": Gauge("siteward_sync_backlog_oldest_age_seconds", "Age of the oldest unsent reading",
                         registry=registry),
            "rate": Gauge("siteward_sync_send_rate", "Readings acknowledged per second (10 s window)",
                          registry=registry),
            "dups": Gauge("siteward_sync_duplicates_resent", "Readings re-sent after faults (ever)",
                          registry=registry),
            "dropped": Gauge("siteward_sync_dropped_by_policy", "Readings dropped by the store quota (ever)",
                             registry=registry),
            "unreported": Gauge("siteward_sync_drops_unreported", "Quota drops not yet reported to the cloud",
                                registry=registry),
        }
        self._g = g

    async def refresh(self) -> dict[str, Any]:
        v = await asyncio.to_thread(read_sync_view, self._path, enabled=True, status_interval_s=self._interval)
        g = self._g
        g["up"].set(1 if v["process"]["running"] else 0)
        g["connected"].set(1 if v["connected"] else 0)
        g["backlog"].set(v["backlog"]["count"])
        g["age"].set(v["backlog"]["oldest_age_s"] or 0)
        g["rate"].set(v["send_rate"])
        g["dups"].set(v["duplicates_resent"])
        g["dropped"].set(v["dropped_by_policy"])
        g["unreported"].set(max(0, v["dropped_by_policy"] - v["dropped_reported"]))
        self.view = v
        return v

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
                self.error = None
            except sqlite3.Error as exc:  # e.g. the file is being migrated; next round
                self.error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(GAUGE_REFRESH_S)

    def probe(self) -> dict[str, Any]:
        v = self.view
        if v is None:
            return {"ok": self.error is None, "note": "no figures yet", "error": self.error}
        return {"ok": bool(v["process"]["running"]), "process_running": v["process"]["running"],
                "connected": v["connected"], "backlog": v["backlog"]["count"], "last_error": v["last_error"],
                "error": self.error}
