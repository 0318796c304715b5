"""Commands to devices: sent → confirmed (by the device's status) → or timed out.

Owns the ``commands`` table. A command is published on the device profile's command
topic as ``{"id", "command", "args"}``. It is confirmed by a status message that
carries ``"cmd_id": id`` (Siteward nodes do), or, for devices that cannot echo ids,
by a status whose fields match what the command asked for (``expect``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.devices.registry import DeviceRegistry, UnknownDevice
from gateway.ingest.profiles import ProfileSet
from gateway.metrics import Metrics
from gateway.models import Command, CommandRequest, CommandState, DeviceState
from gateway.store.database import Database
from gateway.store.events import EventLog

log = structlog.get_logger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
# how often queued (cloud) commands are looked for: the sync process is another process
QUEUE_POLL_S = 0.25


# a command the gateway itself executes (not a node) gets this long unless the cloud says
LOCAL_TIMEOUT_S = 900.0


class CommandRefused(Exception):
    pass


class CommandFailed(Exception):
    """Raised by a local command's handler: it ran and failed; ``result`` says how."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(str(result))
        self.result = result


@dataclass(frozen=True)
class LocalCommand:
    """A cloud command addressed to the gateway itself (e.g. ``ota_rollout``): ``validate``
    turns its args into a request or raises ValueError (refused as invalid, never run);
    ``run`` executes it and returns the result, or raises :class:`CommandFailed`."""

    validate: Callable[[dict[str, Any]], Any]
    run: Callable[[Any], Awaitable[dict[str, Any]]]


def derive_expect(req: CommandRequest) -> dict[str, Any] | None:
    """What status confirms a command when the device cannot echo its id."""
    if req.expect is not None:
        return req.expect
    if req.command in ("relay", "set_relay", "switch") and "state" in req.args:
        return {"relay": req.args["state"]}
    if req.command in ("on", "off"):
        return {"relay": req.command}
    return None


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Command:
    return Command(id=r[0], device=r[1], command=r[2], args=json.loads(r[3]), state=CommandState(r[4]),
                   created_at=r[5], updated_at=r[6], result=json.loads(r[7]) if r[7] else None)


_COLS = "id, device_id, command, args, state, created_at, updated_at, result"


class Commander:
    def __init__(self, db: Database, registry: DeviceRegistry, profiles: ProfileSet, events: EventLog,
                 metrics: Metrics, publish: Publish, *, default_timeout_s: float) -> None:
        self._db = db
        self._registry = registry
        self._profiles = profiles
        self._events = events
        self._metrics = metrics
        self._publish = publish
        self._timeout = default_timeout_s
        # id -> (device, deadline, expect); commands still waiting for their confirmation
        self._pending: dict[str, tuple[str, float, dict[str, Any] | None]] = {}
        self._local: dict[tuple[str, str], LocalCommand] = {}
        self._running: set[asyncio.Task[None]] = set()

    def register_local(self, device_id: str, command: str, handler: LocalCommand) -> None:
        """Queued commands for ``device_id`` named ``command`` run ``handler`` in this process."""
        self._local[(device_id, command)] = handler

    async def load(self) -> None:
        rows = await self._db.fetchall("SELECT id, device_id, deadline, expect FROM commands WHERE state = 'sent'")
        for r in rows:
            self._pending[r[0]] = (r[1], r[2], json.loads(r[3]) if r[3] else None)

    async def send(self, device_id: str, req: CommandRequest, actor: str, *, command_id: str | None = None) -> Command:
        dev = await self._registry.get(device_id)
        if dev is None:
            raise UnknownDevice(device_id)
        if dev.state == DeviceState.IGNORED:
            raise CommandRefused(f"device {device_id} is ignored")
        cid = command_id or uuid.uuid4().hex[:16]
        expect = derive_expect(req)
        topic = self._profiles.command_topic(dev.profile, device_id)
        payload = json.dumps({"id": cid, "command": req.command, "args": req.args}, separators=(",", ":"))
        await self._record_sent(cid, device_id, req.command, json.dumps(req.args), expect,
                                req.timeout_s or self._timeout)
        try:
            await self._publish(topic, payload.encode())
        except Exception as exc:
            await self._finish(cid, CommandState.FAILED, {"error": f"publish failed: {exc}"})
            raise CommandRefused(f"could not publish command: {exc}") from exc
        await self._events.record("command.sent", device_id, {"id": cid, "command": req.command,
                                                               "args": req.args, "actor": actor})
        cmd = await self.get(cid)
        assert cmd is not None
        return cmd

    async def _record_sent(self, cid: str, device_id: str, command: str, args_json: str,
                           expect: dict[str, Any] | None, timeout_s: float) -> None:
        """The command's row, state ``sent``, and its wait for a confirmation until the deadline."""
        now = time.time()
        deadline = now + timeout_s
        await self._db.write(lambda c: c.execute(
            "INSERT INTO commands (id, device_id, command, args, expect, state, created_at, updated_at, deadline)"
            " VALUES (?, ?, ?, ?, ?, 'sent', ?, ?, ?)",
            (cid, device_id, command, args_json, json.dumps(expect) if expect else None, now, now, deadline)))
        self._pending[cid] = (device_id, deadline, expect)

    async def on_status(self, device_id: str, status: Any) -> None:
        """A device reported its state: confirm whichever of its commands it answers."""
        if not self._pending or not isinstance(status, dict):
            return
        cid = status.get("cmd_id")
        if isinstance(cid, str) and cid in self._pending and self._pending[cid][0] == device_id:
            failed = status.get("ok") is False or "error" in status
            await self._finish(cid, CommandState.FAILED if failed else CommandState.CONFIRMED, status)
            return
        for pid, (dev, _, expect) in list(self._pending.items()):
            if dev == device_id and expect and all(_same(status.get(k), v) for k, v in expect.items()):
                await self._finish(pid, CommandState.CONFIRMED, status)

    async def expire(self) -> None:
        now = time.time()
        for cid, (_dev, deadline, _) in list(self._pending.items()):
            if now > deadline:
                await self._finish(cid, CommandState.TIMED_OUT, {"error": "no confirmation before the deadline"})

    async def run_timeouts(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.expire()

    async def _finish(self, cid: str, state: CommandState, result: dict[str, Any]) -> None:
        entry = self._pending.pop(cid, None)
        if entry is None:
            return
        now = time.time()
        await self._db.write(lambda c: c.execute(
            "UPDATE commands SET state = ?, updated_at = ?, result = ? WHERE id = ?",
            (state.value, now, json.dumps(result, default=str), cid)))
        self._metrics.commands.labels(state=state.value).inc()
        await self._events.record(f"command.{state.value}", entry[0], {"id": cid, "result": result})

    async def get(self, command_id: str) -> Command | None:
        r = await self._db.fetchone(f"SELECT {_COLS} FROM commands WHERE id = ?", (command_id,))
        return _row(r) if r else None

    async def list_for(self, device_id: str, limit: int = 50) -> list[Command]:
        rows = await self._db.fetchall(
            f"SELECT {_COLS} FROM commands WHERE device_id = ? ORDER BY created_at DESC LIMIT ?",
            (device_id, limit))
        return [_row(r) for r in rows]

    # -- queued commands (from the cloud, via the sync process) --------------------------------
    # The sync process validates and authorises cloud commands and writes them into
    # ``command_queue`` (migration 2); this process executes them through ``send`` like
    # any other command. The gateway's command id is chosen and stored *before* sending,
    # so every command event already maps back to the cloud's id. A row taken but never
    # sent (crash in between) is reported as not sent rather than sent twice: for an
    # actuator, at most once is the safe side.

    async def run_queue(self, interval_s: float = QUEUE_POLL_S) -> None:
        await self._queue_recover()
        try:
            while True:
                rows = await self._db.fetchall(
                    "SELECT id, device_id, command, args, expect, timeout_s, expires_at FROM command_queue"
                    " WHERE state = 'queued' ORDER BY received_at LIMIT 20")
                for r in rows:
                    await self._run_queued(r)
                await asyncio.sleep(interval_s)
        finally:
            # a local command cut short stays 'sent' and times out after a restart (load())
            for task in list(self._running):
                task.cancel()

    async def _run_queued(self, r: sqlite3.Row) -> None:
        qid = r[0]
        cid = uuid.uuid4().hex[:16]
        now = time.time()
        taken = await self._db.write(lambda c: c.execute(
            "UPDATE command_queue SET state = 'taken', command_id = ?, updated_at = ?"
            " WHERE id = ? AND state = 'queued'", (cid, now, qid)).rowcount)
        if not taken:
            return
        if r[6] is not None and r[6] < now:
            await self._queue_reject(qid, "expired", "the command expired before the gateway could send it")
            return
        local = self._local.get((r[1], r[2]))
        if local is not None:
            await self._start_local(qid, cid, r, local)
            return
        try:
            req = CommandRequest(command=r[2], args=json.loads(r[3]), expect=json.loads(r[4]) if r[4] else None,
                                 timeout_s=r[5])
            await self.send(r[1], req, "cloud", command_id=cid)
        except UnknownDevice:
            await self._queue_reject(qid, "unknown_device", f"device {r[1]!r} does not belong to this gateway")
        except CommandRefused as exc:
            # publish failures were already recorded as command.failed under cid
            if await self.get(cid) is None:
                await self._queue_reject(qid, "device_ignored", str(exc))
        except ValueError as exc:  # validation of a row written by an older sync
            await self._queue_reject(qid, "invalid", str(exc)[:300])

    async def _start_local(self, qid: str, cid: str, r: sqlite3.Row, local: LocalCommand) -> None:
        args = json.loads(r[3])
        try:
            request = local.validate(args)
        except ValueError as exc:  # pydantic's ValidationError is one
            await self._queue_reject(qid, "invalid", str(exc)[:300])
            return
        device, command = r[1], r[2]
        await self._record_sent(cid, device, command, r[3], None, r[5] or LOCAL_TIMEOUT_S)
        await self._events.record("command.sent", device, {"id": cid, "command": command, "actor": "cloud"})
        # runs beside the queue: a long download must not hold up the commands behind it
        task = asyncio.create_task(self._run_local(cid, local, request), name=f"command.{command}.{cid}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_local(self, cid: str, local: LocalCommand, request: Any) -> None:
        try:
            result = await local.run(request)
        except CommandFailed as exc:
            await self._finish(cid, CommandState.FAILED, exc.result)
        except Exception as exc:
            log.exception("commands.local_failed", id=cid)
            await self._finish(cid, CommandState.FAILED, {"error": {"code": "internal",
                                                                    "message": f"{type(exc).__name__}: {exc}"}})
        else:
            await self._finish(cid, CommandState.CONFIRMED, result)

    async def _queue_reject(self, qid: str, code: str, message: str) -> None:
        body = json.dumps({"code": code, "message": message})
        await self._db.write(lambda c: c.execute(
            "UPDATE command_queue SET state = 'rejected', error = ?, needs_report = 1, updated_at = ? WHERE id = ?",
            (body, time.time(), qid)))
        log.info("commands.queue_rejected", id=qid, code=code)

    async def _queue_recover(self) -> None:
        rows = await self._db.fetchall(
            "SELECT q.id FROM command_queue q LEFT JOIN commands c ON c.id = q.command_id"
            " WHERE q.state = 'taken' AND c.id IS NULL")
        for (qid,) in rows:
            await self._queue_reject(qid, "not_sent", "the gateway restarted before sending it; not executed")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return bool(a == b)
