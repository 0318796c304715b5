"""Optional local webhook: alert transitions POSTed as JSON to a site's own system.

The cloud gets alerts through the sync's events lane; this is for a building management
system or a local pager on the LAN, which must hear about alerts while the internet is
down. Deliveries wait in a bounded queue (the oldest is dropped, and counted, when the
receiver is down for long), are retried ``retries`` times with exponential backoff, and
are then given up and counted. A 4xx answer other than 408/429 is not retried: sending
the same body again cannot fix it.

Body: ``{"gateway": id, "event": "alert.raised" | "alert.acknowledged" | "alert.cleared",
"alert": {...}}``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import aiohttp
import structlog

from gateway.metrics import Metrics
from gateway.rules.alerts import Alert
from gateway.rules.models import SEVERITY_RANK, WebhookConfig

log = structlog.get_logger(__name__)

_RETRY_4XX = frozenset({408, 429})


class Webhook:
    def __init__(self, cfg: WebhookConfig, gateway_id: str, metrics: Metrics) -> None:
        self.cfg = cfg
        self._gateway = gateway_id
        self._metrics = metrics
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._min_rank = SEVERITY_RANK[cfg.min_severity]
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.last_error: str | None = None

    def offer(self, transition: str, alert: Alert) -> None:
        """Queue one transition (``raised``, ``acknowledged``, ``cleared``); never blocks."""
        if SEVERITY_RANK.get(alert.severity, 0) < self._min_rank:
            return
        if len(self._queue) >= self.cfg.queue_max:
            self._queue.popleft()
            self.dropped += 1
            self._metrics.webhook_deliveries.labels(result="dropped").inc()
        self._queue.append({"gateway": self._gateway, "event": f"alert.{transition}", "sent_at": None,
                            "alert": alert.model_dump(mode="json")})
        self._wake.set()

    async def run(self) -> None:
        """The supervised webhook task."""
        headers = {k: v.get_secret_value() for k, v in self.cfg.headers.items()}
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        connector = aiohttp.TCPConnector(ssl=self.cfg.verify_tls)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector) as session:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    body = self._queue[0]
                    ok = await self._deliver(session, body)
                    self._queue.popleft()
                    self._metrics.webhook_deliveries.labels(result="ok" if ok else "failed").inc()
                    if ok:
                        self.delivered += 1
                    else:
                        self.failed += 1

    async def _deliver(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> bool:
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            body["sent_at"] = time.time()
            try:
                async with session.post(self.cfg.url, json=body) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    self.last_error = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in _RETRY_4XX:
                        break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("webhook.failed", url=self.cfg.url, transition=body["event"], alert_id=body["alert"]["id"],
                    error=self.last_error, attempts=attempt + 1)
        return False

    def health(self) -> dict[str, Any]:
        return {"queued": len(self._queue), "delivered": self.delivered, "failed": self.failed,
                "dropped": self.dropped, "last_error": self.last_error}
