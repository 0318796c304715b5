"""Device page benchmark: a week of 1 Hz readings (604,800) drawn in headless Chromium.

    python -m bench.ui [--runs 5] [--keep]

Measures, against a real gateway on a temporary SQLite file:

* ``first_paint_ms``: first contentful paint of the device page (the server renders the live
  values into the HTML, so the first paint is the meaningful one);
* ``chart_7d_ms``: from the page asking for the 7-day series to uPlot having drawn it
  (``performance.measure`` between the marks static/js/device.js sets), median of ``--runs``;
  the same with Chromium's CPU slowed 4x, as a stand-in for a phone (``phone_chart_7d_ms``);
* ``chart_7d_bytes``: bytes on the wire for that series (Resource Timing ``transferSize``);
* ``api_ms``: ``GET /api/v1/devices/{id}/series`` for the same range from a plain HTTP client;
* ``sql_ms``: the reference, measured in the same run on the same file: the very downsampling
  statement the API runs (``gateway.store.readings.DOWNSAMPLE_SQL``), straight through sqlite3,
  without HTTP, authentication or JSON. ``api_vs_sql`` is their ratio.

Targets (issue 5): chart drawn <= 1 s, payload <= 200 kB, API <= 3x the raw query.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PASSWORD = "bench password 123"
DEVICE = "bench-1"
METRIC = "temperature"
WEEK_S = 7 * 86400
TARGETS = {"chart_7d_ms": 1000.0, "chart_7d_bytes": 200_000, "api_vs_sql": 3.0}


class Gateway:
    """The gateway on its own event loop in a thread; the browser is driven from this one."""

    def __init__(self, data_dir: Path) -> None:
        from gateway.settings import load_settings

        self.settings = load_settings(
            None, gateway={"data_dir": str(data_dir), "id": "gw-bench"}, broker={"port": 0, "host": "127.0.0.1"},
            web={"port": 0, "host": "127.0.0.1", "admin_password": PASSWORD},
            store={"maintenance_interval_s": 86400}, time={"source": "assume_synced"},
            logging={"level": "warning", "format": "console"})
        self.gw: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        from gateway.app import Gateway as Gw

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Gw(self.settings) as gw:
            self.gw = gw
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Gateway:
        self._thread.start()
        if not self._ready.wait(60):
            raise SystemExit("the gateway did not start")
        return self

    def __exit__(self, *_a: object) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def run(self, coro: Any, timeout: float = 600) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gw.web_port}"


def load_week(g: Gateway, now: float) -> int:
    from gateway.models import DeviceState, Reading

    async def fill() -> int:
        gw = g.gw
        await gw.registry.ensure(DEVICE, profile="native", state=DeviceState.ADOPTED)
        start = now - WEEK_S
        batch = 50_000
        for first in range(0, WEEK_S, batch):
            rows = [Reading(device=DEVICE, metric=METRIC, unit="°C", ts=start + i,
                            value=round(20 + 5 * math.sin(i / 8640) + 0.3 * math.sin(i / 7.0), 3))
                    for i in range(first, min(first + batch, WEEK_S))]
            await gw.db.add_readings(rows)
        # as on a gateway that has run for a week: readings merged into the clustered history
        await gw.maintenance.merge()
        return int(await gw.readings.count(DEVICE))

    return int(g.run(fill()))


def login_cookie(base: str) -> str:
    req = urllib.request.Request(base + "/api/v1/login", data=json.dumps({"username": "admin", "password": PASSWORD})
                                 .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req) as r:
        for header in r.headers.get_all("Set-Cookie"):
            name, _, rest = header.partition("=")
            if name == "siteward_session":
                return rest.split(";", 1)[0]
    raise SystemExit("login failed")


def browser_figures(base: str, cookie: str, runs: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        for label, viewport, throttle in (("laptop", {"width": 1280, "height": 800}, 1),
                                          ("phone", {"width": 360, "height": 740}, 4)):
            context = browser.new_context(viewport=viewport)
            context.add_cookies([{"name": "siteward_session", "value": cookie, "url": base, "httpOnly": True,
                                  "sameSite": "Strict"}])
            page = context.new_page()
            if throttle > 1:
                cdp = context.new_cdp_session(page)
                cdp.send("Emulation.setCPUThrottlingRate", {"rate": throttle})
            paints, charts, sizes, points = [], [], [], []
            foreign: list[str] = []

            def note(request: Any, seen: list[str] = foreign) -> None:
                if not request.url.startswith(base):
                    seen.append(request.url)

            page.on("request", note)
            for _ in range(runs):
                page.goto(f"{base}/devices/{DEVICE}?metric={METRIC}&range=7d")
                page.wait_for_selector('#chart[data-state="drawn"]', timeout=60_000)
                fig = page.evaluate("""() => {
                    const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                    const m = performance.measure('chart', 'chart-request', 'chart-drawn');
                    const res = performance.getEntriesByType('resource').filter(e => e.name.includes('/series?')).pop();
                    return {fcp: fcp ? fcp.startTime : null, chart: m.duration,
                            bytes: res ? res.transferSize : null, body: res ? res.decodedBodySize : null,
                            points: +document.querySelector('#chart').dataset.points};
                }""")
                paints.append(fig["fcp"])
                charts.append(fig["chart"])
                sizes.append(fig["bytes"])
                points.append(fig["points"])
                out.setdefault(f"{label}_series_body_bytes", fig["body"])
            out[f"{label}_first_paint_ms"] = round(statistics.median(paints), 1)
            out[f"{label}_chart_7d_ms"] = round(statistics.median(charts), 1)
            out[f"{label}_chart_7d_bytes"] = int(statistics.median(sizes))
            out[f"{label}_points"] = int(statistics.median(points))
            out[f"{label}_foreign_requests"] = len(foreign)
            context.close()
        browser.close()
    return out


def api_vs_sql(g: Gateway, cookie: str, now: float, runs: int, points: int) -> tuple[float, float]:
    from gateway.store.files import attach_statement
    from gateway.store.readings import DOWNSAMPLE_SQL, downsample_params

    since, until = now - WEEK_S, now
    url = f"{g.base}/api/v1/devices/{DEVICE}/series?metric={METRIC}&since={since:.3f}&until={until:.3f}&points={points}"
    sid = g.run(g.gw.readings.series_of(DEVICE, METRIC))[0]
    conn = sqlite3.connect(f"file:{g.settings.db_path}?mode=ro", uri=True)
    conn.execute(*attach_statement(g.settings.db_path, readonly=True))  # as the gateway's readers do
    api, sql = [], []
    try:
        for _ in range(runs):  # interleaved, so that drift on a shared machine hits both alike
            req = urllib.request.Request(url, headers={"Cookie": f"siteward_session={cookie}",
                                                       "Accept-Encoding": "gzip"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req) as r:
                r.read()
            api.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            conn.execute(DOWNSAMPLE_SQL, downsample_params(sid, since, until, points)).fetchall()
            sql.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return statistics.median(api), statistics.median(sql)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="siteward-bench-ui-"))
    try:
        with Gateway(tmp) as g:
            now = time.time()
            t0 = time.perf_counter()
            n = load_week(g, now)
            print(f"loaded {n:,} readings ({DEVICE}/{METRIC}, 1 Hz over 7 days) in {time.perf_counter() - t0:.1f} s")
            cookie = login_cookie(g.base)
            b = browser_figures(g.base, cookie, args.runs)
            api_ms, sql_ms = api_vs_sql(g, cookie, now, max(7, args.runs), b["laptop_points"] or 1000)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "readings": n,
        "first_paint_ms": b["laptop_first_paint_ms"],
        "chart_7d_ms": b["laptop_chart_7d_ms"],
        "chart_7d_bytes": b["laptop_chart_7d_bytes"],
        "chart_7d_points": b["laptop_points"],
        "series_body_bytes": b["laptop_series_body_bytes"],
        "phone_first_paint_ms": b["phone_first_paint_ms"],
        "phone_chart_7d_ms": b["phone_chart_7d_ms"],
        "phone_chart_7d_bytes": b["phone_chart_7d_bytes"],
        "api_ms": round(api_ms, 1),
        "sql_ms": round(sql_ms, 1),
        "api_vs_sql": round(api_ms / sql_ms, 2) if sql_ms else None,
        "foreign_requests": b["laptop_foreign_requests"] + b["phone_foreign_requests"],
        # shared machines drift: the load while measuring, to read the figures against
        "load_1m": round(os.getloadavg()[0], 2),
    }
    met = {
        "chart_7d_ms": result["chart_7d_ms"] <= TARGETS["chart_7d_ms"],
        "chart_7d_bytes": result["chart_7d_bytes"] <= TARGETS["chart_7d_bytes"],
        "api_vs_sql": result["api_vs_sql"] is not None and result["api_vs_sql"] <= TARGETS["api_vs_sql"],
    }
    result["targets_met"] = all(met.values())
    print(f"first paint (device page)        {result['first_paint_ms']:8.1f} ms   (phone, 4x slower CPU: "
          f"{result['phone_first_paint_ms']} ms)")
    print(f"7-day chart drawn                {result['chart_7d_ms']:8.1f} ms   target <= 1000   "
          f"{'ok' if met['chart_7d_ms'] else 'MISSED'}   (phone: {result['phone_chart_7d_ms']} ms)")
    print(f"7-day series on the wire         {result['chart_7d_bytes']:8d} B    target <= 200000 "
          f"{'ok' if met['chart_7d_bytes'] else 'MISSED'}   ({result['chart_7d_points']} points, "
          f"{result['series_body_bytes']} B before gzip)")
    print(f"API (HTTP, auth, JSON)           {result['api_ms']:8.1f} ms")
    print(f"raw SQL, same statement          {result['sql_ms']:8.1f} ms   API/SQL {result['api_vs_sql']} "
          f"target <= 3  {'ok' if met['api_vs_sql'] else 'MISSED'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
