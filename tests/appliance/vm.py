"""Boot the test image under qemu-system-aarch64 (TCG) and talk to it.

* the disk is a copy of the built image, enlarged so first boot has a card to grow into;
* the boot config goes onto the FAT partition with mtools (no mounts);
* user-mode networking forwards the web and MQTT ports to free loopback ports on this host;
* commands run inside through the QEMU guest agent on a virtio-serial port (the test image
  carries qemu-guest-agent; a release image has no such channel);
* the serial console is written to a file, read for systemd's status lines and first boot's.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTOR = 512


@dataclass
class Exec:
    code: int
    out: str
    err: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def boot_partition_offset(image: Path) -> int:
    """Byte offset of partition 1 (the FAT boot partition), from sfdisk's JSON dump."""
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    parts = json.loads(out)["partitiontable"]["partitions"]
    return int(parts[0]["start"]) * SECTOR


def put_on_boot_partition(image: Path, files: dict[str, str | bytes]) -> None:
    target = f"{image}@@{boot_partition_offset(image)}"
    for name, content in files.items():
        tmp = image.parent / f".boot-{name}"
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        subprocess.run(["mcopy", "-o", "-i", target, str(tmp), f"::/{name}"], check=True, capture_output=True)
        tmp.unlink()


def list_boot_partition(image: Path) -> list[str]:
    target = f"{image}@@{boot_partition_offset(image)}"
    out = subprocess.run(["mdir", "-b", "-i", target, "::/"], capture_output=True, text=True, check=True).stdout
    return sorted(Path(line.strip()).name for line in out.splitlines() if line.strip())


class GuestAgent:
    """The QEMU guest agent's JSON protocol over its chardev socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(int(time.time()) % 100000)
        self.sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buf = b""

    def _connect(self, timeout: float) -> None:
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.path))
        self.sock = s
        # guest-sync flushes whatever an earlier, abandoned exchange left in the pipe
        token = next(self._ids)
        s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        while True:
            msg = self._read(timeout)
            if msg.get("return") == token:
                return

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.sock is not None
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if time.monotonic() > end:
                raise TimeoutError("guest agent did not answer")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("guest agent closed the channel")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.lstrip(b"\xff").strip()
        return json.loads(line) if line else self._read(timeout)

    def call(self, command: str, timeout: float = 30, **arguments: Any) -> Any:
        if self.sock is None:
            self._connect(timeout)
        assert self.sock is not None
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        msg = self._read(timeout)
        if "error" in msg:
            raise RuntimeError(f"{command}: {msg['error']}")
        return msg.get("return")

    def send(self, command: str, **arguments: Any) -> None:
        """A command with no reply on success (guest-shutdown): send it and drop the channel."""
        if self.sock is None:
            self._connect(30)
        assert self.sock is not None
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        self.close()

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                self._connect(10)
                self.call("guest-ping", timeout=10)
                return
            except (OSError, TimeoutError, ConnectionError, ValueError, RuntimeError) as exc:
                last = exc
                self.close()
                time.sleep(2)
        raise TimeoutError(f"guest agent not ready after {timeout}s: {last}")

    def sh(self, script: str, timeout: float = 120) -> Exec:
        pid = self.call("guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True})["pid"]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.call("guest-exec-status", pid=pid)
            if st.get("exited"):
                return Exec(int(st.get("exitcode", -1)),
                            base64.b64decode(st.get("out-data", "")).decode(errors="replace"),
                            base64.b64decode(st.get("err-data", "")).decode(errors="replace"))
            time.sleep(0.3)
        raise TimeoutError(f"guest command did not finish in {timeout}s: {script}")


class VM:
    def __init__(self, workdir: Path, image: Path, kernel: Path, initrd: Path, *, grow_mb: int = 512,
                 memory_mb: int = 1024) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = self.dir / "disk.img"
        # a sparse copy, enlarged: the "card" is bigger than the image, as a real one is
        subprocess.run(["cp", "--sparse=always", str(image), str(self.disk)], check=True)
        with open(self.disk, "r+b") as f:
            f.truncate(self.disk.stat().st_size + grow_mb * 1024 * 1024)
        self.kernel, self.initrd = kernel, initrd
        self.memory_mb = memory_mb
        self.web_port, self.mqtt_port = free_port(), free_port()
        self.console = self.dir / "console.log"
        self.qga_path = self.dir / "qga.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent = GuestAgent(self.qga_path)
        self.started_at = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def command(self) -> list[str]:
        return [
            shutil.which("qemu-system-aarch64") or "qemu-system-aarch64",
            "-M", "virt", "-accel", "tcg,thread=multi", "-cpu", "cortex-a72", "-smp", "2",
            "-m", str(self.memory_mb), "-nographic", "-nodefaults",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            # net.ifnames=0 as on the Pi (raspi-firmware's cmdline.txt); status lines on the console
            "-append", "root=LABEL=sw-root rw console=ttyAMA0 net.ifnames=0 systemd.show_status=1 panic=10",
            "-drive", f"file={self.disk},format=raw,if=none,id=hd0,cache=writeback,discard=unmap",
            "-device", "virtio-blk-pci,drive=hd0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.web_port}-:8080,"
                       f"hostfwd=tcp:127.0.0.1:{self.mqtt_port}-:1883",
            "-device", "virtio-net-pci,netdev=n0,romfile=",  # no PXE boot ROM: the kernel is given
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev", f"file,id=con0,path={self.console}",
            "-serial", "chardev:con0",
            "-monitor", "none",
            "-device", "virtio-rng-pci",
        ]

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "qemu.stderr", "wb"))  # noqa: SIM115

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def http(self, path: str, *, data: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 30, method: str | None = None) -> tuple[int, Any, dict[str, str]]:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed, hdrs

    def wait_http(self, path: str = "/healthz", timeout: float = 600) -> float:
        """Seconds from qemu start until ``path`` answers (any HTTP status)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited ({self.proc.returncode}); console:\n{self.console_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, _, _ = self.http(path, timeout=5)
                if status in (200, 503):
                    return time.monotonic() - self.started_at
            time.sleep(1)
        raise TimeoutError(f"{path} did not answer within {timeout}s; console:\n{self.console_text()[-4000:]}")

    def stop(self) -> None:
        self.agent.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
