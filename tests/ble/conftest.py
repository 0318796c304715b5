"""BLE test rig: a private system bus (dbus-daemon) with a fake bluetoothd on it
(python-dbusmock and our template, tests/ble/fake_bluez.py), so that the real bleak code
talks real D-Bus. The only thing simulated is the radio: the test says which
advertisements are "in the air" and the fake BlueZ reports what an adapter would hear.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

TEMPLATE = Path(__file__).with_name("fake_bluez.py")
MOCK_IFACE = "org.bluez.Mock"


async def until(cond: Callable[[], Any], limit_s: float = 10.0, what: str = "condition") -> Any:
    """Wait for ``cond()`` to be truthy (a deadline against hangs, not a speed assertion)."""
    deadline = time.monotonic() + limit_s
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def dbus_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("dbus-daemon")
    if exe is None:
        pytest.fail("dbus-daemon is missing: install the Debian package 'dbus' (scripts/test.sh does)")
    d = tmp_path_factory.mktemp("dbus")
    address = f"unix:path={d}/system_bus_socket"
    conf = d / "bus.conf"
    # a private bus that behaves like the system bus but lets this user own org.bluez
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
""")
    proc = subprocess.Popen([exe, "--config-file", str(conf), "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"dbus-daemon did not start: {proc.stderr.read() if proc.stderr else ''}")
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def system_bus(dbus_daemon: str, monkeypatch: pytest.MonkeyPatch) -> str:
    # bleak and dbus-fast find "the system bus" through this variable, as on a real Pi
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbus_daemon)
    return dbus_daemon


class FakeBlueZ:
    """Drives the fake bluetoothd over D-Bus (org.bluez.Mock)."""

    def __init__(self, bus: MessageBus, proc: asyncio.subprocess.Process) -> None:
        self.bus = bus
        self.proc = proc

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None) -> Any:
        reply = await self.bus.call(Message(destination="org.bluez", path="/", interface=MOCK_IFACE, member=member,
                                            signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body}")
        return reply.body[0] if reply.body else None

    async def add_adapter(self, name: str = "hci0", *, monitor: bool = True) -> str:
        return str(await self._call("AddAdapter", "ssb", [name, f"test {name}", monitor]))

    async def remove_adapter(self, name: str = "hci0") -> None:
        await self._call("RemoveAdapter", "s", [name])

    async def wedge(self, name: str = "hci0", kind: str = "scan") -> None:
        await self._call("Wedge", "ss", [name, kind])

    async def expire(self, address: str, name: str = "hci0") -> None:
        await self._call("ExpireDevice", "ss", [name, address])

    async def state(self, name: str = "hci0") -> dict[str, Any]:
        return json.loads(await self._call("GetState", "s", [name]))  # type: ignore[no-any-return]

    async def advertise(self, address: str, *, name: str = "", rssi: int = -60,
                        manufacturer_data: dict[int, bytes] | None = None,
                        service_data: dict[str, bytes] | None = None, uuids: list[str] | None = None,
                        adapter: str = "hci0") -> bool:
        sd = service_data or {}
        return bool(await self._call("Advertise", "sssna{qay}a{say}as", [
            adapter, address, name, rssi, manufacturer_data or {}, sd, uuids if uuids is not None else list(sd)]))


@pytest.fixture
async def fake_bluez(system_bus: str) -> AsyncIterator[FakeBlueZ]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": system_bus}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dbusmock", "--system", "--template",
                                                str(TEMPLATE), env=env, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        async def owned() -> bool:
            reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                           interface="org.freedesktop.DBus", member="NameHasOwner",
                                           signature="s", body=["org.bluez"]))
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"fake bluetoothd exited: {err!r}")
            return bool(reply is not None and reply.body and reply.body[0])

        await until(owned, 20.0, "fake bluetoothd on the bus")
        yield FakeBlueZ(bus, proc)
    finally:
        bus.disconnect()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
