"""sd_notify: the datagrams systemd would get, from the module and from the real ``siteward gateway``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.systemd_notify import HealthGate, Notifier, loop_lag, watchdog_loop


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET; a thread drains it as systemd would."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.address = address
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.messages.append(msg)

    def since(self, index: int) -> list[dict[str, str]]:
        with self._lock:
            return self.messages[index:]

    def receive(self, duration: float) -> list[dict[str, str]]:
        mark = len(self.messages)
        time.sleep(duration)
        return self.since(mark)

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for msg in self.since(0):
                if key in msg:
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.close()


def test_ready_status_and_watchdog_reach_the_socket(systemd: FakeSystemd) -> None:
    n = Notifier({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval_s == 4.0
    assert n.ready("serving")
    assert n.notify(watchdog=1)
    time.sleep(0.3)
    assert systemd.since(0) == [{"READY": "1", "STATUS": "serving"}, {"WATCHDOG": "1"}]


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"@siteward-test-{os.getpid()}"
    fake = FakeSystemd(name)
    try:
        assert Notifier({"NOTIFY_SOCKET": name}).status("hello")
        assert fake.wait_for("STATUS", 5) == {"STATUS": "hello"}
    finally:
        fake.close()


def test_outside_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready("x") is False


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x") is False


def test_gate_allows_a_short_backoff_but_not_a_long_one() -> None:
    now = [1000.0]
    health: dict[str, dict[str, Any]] = {"a": {"ok": True}, "b": {"ok": True}}
    gate = HealthGate(lambda: health, grace_s=60, clock=lambda: now[0])
    assert gate.check()[0]
    health["b"] = {"ok": False, "last_error": "ConnectionError: x"}
    assert gate.check()[0]  # just failed: backing off is what supervisors do
    now[0] += 59
    assert gate.check()[0]
    now[0] += 2
    ok, reason = gate.check()
    assert not ok and "task b unhealthy for 61s" in reason
    health["b"] = {"ok": True}
    assert gate.check()[0]  # recovered: fed again


def test_gate_does_not_restart_for_a_full_disk() -> None:
    now = [0.0]
    health = {"store.maintenance": {"ok": False, "last_error": "OperationalError: database or disk is full"}}
    gate = HealthGate(lambda: health, grace_s=1, clock=lambda: now[0])
    now[0] += 3600
    assert gate.check()[0]  # /healthz says the disk is full; a restart would not empty it


async def test_watchdog_loop_feeds_while_healthy_then_starves(systemd: FakeSystemd) -> None:
    n = Notifier({"NOTIFY_SOCKET": systemd.address})
    health = {"t": {"ok": True}}
    gate = HealthGate(lambda: health, grace_s=0.3)
    task = asyncio.create_task(watchdog_loop(n, gate, interval_s=0.05))
    await asyncio.sleep(0.3)
    fed = sum(1 for m in n.sent if m == "WATCHDOG=1")
    assert fed >= 3
    health["t"] = {"ok": False, "last_error": "RuntimeError: wedged"}
    await asyncio.sleep(0.8)
    after = n.sent[-1]
    count = sum(1 for m in n.sent if m == "WATCHDOG=1")
    await asyncio.sleep(0.3)
    assert sum(1 for m in n.sent if m == "WATCHDOG=1") == count  # no more pings
    assert "STATUS=unhealthy: task t unhealthy" in "\n".join(n.sent)
    assert after.startswith("STATUS=unhealthy")
    task.cancel()


async def test_loop_lag_sees_a_blocked_loop() -> None:
    assert (await loop_lag()) is not None
    blocker = asyncio.get_running_loop().call_soon(time.sleep, 0.3)
    lag = await loop_lag()
    assert lag is not None and lag >= 0.25
    blocker.cancel()
    assert await loop_lag(timeout_s=0.0) is None or True  # a zero budget may or may not be met


def test_siteward_gateway_is_ready_only_when_serving_and_feeds_the_watchdog(tmp_path: Path,
                                                                           systemd: FakeSystemd) -> None:
    cfg = tmp_path / "siteward.toml"
    cfg.write_text(f"""
[gateway]
id = "gw-notify"
data_dir = "{tmp_path / 'data'}"
[broker]
host = "127.0.0.1"
port = 0
[web]
host = "127.0.0.1"
port = 0
admin_password = "correct horse battery"
[time]
source = "assume_synced"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWARD_")}
    env.update(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1000000")
    log = open(tmp_path / "gateway.log", "w")  # noqa: SIM115  (closed in finally)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "gateway"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = systemd.wait_for("READY", 90)
        status = ready["STATUS"]
        port = int(status.split("web ")[1].split(",")[0])
        # READY means serving: the web server answers at once
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status in (200, 503)
        # the watchdog (1 s) is fed about every half period by the supervised loop
        pings = [m for m in systemd.receive(2.5) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3
        proc.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", 30)
        assert proc.wait(60) == 0
    except AssertionError:
        raise AssertionError((tmp_path / "gateway.log").read_text()[-3000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_siteward_sync_is_ready_only_once_the_store_is_open(tmp_path: Path, systemd: FakeSystemd) -> None:
    """The sync unit is ordered after the gateway, but a store that is not there yet must not
    pass for a running sync: READY comes once the gateway's store exists and the loops run."""
    from gateway.metrics import Metrics
    from gateway.store.database import Database

    data = tmp_path / "data"
    cfg = tmp_path / "siteward.toml"
    with socket.socket() as s:  # a cloud that does not answer: READY does not depend on the link
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    cfg.write_text(f"""
[gateway]
id = "gw-notify"
data_dir = "{data}"
[cloud]
enabled = true
host = "127.0.0.1"
port = {dead_port}
transport = "tcp"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWARD_")}
    env.update(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="2000000")
    log = open(tmp_path / "sync.log", "w")  # noqa: SIM115  (closed in finally)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "sync"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        waiting = systemd.wait_for("STATUS", 60)
        assert "waiting" in waiting["STATUS"]
        time.sleep(2.0)
        assert not any("READY" in m for m in systemd.since(0)), systemd.messages

        async def create_store() -> None:  # what the gateway does on its first start
            db = Database(data / "siteward.db", Metrics())
            await db.open()
            await db.close()

        data.mkdir(parents=True, exist_ok=True)
        asyncio.run(create_store())
        ready = systemd.wait_for("READY", 60)
        assert ready["STATUS"] == "syncing"
        proc.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", 30)
        assert proc.wait(60) == 0
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(tmp_path / 'sync.log').read_text()[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
