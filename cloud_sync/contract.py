"""The cloud contract as pydantic models: one per message, the source of docs/schemas/.

Up (gateway → cloud): ``readings`` batches, ``events`` batches, retained ``health``,
retained ``status`` (also the LWT), ``command_result``. Down (cloud → gateway):
``command``. The encoder (``cloud_sync.codec``) writes readings on a fast path without
building these models; a test validates real messages against the generated schemas,
so the two cannot drift apart. ``python -m cloud_sync.contract docs/schemas`` rewrites
the schema files.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.models import DEVICE_ID_PATTERN, Source

CONTRACT_VERSION = 1
COMMAND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# Content types (MQTT 5 carries them as a property; 3.1.1 has only the payload itself)
CONTENT_JSON = "application/json"
CONTENT_JSON_ZLIB = "application/vnd.siteward.json+zlib"


class _Up(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(description="contract version")
    gateway: str = Field(description="gateway id; first half of every idempotency key")


class Lane(StrEnum):
    LIVE = "live"
    BACKLOG = "backlog"


class ReadingItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=1, description="reading id; key = gateway + ':' + id")
    device: str
    metric: str
    unit: str
    value: float
    ts: float = Field(description="original timestamp, unix seconds (UTC)")
    flags: int = Field(ge=0, description="1 clock unsynchronised, 2 node timestamp replaced, 4 corrected, "
                                         "8 node timestamp")
    source: Source


class ReadingsBatch(_Up):
    """Topic {prefix}/{gateway}/up/readings: a batch of readings, oldest first per lane."""

    type: Literal["readings"]
    seq: int = Field(ge=1, description="message sequence of this gateway; increases, gaps allowed")
    lane: Lane
    first_id: int = Field(ge=1, description="first id of the id range this batch covers")
    last_id: int = Field(ge=1, description="last id of the id range this batch covers")
    count: int = Field(ge=0)
    sent_at: float
    attempt: int = Field(ge=1, description="2+ when re-sent after a fault (possible duplicate)")
    readings: list[ReadingItem]


class EventItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(description="event id in the gateway's store; null for events the sync makes")
    key: str = Field(description="idempotency key")
    ts: float
    device: str | None
    kind: str
    data: dict[str, Any]


class EventsBatch(_Up):
    """Topic {prefix}/{gateway}/up/events: events in store order (alerts, online/offline, commands, ...)."""

    type: Literal["events"]
    seq: int = Field(ge=1)
    sent_at: float
    attempt: int = Field(ge=1)
    events: list[EventItem]


class Backlog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=0, description="readings not yet acknowledged by the cloud")
    oldest_ts: float | None = Field(description="timestamp of the oldest of them")


class Health(_Up):
    """Topic {prefix}/{gateway}/up/health, retained: the gateway's health, at connect and every minute."""

    type: Literal["health"]
    ts: float
    version: str
    uptime_s: float = Field(description="of the sync process")
    connected_since: float | None
    backlog: Backlog
    send_rate: float = Field(description="readings acknowledged per second, last minute")
    dropped_by_policy: int = Field(ge=0, description="readings the store quota dropped, ever")
    duplicates_resent: int = Field(ge=0, description="readings re-sent after faults, ever")
    devices: dict[str, int] = Field(description="total / online / discovered / ignored")
    db_bytes: int = Field(ge=0)


class Status(_Up):
    """Topic {prefix}/{gateway}/up/status, retained: online at connect; offline at a clean stop and as the will."""

    type: Literal["status"]
    state: Literal["online", "offline"]
    ts: float | None = Field(description="null in the will: the broker sends it, not the gateway")
    reason: str | None = None


class CommandStatus(StrEnum):
    QUEUED = "queued"
    REJECTED = "rejected"
    SENT = "sent"
    CONFIRMED = "confirmed"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


class CommandError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: Literal["invalid", "unknown_device", "device_ignored", "not_allowed", "expired", "not_sent"] = Field(
        description="invalid: malformed; unknown_device / device_ignored / not_allowed: not authorised here; "
                    "expired: arrived after expires_at; not_sent: the gateway could not send it")
    message: str


class CommandResult(_Up):
    """Topic {prefix}/{gateway}/up/command_result: each state of a command that came from the cloud."""

    type: Literal["command_result"]
    id: str | None = Field(description="the cloud's command id (null if the topic carried no usable id)")
    status: CommandStatus
    ts: float
    device: str | None = None
    command_id: str | None = Field(default=None, description="the gateway's own id for the command")
    result: dict[str, Any] | None = Field(default=None, description="what the device answered, if anything")
    error: CommandError | None = None


# commands addressed to the gateway itself ("device" = the gateway's id) rather than to a node
OTA_ROLLOUT_COMMAND = "ota_rollout"
GATEWAY_COMMANDS = frozenset({OTA_ROLLOUT_COMMAND})


class Command(BaseModel):
    """Topic {prefix}/{gateway}/down/command/{id} (cloud to gateway): one command for one device."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=COMMAND_ID_PATTERN,
                           description="optional; must equal the id in the topic when given")
    device: str = Field(pattern=DEVICE_ID_PATTERN)
    command: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    args: dict[str, Any] = Field(default_factory=dict)
    expect: dict[str, Any] | None = Field(default=None, description="status fields that confirm it")
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    expires_at: float | None = Field(default=None, description="unix seconds; refused when it arrives later")


SCHEMAS: dict[str, type[BaseModel]] = {
    "readings": ReadingsBatch,
    "events": EventsBatch,
    "health": Health,
    "status": Status,
    "command_result": CommandResult,
    "command": Command,
}


def json_schema(name: str) -> dict[str, Any]:
    schema = SCHEMAS[name].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://siteward.invalid/schemas/{name}.json"
    return schema


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SCHEMAS:
        p = directory / f"{name}.json"
        p.write_text(json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        out.append(p)
    return out


if __name__ == "__main__":
    for path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(path)
