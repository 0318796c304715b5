"""The cloud side of the sync tests: a real mosquitto, a TCP proxy that can cut or black-hole
the gateway's connection, and a consumer that checks every reading by its key.

The broker has three loopback listeners: plain (the consumer's, and plain-TCP
development tests), TLS with username/password, and TLS with a required client
certificate whose CN becomes the username (mutual TLS, the AWS IoT Core way).
Persistence is on, so a broker restart keeps the consumer's session and its queue,
as a real cloud broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from cloud_sync.codec import decode
from gateway.store.files import history_path
from tests.fixtures.mqtt_brokers import MOSQUITTO, free_port, wait_listening
from tests.sync.pki import Pki

CLOUD_USER = "gw-test"
CLOUD_PASSWORD = "cloud test password"


class CloudBroker:
    def __init__(self, workdir: Path, pki: Pki) -> None:
        if not Path(MOSQUITTO).exists():
            import pytest

            pytest.skip("mosquitto is not installed")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.plain_port = free_port()
        self.tls_port = free_port()
        self.mtls_port = free_port()
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        pw = self.dir / "passwords"
        pw.write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(pw), CLOUD_USER, CLOUD_PASSWORD], check=True,
                       capture_output=True)
        (self.dir / "persist").mkdir(exist_ok=True)
        tls = f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            "per_listener_settings true\n"
            f"persistence true\npersistence_location {self.dir / 'persist'}/\n"
            "user root\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\n"
            f"listener {self.plain_port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n{tls}"
            f"listener {self.mtls_port} 127.0.0.1\nallow_anonymous false\n{tls}"
            "require_certificate true\nuse_identity_as_username true\n"
        )

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for port in (self.plain_port, self.tls_port, self.mtls_port):
            wait_listening(port, timeout=10)

    def stop(self) -> None:
        """Graceful (SIGTERM): mosquitto writes its persistence file, like a cloud broker's restart."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class TcpProxy:
    """Between the sync and the broker: pass, cut every connection, refuse, or black-hole
    (connections stay open, bytes go nowhere, in both directions)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.blackholed = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        link = (cw, uw)
        self._links.add(link)
        for r, w in ((cr, uw), (ur, cw)):
            t = asyncio.create_task(self._pump(r, w))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                if self.blackholed:
                    continue
                w.write(data)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    def cut(self) -> None:
        """Abort every open connection (RST), as a dying uplink does mid-batch."""
        for cw, uw in list(self._links):
            for w in (cw, uw):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._links.clear()

    async def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    async def up(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.down()
        for t in list(self._tasks):
            t.cancel()


@dataclass
class Seen:
    readings: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> latest item
    counts: Counter[int] = field(default_factory=Counter)  # id -> deliveries
    amended: set[int] = field(default_factory=set)  # corrected by a clock-correction notice
    corrections: list[dict[str, Any]] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)  # (lane, id) in arrival order
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_counts: Counter[str] = field(default_factory=Counter)
    results: list[dict[str, Any]] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    raw: list[tuple[str, bytes]] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    broker_redeliveries: int = 0


class CloudConsumer:
    """A cloud backend in miniature: persistent session, QoS 1, de-duplication by key."""

    def __init__(self, port: int, gateway: str = "gw-test", *, identifier: str = "cloud-consumer",
                 keep_raw: int = 200) -> None:
        self.port = port
        self.gateway = gateway
        self.identifier = identifier
        self.seen = Seen()
        self.keep_raw = keep_raw
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.received = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.identifier, clean_session=False,
                                          keepalive=5, timeout=5) as c:
                    await c.subscribe(f"siteward/{self.gateway}/up/#", qos=1)
                    self.connected.set()
                    async for m in c.messages:
                        self._take(str(m.topic), bytes(m.payload))  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    def _take(self, topic: str, payload: bytes) -> None:
        self.received += 1
        if len(self.seen.raw) < self.keep_raw:
            self.seen.raw.append((topic, payload))
        body = decode(payload)
        kind = body.get("type")
        s = self.seen
        if kind in ("readings", "events"):
            # the broker's own at-least-once towards us re-delivers the *same* message (same
            # seq); only a message the gateway sent again is the gateway's duplicate
            if body["seq"] in s.seqs:
                s.broker_redeliveries += 1
                return
            s.seqs.add(body["seq"])
        if kind == "readings":
            for r in body["readings"]:
                rid = r["id"]
                s.counts[rid] += 1
                s.order.append((body["lane"], rid))
                if rid in s.readings:
                    continue  # a duplicate: de-duplicated by key, the first copy stands
                s.readings[rid] = self._corrected(r)
        elif kind == "events":
            for e in body["events"]:
                s.event_counts[e["key"]] += 1
                if e["key"] in s.events:
                    continue
                s.events[e["key"]] = e
                if e["kind"] == "readings.corrected":
                    s.corrections.append(e["data"])
                    for rid, r in s.readings.items():
                        s.readings[rid] = self._corrected(r)
        elif kind == "command_result":
            s.results.append(body)
        elif kind == "status":
            s.status.append(body)
        elif kind == "health":
            s.health.append(body)

    def _corrected(self, r: dict[str, Any]) -> dict[str, Any]:
        """The contract's clock-correction rule (docs/cloud-contract.md, "Clock corrections")."""
        for c in self.seen.corrections:
            if c["first_id"] <= r["id"] <= c["last_id"] and r["flags"] & 1 and not r["flags"] & 12:
                self.seen.amended.add(r["id"])
                return {**r, "ts": r["ts"] + c["step_s"], "flags": r["flags"] | c["set_flags"]}
        return r

    # -- checks -----------------------------------------------------------------------------
    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.seen.counts.values() if n > 1)

    async def wait_for(self, ok: Any, within: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + within
        while not ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; consumer has {len(self.seen.readings)} readings")
            await asyncio.sleep(0.05)

    async def wait_for_store(self, db_path: Path, within: float = 30.0) -> None:
        """Until every reading now in the store has arrived."""
        ids = store_ids(db_path)
        await self.wait_for(lambda: ids <= self.seen.readings.keys(), within,
                            f"{len(ids)} readings of the store (missing e.g. "
                            f"{sorted(ids - self.seen.readings.keys())[:5]})")

    def check_against_store(self, db_path: Path, *, allow_extra: bool = False) -> None:
        """Every reading of the store arrived exactly as stored (key, device, metric, value, ts, flags)."""
        stored = store_readings(db_path)
        missing = [rid for rid in stored if rid not in self.seen.readings]
        assert not missing, f"{len(missing)} readings never reached the cloud, e.g. {missing[:10]}"
        wrong = [rid for rid, want in stored.items()
                 if {k: self.seen.readings[rid][k] for k in want} != want]
        assert not wrong, (f"{len(wrong)} readings differ, e.g. {wrong[0]}: "
                           f"{self.seen.readings[wrong[0]]} vs {stored[wrong[0]]}")
        if not allow_extra:
            extra = self.seen.readings.keys() - stored.keys()
            assert not extra, f"the cloud has {len(extra)} readings the store never had"


def _open_store(db_path: Path, *, readonly: bool = True) -> sqlite3.Connection:
    """The store's main file with its history file attached as ``hist``, when there is one."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro" if readonly else f"file:{db_path}", uri=True)
    hist = history_path(db_path)
    if hist.exists():
        conn.execute("ATTACH DATABASE ? AS hist", (f"file:{hist}?mode=ro" if readonly else f"file:{hist}",))
    return conn


def store_readings(db_path: Path) -> dict[int, dict[str, Any]]:
    """Every reading the store holds: the outbox (``readings``) and the merged ``history``
    (acknowledged rows leave the outbox once merged)."""
    conn = _open_store(db_path)
    try:
        q = ("SELECT r.id, s.device_id, s.metric, s.unit, r.value, r.ts, r.flags"
             " FROM {t} r JOIN series s ON s.id = r.series_id")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if any(r[1] == "hist" for r in conn.execute("PRAGMA database_list")):
            tables |= {r[0] for r in conn.execute("SELECT name FROM hist.sqlite_master WHERE type = 'table'")}
        out: dict[int, dict[str, Any]] = {}
        for table in ("history", "readings"):  # the outbox copy wins: it is the one the sync sends
            if table not in tables:
                continue
            for r in conn.execute(q.format(t=table)):
                out[r[0]] = {"id": r[0], "device": r[1], "metric": r[2], "unit": r[3], "value": r[4], "ts": r[5],
                             "flags": r[6]}
        return out
    finally:
        conn.close()


def store_ids(db_path: Path) -> set[int]:
    return set(store_readings(db_path))


def integrity(db_path: Path) -> str:
    """"ok" when both files of the store pass SQLite's integrity check."""
    conn = _open_store(db_path, readonly=False)
    try:
        results = [str(conn.execute(f"PRAGMA {r[1]}.integrity_check").fetchone()[0])
                   for r in conn.execute("PRAGMA database_list").fetchall() if r[1] != "temp"]
        return "ok" if all(x == "ok" for x in results) else "; ".join(results)
    finally:
        conn.close()
