"""Fixtures for the cloud sync tests: PKI, a cloud mosquitto, a consumer, the sync itself.

Timings are shortened (keepalive 2 s, backoff from 0.2 s) so that faults play out in
seconds; the behaviour under test is the same as with production values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import Metrics
from gateway.models import Reading, Source
from gateway.settings import Settings
from gateway.store.database import Database
from tests.sync.cloud import CLOUD_PASSWORD, CLOUD_USER, CloudBroker, CloudConsumer, TcpProxy
from tests.sync.pki import Pki, make_pki

GATEWAY_ID = "gw-test"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), client_cn=GATEWAY_ID)


@pytest.fixture
def cloud(tmp_path: Path, pki: Pki) -> Iterator[CloudBroker]:
    b = CloudBroker(tmp_path / "cloud", pki)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def consumer(cloud: CloudBroker) -> AsyncIterator[CloudConsumer]:
    c = CloudConsumer(cloud.plain_port, GATEWAY_ID)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def proxy(cloud: CloudBroker) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(cloud.tls_port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def cloud_section(cloud: CloudBroker, pki: Pki, *, port: int | None = None, **over: Any) -> dict[str, Any]:
    """TLS with username/password by default: every test goes through real TLS."""
    c: dict[str, Any] = {
        "enabled": True, "host": "127.0.0.1", "port": port or cloud.tls_port, "transport": "tls",
        "ca_file": str(pki.ca), "username": CLOUD_USER, "password": CLOUD_PASSWORD,
        "keepalive_s": 2, "ack_timeout_s": 5, "connect_timeout_s": 3,
        "backoff_initial_s": 0.2, "backoff_max_s": 2.0, "probe_interval_s": 0.2,
        "poll_interval_ms": 20, "batch_max_wait_ms": 50, "status_interval_s": 0.5, "health_interval_s": 5,
        "batch_max_readings": 500, "inflight_window": 8,
    }
    c.update(over)
    return c


@pytest.fixture
def sync_settings(make_settings: Callable[..., Settings], cloud: CloudBroker, pki: Pki) -> Callable[..., Settings]:
    def make(*, port: int | None = None, store: dict[str, Any] | None = None, **cloud_over: Any) -> Settings:
        sections: dict[str, Any] = {"cloud": cloud_section(cloud, pki, port=port, **cloud_over)}
        if store:
            sections["store"] = store
        return make_settings(**sections)

    return make


@contextlib.asynccontextmanager
async def running_sync(settings: Settings) -> AsyncIterator[Any]:
    from cloud_sync.service import SyncService

    svc = SyncService(settings)
    await svc.start()
    try:
        await asyncio.wait_for(svc.ready.wait(), 20)
        yield svc
    finally:
        await svc.stop("test over")


@contextlib.asynccontextmanager
async def store_of(settings: Settings) -> AsyncIterator[Database]:
    """The store as the gateway's writer would hold it (migrations applied)."""
    db = Database(settings.db_path, Metrics(), commit_interval_ms=2)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


async def add_readings(db: Database, n: int, *, devices: int = 5, start: int = 0, ts: float | None = None,
                       chunk: int = 5000, metric: str = "temperature", flags: int = 0) -> range:
    """n readings spread over ``devices`` devices; value = sequence number per call."""
    t0 = time.time() if ts is None else ts
    first = last = None
    for i in range(start, start + n, chunk):
        batch = [Reading(device=f"node-{j % devices}", metric=metric, value=float(j), unit="C",
                         ts=t0 + j * 0.001, source=Source.MQTT, flags=flags)
                 for j in range(i, min(i + chunk, start + n))]
        ids = await db.add_readings(batch)
        first = ids.start if first is None else first
        last = ids.stop
    assert first is not None and last is not None
    return range(first, last)


# -- subprocesses -------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if v is None or isinstance(v, dict):
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        for sub, inner in nested.items():
            lines.append(f"[{name}.{sub}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in inner.items() if v is not None)
    path.write_text("\n".join(lines) + "\n")
    return path


def process_config(tmp: Path, cloud_cfg: dict[str, Any], **extra: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "gateway": {"data_dir": str(tmp / "data"), "id": GATEWAY_ID},
        "time": {"source": "assume_synced"},
        "logging": {"level": "info", "format": "json"},
        "cloud": cloud_cfg,
    }
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return write_config(tmp / "siteward.toml", sections)


def start_process(cfg: Path, command: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), command],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def terminate(proc: subprocess.Popen[bytes], within: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
