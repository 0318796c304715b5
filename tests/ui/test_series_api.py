"""The chart's data: min/max/avg per bucket computed in SQL, checked against the raw readings,
over merged history and the unmerged tail alike; and what the endpoint refuses."""

from __future__ import annotations

import math
import random
import time

from gateway.models import Reading
from tests.ui.conftest import UiSite


def test_buckets_match_the_raw_readings_across_history_and_tail(ui: UiSite) -> None:
    rng = random.Random(7)
    ui.mint("ser-1")
    end = time.time() - 10
    since = end - 6 * 3600
    # 6 hours, irregular (1-40 s apart), with a 40-minute gap
    ts, values = [], []
    t = since
    while t <= end:
        if not since + 7200 < t < since + 9600:
            ts.append(t)
            values.append(round(rng.uniform(-20, 40), 3))
        t += rng.uniform(1, 40)
    half = len(ts) // 2
    ui.run(ui.gw.db.add_readings([Reading(device="ser-1", metric="t", value=v, unit="°C", ts=x)
                                  for x, v in zip(ts[:half], values[:half], strict=True)]))
    ui.run(ui.gw.maintenance.merge())  # the first half in history, the rest in the unmerged tail
    ui.run(ui.gw.db.add_readings([Reading(device="ser-1", metric="t", value=v, unit="°C", ts=x)
                                  for x, v in zip(ts[half:], values[half:], strict=True)]))
    points = 90
    r = ui.call("GET", f"/api/v1/devices/ser-1/series?metric=t&since={since}&until={ts[-1]}&points={points}")
    assert r.status == 200, r
    s = r.json
    assert s["unit"] == "°C" and s["readings"] == len(ts) and sum(s["n"]) == len(ts)
    width = (ts[-1] - since) / points
    expect: dict[int, list[float]] = {}
    for x, v in zip(ts, values, strict=True):
        expect.setdefault(min(int((x - since) / width), points - 1), []).append(v)
    assert len(s["t"]) == len(expect) < points  # the gap's buckets are left out
    for i, b in enumerate(sorted(expect)):
        vs = expect[b]
        assert s["n"][i] == len(vs)
        assert math.isclose(s["min"][i], min(vs), rel_tol=1e-5) and math.isclose(s["max"][i], max(vs), rel_tol=1e-5)
        assert math.isclose(s["avg"][i], sum(vs) / len(vs), rel_tol=1e-5, abs_tol=1e-4)
        assert since + b * width <= s["t"][i] <= since + (b + 1) * width + 0.1
    assert s["t"] == sorted(s["t"])


def test_series_refusals(ui: UiSite) -> None:
    ui.mint("ser-2")
    for query, status in (("", 400), ("metric=t&points=5", 400), ("metric=t&points=5000", 400),
                          ("metric=t&since=20&until=10", 400), ("metric=t&since=soon", 400),
                          ("metric=nosuch", 404), ("metric=t&extra=1", 400)):
        r = ui.call("GET", f"/api/v1/devices/ser-2/series?{query}", role="viewer")
        assert r.status == status, (query, r)
        assert r.json["error"] in ("invalid_query", "not_found")
    assert ui.call("GET", "/api/v1/devices/nosuch/series?metric=t").status == 404
    # a device with the metric but nothing in range: an empty series, not an error
    ui.run(ui.gw.db.add_readings([Reading(device="ser-2", metric="t", value=1.0, ts=time.time() - 86400 * 3)]))
    r = ui.call("GET", "/api/v1/devices/ser-2/series?metric=t")
    assert r.status == 200 and r.json["t"] == [] and r.json["readings"] == 0


def test_device_events_api(ui: UiSite) -> None:
    ui.mint("ev-1")
    ui.call("POST", "/api/v1/devices/ev-1/ignore", role="technician")
    r = ui.call("GET", "/api/v1/devices/ev-1/events?limit=5", role="viewer")
    assert r.status == 200
    kinds = [e["kind"] for e in r.json["events"]]
    assert kinds[0] == "device.ignored"
    r = ui.call("GET", "/api/v1/devices/ev-1/events?kind=device.ignored")
    assert {e["kind"] for e in r.json["events"]} == {"device.ignored"}
    assert ui.call("GET", "/api/v1/devices/ev-1/events?limit=0").status == 400
