"""``siteward sync`` as an operator meets it, and ``siteward run`` starting it for development."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.mqtt_brokers import free_port
from tests.sync.cloud import CloudBroker, CloudConsumer
from tests.sync.conftest import cloud_section, process_config, start_process, terminate, write_config
from tests.sync.pki import Pki

ROOT = Path(__file__).parents[2]


def siteward(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_sync_refuses_to_start_when_off(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "s.toml", {"gateway": {"data_dir": str(tmp_path / "data")}})
    r = siteward("--config", str(cfg), "sync")
    assert r.returncode == 2 and "enabled = true" in r.stderr


def test_sync_names_the_bad_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "s.toml", {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "cloud": {"enabled": True, "ca_file": str(tmp_path / "missing-ca.pem")},
    })
    r = siteward("--config", str(cfg), "sync")
    assert r.returncode == 2
    assert "cloud.ca_file: cannot read" in r.stderr and "missing-ca.pem" in r.stderr
    cfg.write_text(cfg.read_text() + 'mqtt_version = "4"\n')
    r = siteward("--config", str(cfg), "sync")
    assert r.returncode == 2 and "cloud.mqtt_version" in r.stderr


async def test_run_starts_the_sync_as_a_child(tmp_path: Path, cloud: CloudBroker, pki: Pki,
                                              consumer: CloudConsumer) -> None:
    cfg = process_config(tmp_path, cloud_section(cloud, pki),
                         broker={"host": "127.0.0.1", "port": free_port()},
                         web={"host": "127.0.0.1", "port": free_port(), "admin_password": "dev run password"},
                         simulate={"nodes": 2, "interval_s": 0.2})
    log = tmp_path / "run.log"
    proc = start_process(cfg, "run", log)
    try:
        # simulated nodes' readings reach the cloud through the child sync process
        await consumer.wait_for(lambda: len(consumer.seen.readings) >= 10, within=60,
                                what=f"simulated readings in the cloud; log: {log.read_text()[-2000:]}")
        assert any(st["state"] == "online" for st in consumer.seen.status)
    finally:
        rc = terminate(proc)
    assert rc == 0, log.read_text()[-3000:]
    # the child was stopped with the parent, cleanly: it said offline itself
    await consumer.wait_for(lambda: consumer.seen.status[-1]["state"] == "offline", what="offline status")
    assert consumer.seen.status[-1]["reason"] == "shutdown"


async def test_sync_starts_over_when_the_store_is_replaced(tmp_path: Path, make_settings, cloud: CloudBroker,
                                                           pki: Pki, consumer: CloudConsumer) -> None:
    """The gateway sets a corrupt file aside and starts a new one (store.salvage): the sync
    must not keep reading the old inode. It exits 75 (EX_TEMPFAIL) for systemd to restart it."""
    import asyncio

    from tests.sync.conftest import add_readings, store_of
    from tests.sync.test_process_faults import until_working

    cc = cloud_section(cloud, pki)
    s = make_settings(cloud=cc)
    async with store_of(s) as db:
        await add_readings(db, 100)
    cfg = process_config(tmp_path, cc)
    log = tmp_path / "sync.log"
    proc = start_process(cfg, "sync", log)
    try:
        await until_working(proc, s.db_path)
        await consumer.wait_for_store(s.db_path)
        set_aside(s.db_path)
        async with store_of(s):
            pass  # a fresh file, as a salvage leaves it
        for _ in range(200):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode == 75, log.read_text()[-2000:]
        assert "sync.store_replaced" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def set_aside(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db) + suffix)
        if p.exists():
            p.rename(Path(str(db) + ".corrupt" + suffix))
