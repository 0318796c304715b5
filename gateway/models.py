"""The shapes that cross module boundaries: one ``Reading`` for every source.

MQTT profiles, the HTTP ingest API, BLE decoders and the simulator all produce
``Reading`` objects; the store, live bus, rules and cloud sync consume them and never
know where a reading came from.
"""

from __future__ import annotations

import math
from enum import IntFlag, StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
METRIC_PATTERN = r"^[A-Za-z][A-Za-z0-9_.]{0,63}$"

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
MetricName = Annotated[str, Field(pattern=METRIC_PATTERN)]


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("value must be a finite number")
    return v


FiniteFloat = Annotated[float, AfterValidator(_finite)]


class Source(StrEnum):
    MQTT = "mqtt"
    HTTP = "http"
    BLE = "ble"
    SIMULATOR = "sim"


class TimeFlag(IntFlag):
    """How far a reading's timestamp can be trusted (stored as an integer column)."""

    NONE = 0
    # gateway clock was not synchronised when the reading arrived
    CLOCK_UNSYNCED = 1
    # the node's own timestamp was out of bounds and replaced by the receive time
    TS_REPLACED = 2
    # taken before NTP sync; shifted afterwards by the measured clock step
    CORRECTED = 4
    # the timestamp came from the node, not the gateway's clock
    NODE_TS = 8


class Reading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: DeviceId
    metric: MetricName
    value: FiniteFloat
    unit: str = Field(default="", max_length=16)
    ts: float  # unix seconds, wall clock
    source: Source = Source.MQTT
    flags: int = 0


class StoredReading(BaseModel):
    id: int
    device: str
    metric: str
    value: float
    unit: str
    ts: float
    flags: int


class DeviceState(StrEnum):
    DISCOVERED = "discovered"
    ADOPTED = "adopted"
    IGNORED = "ignored"


class Device(BaseModel):
    id: str
    name: str | None = None
    kind: str = "node"
    profile: str | None = None
    state: DeviceState = DeviceState.DISCOVERED
    online: bool = False
    last_seen: float | None = None
    firmware: str | None = None
    location: str | None = None
    created_at: float
    attributes: dict[str, Any] = Field(default_factory=dict)

    @property
    def tags(self) -> frozenset[str]:
        """Labels a technician set (PATCH /api/v1/devices/{id}, ``attributes["tags"]``) and
        labels the node reports itself (``attributes["node_tags"]``), kept apart so that
        neither overwrites the other; each a list, or one comma-separated string. Rules and
        OTA campaigns target devices by them."""
        return _labels(self.attributes.get("tags")) | _labels(self.attributes.get(NODE_TAGS))


NODE_TAGS = "node_tags"  # where a node's own "tags" attribute is kept (Device.tags)


def _labels(raw: Any) -> frozenset[str]:
    if isinstance(raw, str):
        return frozenset(t.strip() for t in raw.split(",") if t.strip())
    if isinstance(raw, list | tuple):
        return frozenset(str(t) for t in raw)
    return frozenset()


class Event(BaseModel):
    id: int | None = None
    ts: float
    device: str | None = None
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)


class CommandState(StrEnum):
    SENT = "sent"
    CONFIRMED = "confirmed"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


class CommandRequest(BaseModel):
    """Body of ``POST /api/v1/devices/{id}/commands``."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    args: dict[str, Any] = Field(default_factory=dict)
    # the device status field that confirms it (e.g. relay == "on"); derived from the
    # command when omitted (see devices.commands)
    expect: dict[str, Any] | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class Command(BaseModel):
    id: str
    device: str
    command: str
    args: dict[str, Any]
    state: CommandState
    created_at: float
    updated_at: float
    result: dict[str, Any] | None = None
