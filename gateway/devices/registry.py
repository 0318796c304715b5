"""The device registry: every device the gateway has heard of, and whether it is online.

Owns the ``devices`` table. Hot state (last seen, latest values) lives in memory and
is flushed in the background, because writing a row per message would cost the SD
card more than the readings themselves.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.bus import LiveBus
from gateway.metrics import Metrics
from gateway.models import NODE_TAGS, Device, DeviceState
from gateway.store.database import Database
from gateway.store.events import EventLog

log = structlog.get_logger(__name__)

# (device id, online, reason, wall time) of every online/offline transition
OnlineObserver = Callable[[str, bool, str, float], None]

MAX_LATEST_METRICS = 64  # per device: bounds memory if a node invents metric names


class UnknownDevice(LookupError):
    pass


def _row_to_device(r: sqlite3.Row | tuple[Any, ...]) -> Device:
    return Device(
        id=r[0], name=r[1], kind=r[2], profile=r[3], state=DeviceState(r[4]), firmware=r[5],
        location=r[6], created_at=r[7], last_seen=r[8], online=bool(r[9]), attributes=json.loads(r[10]),
    )


_COLS = "id, name, kind, profile, state, firmware, location, created_at, last_seen, online, attributes"


class DeviceRegistry:
    def __init__(self, db: Database, events: EventLog, bus: LiveBus, metrics: Metrics, *,
                 require_adoption: bool, offline_after_s: float) -> None:
        self._db = db
        self._events = events
        self._bus = bus
        self._metrics = metrics
        self.require_adoption = require_adoption
        self.offline_after_s = offline_after_s
        self._devices: dict[str, Device] = {}
        self._latest: dict[str, dict[str, dict[str, Any]]] = {}
        self._dirty_seen: set[str] = set()
        self._creating: dict[str, asyncio.Future[Device]] = {}
        self._online_observers: list[OnlineObserver] = []

    def add_observer(self, fn: OnlineObserver) -> None:
        """Call ``fn`` synchronously on every online/offline transition, as soon as memory shows it.

        For consumers that must not miss one (the rules engine): the live bus may drop
        updates for slow viewers. ``fn`` must be quick and must not block; its errors are
        logged and do not stop the transition.
        """
        self._online_observers.append(fn)

    def _notify_online(self, device_id: str, online: bool, reason: str, ts: float) -> None:
        for fn in self._online_observers:
            try:
                fn(device_id, online, reason, ts)
            except Exception:
                log.exception("registry.observer_failed", device=device_id, online=online)

    async def load(self) -> None:
        rows = await self._db.fetchall(f"SELECT {_COLS} FROM devices")
        now = time.time()
        for r in rows:
            d = _row_to_device(r)
            # after a restart nobody is connected yet: online comes back with traffic
            if d.online and (d.last_seen is None or now - d.last_seen > self.offline_after_s):
                d = d.model_copy(update={"online": False})
            self._devices[d.id] = d
        self._update_gauges()

    # -- queries --------------------------------------------------------------------------
    async def list_devices(self) -> list[Device]:
        return sorted(self._devices.values(), key=lambda d: d.id)

    async def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def get_cached(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def latest(self, device_id: str) -> dict[str, dict[str, Any]]:
        return dict(self._latest.get(device_id, {}))

    def accepts_readings(self, device: Device) -> bool:
        if device.state == DeviceState.IGNORED:
            return False
        return not (self.require_adoption and device.state == DeviceState.DISCOVERED)

    def would_accept_readings(self, device_id: str) -> bool:
        """Decided without I/O: a device not yet registered gets the default state."""
        dev = self._devices.get(device_id)
        if dev is None:
            return not self.require_adoption
        return self.accepts_readings(dev)

    # -- what ingest tells us ---------------------------------------------------------------
    async def observe(self, device_id: str, *, profile: str, kind: str = "node", via: str | None = None,
                      ts: float | None = None) -> Device:
        """A valid message from ``device_id`` arrived: register it if new, mark it seen."""
        now = time.time() if ts is None else ts
        dev = self._devices.get(device_id)
        if dev is None:
            dev = await self._create(device_id, profile=profile, kind=kind, via=via, online_at=now)
        if not dev.online:
            await self.set_online(device_id, True, "message", ts=now)
            dev = self._devices[device_id]
        else:
            dev.__dict__["last_seen"] = now  # hot path: no copy per message
            self._dirty_seen.add(device_id)
        return dev

    async def _create(self, device_id: str, *, profile: str, kind: str, via: str | None,
                      state: DeviceState | None = None, online_at: float | None = None) -> Device:
        pending = self._creating.get(device_id)
        if pending is not None:  # two messages of a new device racing: register once
            return await pending
        fut: asyncio.Future[Device] = asyncio.get_running_loop().create_future()
        self._creating[device_id] = fut
        try:
            now = time.time()
            st = state or (DeviceState.DISCOVERED if self.require_adoption else DeviceState.ADOPTED)
            attrs = {"via": via} if via else {}
            online = online_at is not None
            dev = Device(id=device_id, kind=kind, profile=profile, state=st, created_at=now,
                         attributes=attrs, online=online, last_seen=online_at)
            found = {"profile": profile, "state": st.value}
            came = {"reason": "message"}

            # one commit for the row and its events: a new device's first message waits for
            # this, and so do the messages queued behind it on the same connection. The row may
            # exist already, made by another process (`siteward device add`, provisioning).
            def insert(c: sqlite3.Connection) -> tuple[Device, int | None, int | None]:
                row = c.execute(f"SELECT {_COLS} FROM devices WHERE id = ?", (device_id,)).fetchone()
                first = None
                if row is None:
                    c.execute(
                        "INSERT INTO devices (id, kind, profile, state, created_at, attributes, online, last_seen)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (device_id, kind, profile, st.value, now, json.dumps(attrs), int(online), online_at),
                    )
                    first = EventLog.insert(c, "device.discovered", device_id, found, now)
                    made = dev
                else:
                    made = _row_to_device(row).model_copy(update={"online": online or bool(row[9]),
                                                                  "last_seen": online_at or row[8]})
                    c.execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
                              (int(made.online), made.last_seen, device_id))
                return made, first, EventLog.insert(c, "device.online", device_id, came, now) if online else None

            dev, discovered_id, online_id = await self._db.write(insert)
            self._devices[device_id] = dev
            if discovered_id is not None:
                self._events.announce(discovered_id, "device.discovered", device_id, found, now)
            self._bus.publish({"type": "device", "device": device_id, "state": dev.state.value, "online": online})
            if online_id is not None:
                assert online_at is not None
                self._notify_online(device_id, True, "message", online_at)
                self._events.announce(online_id, "device.online", device_id, came, now)
                self._update_gauges()
            fut.set_result(dev)
            return dev
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: racing waiters re-raise it themselves
            raise
        finally:
            del self._creating[device_id]

    async def ensure(self, device_id: str, *, profile: str, state: DeviceState = DeviceState.ADOPTED,
                     kind: str = "node") -> Device:
        """Make sure a device row exists (credentials minted before it ever spoke)."""
        dev = self._devices.get(device_id)
        if dev is None:
            return await self._create(device_id, profile=profile, kind=kind, via=None, state=state)
        updates: dict[str, Any] = {}
        if dev.state != state and state == DeviceState.ADOPTED:
            updates["state"] = state.value
        if dev.profile != profile:
            updates["profile"] = profile
        if updates:
            await self._persist(device_id, **updates)
            dev = self._set(device_id, **{k: (DeviceState(v) if k == "state" else v) for k, v in updates.items()})
        return dev

    def note_values(self, device_id: str, values: list[tuple[str, float, str]], ts: float) -> None:
        latest = self._latest.setdefault(device_id, {})
        for metric, value, unit in values:
            if metric not in latest and len(latest) >= MAX_LATEST_METRICS:
                continue
            latest[metric] = {"value": value, "unit": unit, "ts": ts}

    async def apply_attributes(self, device_id: str, attrs: dict[str, Any]) -> None:
        dev = self._devices.get(device_id)
        if dev is None or not attrs:
            return
        changes: dict[str, Any] = {}
        extra = dict(dev.attributes)
        for k, v in attrs.items():
            if k == "tags":  # a technician's tags (update_meta) are not the node's to replace
                k = NODE_TAGS
            if k == "firmware":
                if dev.firmware != str(v):
                    changes["firmware"] = str(v)
            elif extra.get(k) != v:
                extra[k] = v
        if extra != dev.attributes:
            changes["attributes"] = extra
        if not changes:
            return
        if "firmware" in changes and dev.firmware is not None:
            await self._events.record("device.firmware", device_id, {"from": dev.firmware, "to": changes["firmware"]})
        self._set(device_id, **changes)
        await self._persist(device_id, **changes)

    async def set_online(self, device_id: str, online: bool, reason: str, ts: float | None = None) -> None:
        dev = self._devices.get(device_id)
        if dev is None or dev.online == online:
            return
        now = time.time() if ts is None else ts
        seen = now if online else dev.last_seen
        self._set(device_id, online=online, last_seen=seen)
        self._notify_online(device_id, online, reason, now)
        kind, data = ("device.online" if online else "device.offline"), {"reason": reason}

        def persist(c: sqlite3.Connection) -> int:  # the state and its event in one commit
            c.execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?", (int(online), seen, device_id))
            return EventLog.insert(c, kind, device_id, data, now)

        eid = await self._db.write(persist)
        self._events.announce(eid, kind, device_id, data, now)
        self._bus.publish({"type": "device", "device": device_id, "online": online, "reason": reason})
        self._update_gauges()

    # -- what technicians do ------------------------------------------------------------------
    async def update_meta(self, device_id: str, *, name: str | None = None, location: str | None = None,
                          tags: list[str] | None = None) -> Device:
        if device_id not in self._devices:
            raise UnknownDevice(device_id)
        changes: dict[str, Any] = {k: v for k, v in (("name", name), ("location", location)) if v is not None}
        if tags is not None:
            attributes = {**self._devices[device_id].attributes, "tags": sorted(set(tags))}
            if not tags:
                del attributes["tags"]
            changes["attributes"] = attributes
        if changes:
            await self._persist(device_id, **changes)
            self._set(device_id, **changes)
        return self._devices[device_id]

    async def adopt(self, device_id: str) -> Device:
        return await self._set_state(device_id, DeviceState.ADOPTED)

    async def ignore(self, device_id: str) -> Device:
        return await self._set_state(device_id, DeviceState.IGNORED)

    async def _set_state(self, device_id: str, state: DeviceState) -> Device:
        if device_id not in self._devices:
            raise UnknownDevice(device_id)
        await self._persist(device_id, state=state.value)
        dev = self._set(device_id, state=state)
        await self._events.record(f"device.{state.value}", device_id, {})
        return dev

    async def remove(self, device_id: str) -> None:
        """Forget a device (its stored readings stay, for history and the cloud)."""
        if device_id not in self._devices:
            raise UnknownDevice(device_id)
        await self._db.write(lambda c: c.execute("DELETE FROM devices WHERE id = ?", (device_id,)))
        self._devices.pop(device_id, None)
        self._latest.pop(device_id, None)
        await self._events.record("device.removed", device_id, {})
        self._update_gauges()

    # -- background ------------------------------------------------------------------------------
    async def check_timeouts(self) -> None:
        now = time.time()
        for dev in list(self._devices.values()):
            if dev.online and dev.last_seen is not None and now - dev.last_seen > self.offline_after_s:
                await self.set_online(dev.id, False, "heartbeat timeout")

    async def flush_last_seen(self) -> None:
        if not self._dirty_seen:
            return
        batch = [(self._devices[d].last_seen, d) for d in self._dirty_seen if d in self._devices]
        self._dirty_seen.clear()
        await self._db.write(lambda c: c.executemany("UPDATE devices SET last_seen = ? WHERE id = ?", batch))

    async def run_housekeeping(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.check_timeouts()
            await self.flush_last_seen()

    # -- internals ---------------------------------------------------------------------------------
    def _set(self, device_id: str, **changes: Any) -> Device:
        dev = self._devices[device_id].model_copy(update=changes)
        self._devices[device_id] = dev
        return dev

    async def _persist(self, device_id: str, **cols: Any) -> None:
        assigns = ", ".join(f"{k} = ?" for k in cols)
        params = (*(json.dumps(v) if k == "attributes" else v for k, v in cols.items()), device_id)
        await self._db.write(lambda c: c.execute(f"UPDATE devices SET {assigns} WHERE id = ?", params))

    def _update_gauges(self) -> None:
        online = sum(1 for d in self._devices.values() if d.online)
        self._metrics.devices.labels(state="online").set(online)
        self._metrics.devices.labels(state="offline").set(len(self._devices) - online)
