"""Payloads on the wire: JSON, optionally zlib-compressed, and the configurable templates.

Encoding (docs/cloud-contract.md, "Payload encoding"):

* ``json``: the payload is UTF-8 JSON text (it starts with ``{``);
* ``json+zlib``: the payload is the 4 bytes ``SWZ1`` followed by a zlib stream (RFC 1950)
  of that JSON text. The magic declares the encoding inside the message itself, because
  MQTT 3.1.1 has no content-type property (with MQTT 5 it is also set as content type).

Readings are encoded on a fast path (string building from pre-encoded per-series
fragments) because a backlog drain pushes hundreds of thousands of them per second
through here; :mod:`cloud_sync.contract` describes the same format as models, and a
test checks real batches against its schema.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.settings import CloudTemplates

MAGIC_ZLIB = b"SWZ1"
ZLIB_LEVEL = 6
# room for the envelope around the readings (ids, seq, gateway id, ...), in characters
_HEADER_ALLOWANCE = 400
_SOURCES = {0: "mqtt", 1: "http", 2: "ble", 3: "sim"}
_SENTINEL = "\x00readings\x00"

# one row as the outbox reader returns it: (id, series_id, ts, value, flags, source code)
Row = tuple[int, int, float, float, int, int]


class DecodeError(ValueError):
    pass


def dumps(obj: Any) -> bytes:
    # ensure_ascii: one character is one byte, so size limits can count characters
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def pack(text: bytes, encoding: str) -> bytes:
    if encoding == "json+zlib":
        return MAGIC_ZLIB + zlib.compress(text, ZLIB_LEVEL)
    return text


def unpack(payload: bytes) -> bytes:
    """The JSON text of a payload in either encoding (what a cloud consumer does first)."""
    if payload[:4] == MAGIC_ZLIB:
        try:
            return zlib.decompress(payload[4:])
        except zlib.error as exc:
            raise DecodeError(f"bad zlib stream: {exc}") from None
    return payload


def decode(payload: bytes) -> Any:
    try:
        return json.loads(unpack(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Series:
    device: str
    metric: str
    unit: str
    # '"device":"n1","metric":"temperature","unit":"C"', encoded once per series
    fragment: str

    @classmethod
    def of(cls, device: str, metric: str, unit: str) -> Series:
        frag = (f'"device":{json.dumps(device)},"metric":{json.dumps(metric)},'
                f'"unit":{json.dumps(unit)}')
        return cls(device, metric, unit, frag)


@dataclass(frozen=True, slots=True)
class Batch:
    payload: bytes
    used: int  # rows of the input that went in (the rest did not fit)
    text_bytes: int  # JSON size before compression


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, str):
        return values[node[1:]] if node.startswith("$") and node[1:] in values else node
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


class ReadingsCodec:
    """Turns outbox rows into readings-batch payloads within the count and byte limits."""

    def __init__(self, gateway: str, *, encoding: str, max_count: int, max_bytes: int,
                 templates: CloudTemplates | None = None) -> None:
        self.gateway = gateway
        self.encoding = encoding
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._gw_json = json.dumps(gateway)
        self._reading_tpl = templates.reading if templates else None
        self._formats: dict[tuple[Series, int], str] = {}
        self._envelope_tpl = templates.readings_envelope if templates else None

    def encode(self, rows: Sequence[Row], series: dict[int, Series], *, seq: int, lane: str, first_id: int,
               last_id: int | None, attempt: int, sent_at: float) -> Batch:
        """Encode as many of ``rows`` as fit. ``last_id`` is the end of the covered range if
        every row fits; otherwise the range ends at the last row that went in."""
        budget = self.max_bytes - _HEADER_ALLOWANCE - len(self._gw_json)
        pieces: list[str] = []
        size = 0
        limit = self.max_count
        if self._reading_tpl is None:
            fmts = self._formats
            for rid, sid, ts, value, flags, src in rows:
                s = series[sid]
                fmt = fmts.get((s, src))
                if fmt is None:
                    fmt = fmts[(s, src)] = self._format(s, src)
                p = fmt % (rid, value, ts, flags)
                size += len(p) + 1
                if pieces and (size > budget or len(pieces) >= limit):
                    break
                pieces.append(p)
        else:
            for row in rows:
                p = self._piece_template(row, series[row[1]])
                size += len(p) + 1
                if pieces and (size > budget or len(pieces) >= limit):
                    break
                pieces.append(p)
        used = len(pieces)
        if used < len(rows) or last_id is None:
            last_id = rows[used - 1][0] if used else first_id
        if self._envelope_tpl is None:
            text = (
                f'{{"v":1,"type":"readings","gateway":{self._gw_json},"seq":{seq},"lane":"{lane}",'
                f'"first_id":{first_id},"last_id":{last_id},"count":{used},"sent_at":{sent_at!r},'
                f'"attempt":{attempt},"readings":[{",".join(pieces)}]}}'
            ).encode("ascii")
        else:
            values = {"v": 1, "type": "readings", "gateway": self.gateway, "seq": seq, "lane": lane,
                      "first_id": first_id, "last_id": last_id, "count": used, "sent_at": sent_at,
                      "attempt": attempt, "readings": _SENTINEL}
            shell = dumps(_fill(copy.deepcopy(self._envelope_tpl), values)).decode("ascii")
            text = shell.replace(json.dumps(_SENTINEL), "[" + ",".join(pieces) + "]", 1).encode("ascii")
        return Batch(pack(text, self.encoding), used, len(text))

    def _format(self, s: Series, src: int) -> str:
        # one %-format per (series, source): a reading costs one string formatting, the
        # device/metric/unit JSON is encoded once (the drain's hot path)
        if len(self._formats) > 100_000:  # series come and go; keep the cache bounded
            self._formats.clear()
        frag = s.fragment.replace("%", "%%")
        return '{"id":%d,' + frag + ',"value":%r,"ts":%r,"flags":%d,"source":"' + _SOURCES.get(src, "mqtt") + '"}'

    def _piece_template(self, row: Row, s: Series) -> str:
        rid, _sid, ts, value, flags, src = row
        values = {
            "key": f"{self.gateway}:{rid}", "id": rid, "gateway": self.gateway, "device": s.device,
            "metric": s.metric, "value": value, "unit": s.unit, "ts": ts, "ts_ms": round(ts * 1000),
            "ts_iso": datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z"),
            "flags": flags, "source": _SOURCES.get(src, "mqtt"),
        }
        return dumps(_fill(self._reading_tpl, values)).decode("ascii")


def encode_message(obj: dict[str, Any], encoding: str) -> bytes:
    """Every other message (events, results, health, status): plain models, same encoding."""
    return pack(dumps(obj), encoding)
