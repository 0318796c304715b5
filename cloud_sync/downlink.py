"""Commands from the cloud: validate, authorise, queue for the gateway to execute.

``{prefix}/{gateway}/down/command/{id}`` carries one command (``contract.Command``).
It is accepted only when its id and JSON are valid, its device exists in this
gateway's devices table and is not ignored (or is the gateway itself, for the commands
the gateway runs: ``contract.GATEWAY_COMMANDS``, e.g. an OTA rollout), the command name
is allowed (when an allow-list is configured) and it has not expired. Accepted commands become a
``queued`` row of ``command_queue``; the *gateway* process executes them through its
normal command path (``Commander.run_queue``). Everything else becomes a ``rejected``
row (when the id is usable) so that the refusal is reported even across a restart, and
nothing is executed. The same id twice is executed once: the second copy only makes
the current state be reported again.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import structlog
from pydantic import ValidationError

from cloud_sync.config import Topics
from cloud_sync.contract import COMMAND_ID_PATTERN, GATEWAY_COMMANDS, Command
from cloud_sync.outbox import StoreReader
from cloud_sync.state import StateStore
from gateway.logs import BurstLogger

log = structlog.get_logger(__name__)

_ID = re.compile(COMMAND_ID_PATTERN)
MAX_JSON_DEPTH = 8


class Rejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _depth(node: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(node, dict):
        return max([_depth(v, level + 1) for v in node.values()], default=level + 1)
    if isinstance(node, list):
        return max([_depth(v, level + 1) for v in node], default=level + 1)
    return level


def parse_command(topic_id: str, payload: bytes, *, max_bytes: int) -> Command:
    """Validate one downlink payload; raises :class:`Rejected` with a stable code."""
    if len(payload) > max_bytes:
        raise Rejected("invalid", f"payload is larger than {max_bytes} bytes")
    try:
        data = json.loads(payload, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Rejected("invalid", "payload is not valid JSON") from None
    if not isinstance(data, dict):
        raise Rejected("invalid", "payload must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise Rejected("invalid", f"payload nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        cmd = Command.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        raise Rejected("invalid", problems[:500]) from None
    if cmd.id is not None and cmd.id != topic_id:
        raise Rejected("invalid", "id in the payload differs from the id in the topic")
    return cmd


class Downlink:
    def __init__(self, topics: Topics, reader: StoreReader, state: StateStore, *, gateway: str, max_bytes: int,
                 allowed_commands: list[str] | None) -> None:
        self.topics = topics
        self.gateway = gateway
        self.reader = reader
        self.state = state
        self.max_bytes = max_bytes
        self.allowed = set(allowed_commands) if allowed_commands is not None else None
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self._burst = BurstLogger(log)

    async def handle(self, topic: str, payload: bytes) -> tuple[str | None, str]:
        """Process one downlink message; returns (command id, state written)."""
        qid = self.topics.command_id_of(topic)
        if qid is None or not _ID.fullmatch(qid):
            # nothing usable to key a row on: refused, logged, answered by nobody
            self.rejected += 1
            self._burst.warning("bad_topic", "sync.downlink_rejected", code="invalid", topic=topic[:200],
                                reason="topic carries no usable command id")
            return None, "rejected"
        row: dict[str, Any] = {"id": qid}
        try:
            cmd = parse_command(qid, payload, max_bytes=self.max_bytes)
            row.update(device=cmd.device, command=cmd.command, args=cmd.args, expect=cmd.expect,
                       timeout_s=cmd.timeout_s, expires_at=cmd.expires_at)
            await self._authorise(cmd)
            row["state"] = "queued"
        except Rejected as r:
            row.update(state="rejected", error={"code": r.code, "message": r.message})
        inserted, state = await self.state.queue_command(row)
        if not inserted:
            self.duplicates += 1
            log.info("sync.downlink_duplicate", id=qid, state=state)
        elif state == "rejected":
            self.rejected += 1
            self._burst.warning(row["error"]["code"], "sync.downlink_rejected", id=qid, **row["error"])
        else:
            self.accepted += 1
            log.info("sync.downlink_queued", id=qid, device=row["device"], command=row["command"])
        return qid, state

    async def _authorise(self, cmd: Command) -> None:
        if self.allowed is not None and cmd.command not in self.allowed:
            raise Rejected("not_allowed", f"command {cmd.command!r} is not allowed from the cloud on this gateway")
        if cmd.expires_at is not None and cmd.expires_at < time.time():
            raise Rejected("expired", "the command expired before it arrived")
        if cmd.device == self.gateway:
            # the gateway itself is no row of the devices table; it runs only its own commands
            if cmd.command not in GATEWAY_COMMANDS:
                raise Rejected("not_allowed", f"the gateway itself runs only {', '.join(sorted(GATEWAY_COMMANDS))}")
            return
        state = await self.reader.device_state(cmd.device)
        if state is None:
            raise Rejected("unknown_device", f"device {cmd.device!r} does not belong to this gateway")
        if state == "ignored":
            raise Rejected("device_ignored", f"device {cmd.device!r} is ignored on this gateway")
