"""Faults: kill -9 during a QoS 1 flood loses nothing acknowledged; restart keeps the data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.devices.credentials import Credentials
from gateway.metrics import Metrics
from gateway.store.database import Database
from gateway.store.files import history_path
from tests.broker.rawmqtt import PUBACK, RawClient, publish_packet

CLIENTS = 10
WINDOW = 20
# kill once this many PUBACKs came back: well inside the flood, whatever the machine's load
MIN_ACKS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path, mqtt: int, web: int) -> Path:
    cfg = tmp / "siteward.toml"
    cfg.write_text(
        f'[gateway]\ndata_dir = "{tmp / "data"}"\nid = "gw-fault"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {mqtt}\nrate_limit_per_s = 100000\nrate_limit_burst = 100000\n'
        f'[web]\nhost = "127.0.0.1"\nport = {web}\nadmin_password = "fault test password"\n'
        '[time]\nsource = "assume_synced"\n[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    return cfg


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "gateway"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def _wait_ready(web: int, proc: subprocess.Popen[bytes], within: float = 60.0) -> None:
    """Until /healthz answers: the broker listens before the web server, so this is all up."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gateway exited during start"
        with contextlib.suppress(OSError):
            r, w = await asyncio.open_connection("127.0.0.1", web)
            w.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            status = await r.readline()
            w.close()
            if status.startswith(b"HTTP/1.") and status.split()[1] in (b"200", b"503"):
                return
        await asyncio.sleep(0.2)
    raise AssertionError("gateway did not become ready")


async def _flood(port: int, dev: str, pw: str, acked: list[int], stop: asyncio.Event) -> None:
    """Publish seq 1, 2, 3 … with up to WINDOW in flight; record each seq whose PUBACK came."""
    c = await RawClient.connect(port, dev, username=dev, password=pw)
    inflight: dict[int, int] = {}
    seq = 0
    try:
        while not stop.is_set():
            while len(inflight) < WINDOW:
                seq += 1
                pid = (seq - 1) % 65535 + 1
                inflight[pid] = seq
                c.send(publish_packet(f"devices/{dev}/telemetry", json.dumps({"counter": seq}).encode(),
                                      qos=1, pid=pid))
            p = await c.read(within=5)
            if p is None:
                return  # gateway died
            if p.kind == PUBACK:
                acked.append(inflight.pop(p.pid))
    except (ConnectionError, TimeoutError, AssertionError):
        return
    finally:
        c.close()


@pytest.mark.timeout(300)  # two gateway starts; slow when the machine is shared
async def test_kill_9_during_qos1_flood_loses_nothing_acknowledged(tmp_path: Path) -> None:
    mqtt, web = _free_port(), _free_port()
    cfg = _config(tmp_path, mqtt, web)
    db_path = tmp_path / "data" / "siteward.db"
    db = Database(db_path, Metrics())
    await db.open()
    creds = Credentials(db)
    devices = {f"flood-{i}": await creds.mint(f"flood-{i}") for i in range(CLIENTS)}
    await db.close()

    log = tmp_path / "gateway.log"
    proc = _start(cfg, log)
    try:
        await _wait_ready(web, proc)
        acked: dict[str, list[int]] = {d: [] for d in devices}
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_flood(mqtt, d, pw, acked[d], stop)) for d, pw in devices.items()]
        deadline = time.monotonic() + 30
        while sum(len(v) for v in acked.values()) < MIN_ACKS and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-flood, no chance to flush anything
        proc.wait(10)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total_acked = sum(len(v) for v in acked.values())
    assert total_acked >= MIN_ACKS, f"the flood hardly ran ({total_acked} acks); see {log.read_text()[-2000:]}"

    # restart on the same files: recovery, then check every acknowledged reading is there
    proc = _start(cfg, log)
    try:
        await _wait_ready(web, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]

    conn = sqlite3.connect(db_path)
    conn.execute("ATTACH DATABASE ? AS hist", (str(history_path(db_path)),))
    for schema in ("main", "hist"):  # both files of the store
        assert conn.execute(f"PRAGMA {schema}.integrity_check").fetchone()[0] == "ok"
    lost = 0
    for dev, seqs in acked.items():
        # history, plus whatever the merge has not moved yet
        stored = {int(v) for (v,) in conn.execute(
            "SELECT value FROM history WHERE series_id = (SELECT id FROM series WHERE device_id = ?1"
            " AND metric = 'counter') UNION ALL SELECT value FROM readings WHERE series_id ="
            " (SELECT id FROM series WHERE device_id = ?1 AND metric = 'counter')", (dev,))}
        lost += len(set(seqs) - stored)
    assert lost == 0, f"{lost} of {total_acked} acknowledged readings lost"


async def test_restart_keeps_data_and_devices(make_settings) -> None:
    from gateway.app import Gateway

    settings = make_settings()
    async with Gateway(settings) as gw:
        await gw.ingest.ingest_http("keep-1", b'{"temperature": 12.5}')
        await gw.registry.update_meta("keep-1", name="Cold room", location="Basement")
    async with Gateway(settings) as gw:
        dev = await gw.registry.get("keep-1")
        assert dev is not None and (dev.name, dev.location) == ("Cold room", "Basement")
        assert [r.value for r in await gw.readings.history("keep-1")] == [12.5]
        assert await gw.db.integrity_check() == "ok"
