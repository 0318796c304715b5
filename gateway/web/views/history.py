"""History for people: chart series downsampled on the server, device events, CSV export.

A week of 1 Hz data is 604,800 readings, over 10 MB as JSON: too much for a phone on
site Wi-Fi and for its CPU to draw. ``/series`` asks SQLite for min/max/avg per time
bucket (``ReadingsQuery.downsample``), so the answer is a few hundred buckets whatever
the range, and the chart still shows every spike (min/max band) and the trend (avg).

The CSV export is streamed: rows go from a private read-only SQLite cursor to the socket
a chunk at a time, series by series in time order, so a month of data
from many devices never sits in memory, and a slow download only slows itself.
"""

from __future__ import annotations

import csv
import io
import math
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.models import DEVICE_ID_PATTERN, METRIC_PATTERN, Event, MetricName
from gateway.store.readings import SERIES_ASC_SQL
from gateway.web.access import requires
from gateway.web.bodies import dumps, parse_query
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY
from gateway.web.openapi import described
from gateway.web.timeparams import Timestamp
from gateway.web.views.devices import find_device

routes = web.RouteTableDef()

DEFAULT_SPAN_S = 3600.0
MAX_POINTS = 2000
EXPORT_CHUNK_ROWS = 2000
DEV_PARAM = (("device_id", {"type": "string", "maxLength": 64}),)


class SeriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: MetricName
    # default: the hour up to now
    since: Timestamp | None = None
    until: Timestamp | None = None
    # how many buckets at most: about the chart's width in pixels
    points: int = Field(default=600, ge=10, le=MAX_POINTS)

    @model_validator(mode="after")
    def _ordered(self) -> SeriesQuery:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self


class Series(BaseModel):
    """Columns of equal length, one entry per non-empty bucket, oldest first; ``t`` is the
    middle of the bucket (``bucket_s`` wide). A bucket with one reading has min = max = avg."""

    device: str
    metric: str
    unit: str
    since: float
    until: float
    bucket_s: float
    # readings the buckets summarise (raw rows in the range)
    readings: int
    t: list[float]
    min: list[float]
    max: list[float]
    avg: list[float]
    n: list[int]


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str | None = Field(default=None, max_length=64)
    since: Timestamp | None = None
    limit: int = Field(default=50, ge=1, le=500)


class EventList(BaseModel):
    device: str
    events: list[Event]


_LIST_OF = r"^{item}(,{item})*$"


class ExportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # comma-separated device ids (what a form or a script sends); none: every device
    devices: str | None = Field(default=None, max_length=66_000,
                                pattern=_LIST_OF.format(item=DEVICE_ID_PATTERN.strip("^$")))
    # comma-separated metric names; none: every metric
    metrics: str | None = Field(default=None, max_length=13_000,
                                pattern=_LIST_OF.format(item=METRIC_PATTERN.strip("^$")))
    # default: the last 24 hours
    since: Timestamp | None = None
    until: Timestamp | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ExportQuery:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be later than until")
        return self

    @property
    def device_list(self) -> list[str]:
        return self.devices.split(",") if self.devices else []

    @property
    def metric_list(self) -> list[str]:
        return self.metrics.split(",") if self.metrics else []


def _round(v: float) -> float:
    # 6 significant digits: beyond any sensor's resolution, and a third of the bytes of repr()
    if v == 0 or not math.isfinite(v):
        return 0.0
    return round(v, max(0, 5 - math.floor(math.log10(abs(v)))))


@routes.get("/api/v1/devices/{device_id}/series")
@requires("devices.read")
@described("A metric's history for a chart: min/max/avg per time bucket, computed in SQL",
           query=SeriesQuery, response=Series, path_params=DEV_PARAM)
async def series(request: web.Request) -> web.StreamResponse:
    q = parse_query(request, SeriesQuery)
    dev = await find_device(request)
    gw = request.app[GATEWAY]
    until = q.until if q.until is not None else time.time()
    since = q.since if q.since is not None else until - DEFAULT_SPAN_S
    if since >= until:
        raise ApiError(400, "invalid_query", [{"field": "since", "problem": "must be earlier than until"}])
    found = await gw.readings.series_of(dev.id, q.metric)
    if found is None:
        raise not_found("this device has no such metric")
    series_id, unit = found
    rows = await gw.readings.downsample(series_id, since, until, q.points)
    body = Series(
        device=dev.id, metric=q.metric, unit=unit, since=since, until=until,
        bucket_s=(until - since) / q.points, readings=sum(r[5] for r in rows),
        t=[round(r[1], 1) for r in rows], min=[_round(r[2]) for r in rows], max=[_round(r[3]) for r in rows],
        avg=[_round(r[4]) for r in rows], n=[int(r[5]) for r in rows],
    )
    resp = web.Response(text=dumps(body.model_dump()), content_type="application/json")
    # a week's series is ~40 kB of digits: gzip takes it to a third on slow site Wi-Fi
    resp.enable_compression()
    return resp


@routes.get("/api/v1/devices/{device_id}/events")
@requires("devices.read")
@described("A device's events (online/offline, commands, OTA, alerts), newest first",
           query=EventsQuery, response=EventList, path_params=DEV_PARAM)
async def device_events(request: web.Request) -> web.Response:
    q = parse_query(request, EventsQuery)
    dev = await find_device(request)
    events = await request.app[GATEWAY].events.query(device=dev.id, kind=q.kind, since=q.since, limit=q.limit)
    body = EventList(device=dev.id, events=events)
    return web.Response(text=dumps(body.model_dump(mode="json")), content_type="application/json")


EXPORT_COLUMNS = ("time_utc", "ts", "device", "metric", "value", "unit", "flags")
# a spreadsheet would run a cell starting with one of these as a formula
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text


async def _export_series(gw: Any, q: ExportQuery) -> list[tuple[int, str, str, str]]:
    return await gw.readings.series_list(q.device_list, q.metric_list)


@routes.get("/api/v1/export.csv")
@requires("devices.read")
@described("Readings as CSV, streamed: grouped by device and metric, each in time order",
           query=ExportQuery, produces="text/csv")
async def export_csv(request: web.Request) -> web.StreamResponse:
    q = parse_query(request, ExportQuery)
    gw = request.app[GATEWAY]
    until = q.until if q.until is not None else time.time()
    since = q.since if q.since is not None else until - 86400.0
    series_list = await _export_series(gw, q)
    stamp = datetime.fromtimestamp(since, UTC).strftime("%Y%m%d")
    resp = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="siteward-{gw.settings.gateway.id}-{stamp}.csv"',
    })
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    out.writerow(EXPORT_COLUMNS)
    async with gw.db.read_connection() as conn:
        for series_id, device, metric, unit in series_list:
            unit_cell = _cell(unit)
            async with conn.execute(SERIES_ASC_SQL, {"sid": series_id, "since": since, "until": until}) as cur:
                while rows := await cur.fetchmany(EXPORT_CHUNK_ROWS):
                    for ts, value, flags in rows:
                        iso = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
                        out.writerow((iso.replace("+00:00", "Z"), f"{ts:.3f}", device, metric, repr(value),
                                      unit_cell, flags))
                    # one chunk at a time: write() waits while the client is slower than SQLite
                    await resp.write(buf.getvalue().encode())
                    buf.seek(0)
                    buf.truncate()
    if buf.tell():
        await resp.write(buf.getvalue().encode())
    await resp.write_eof()
    return resp
