"""The appliance, booted: the test image under qemu-system-aarch64 (TCG), units under real systemd.

Slow (marked ``slow``): builds the test image (cached: only the last stage reruns when the tree
changed) and boots it twice (a good boot config, then a broken one). The figures it measures
(boot to /healthz, idle RSS and CPU) are written to ``test-artifacts/appliance-figures.json``.

Needs root, mmdebstrap, qemu-user-static/binfmt, qemu-system-arm, mtools, dosfstools, e2fsprogs
(scripts/test.sh installs them). Without them the tests skip, unless SITEWARD_REQUIRE_BOOT_TEST=1
(set by scripts/test.sh), where a missing tool is a failure, not a silent pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from argon2 import PasswordHasher

from tests.appliance.vm import VM, list_boot_partition, put_on_boot_partition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "image" / "out"
ARTIFACTS = ROOT / "test-artifacts"
ADMIN_PASSWORD = "harbour depot admin"
TOOLS = ("mmdebstrap", "qemu-system-aarch64", "mcopy", "mkfs.vfat", "mkfs.ext4", "sfdisk", "update-binfmts")
FIGURES: dict[str, Any] = {}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _missing() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@pytest.fixture(scope="module")
def image() -> dict[str, Path]:
    missing = _missing()
    if missing:
        if os.environ.get("SITEWARD_REQUIRE_BOOT_TEST") == "1":
            pytest.fail(f"boot test prerequisites missing: {', '.join(missing)}")
        pytest.skip(f"boot test prerequisites missing: {', '.join(missing)}")
    t0 = time.monotonic()
    res = subprocess.run([str(ROOT / "image/build.sh"), "--variant", "test", "--out", str(OUT)],
                         capture_output=True, text=True, timeout=2700)
    FIGURES["build_s_this_run"] = round(time.monotonic() - t0, 1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    name = next(OUT.glob("siteward-*-arm64-test.img")).name.removesuffix(".img")
    info = json.loads((OUT / f"{name}.build.json").read_text())
    FIGURES["image"] = info
    return {"img": OUT / f"{name}.img", "kernel": OUT / f"{name}.vmlinuz", "initrd": OUT / f"{name}.initrd.img"}


def boot_config(password_hash: str) -> str:
    return f"""
[site]
name = "Boot test site"
gateway = "boot-gw1"
timezone = "Europe/Berlin"

# a network that is not there (nor is a Wi-Fi radio): the gateway must serve over Ethernet anyway
[wifi]
ssid = "no-such-network"
psk = "not a real passphrase"
country = "DE"

[time]
ntp = ["10.0.2.2"]

# the cloud is unreachable from the test VM: the sync runs and retries, the gateway does not care
[cloud]
host = "10.0.2.2"
port = 18883
username = "boot-gw1"
password = "cloud secret on the card"

[admin]
password_hash = "{password_hash}"
"""


def write_figures() -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "appliance-figures.json").write_text(json.dumps(FIGURES, indent=1, default=str) + "\n")


@pytest.fixture(scope="module")
def vm(image: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    machine = VM(tmp_path_factory.mktemp("vm"), image["img"], image["kernel"], image["initrd"])
    put_on_boot_partition(machine.disk, {"siteward.toml": boot_config(PasswordHasher().hash(ADMIN_PASSWORD))})
    machine.start()
    try:
        FIGURES["first_boot_to_healthz_s"] = round(machine.wait_http("/healthz", timeout=900), 1)
        machine.agent.wait_ready(300)
        yield machine
    finally:
        machine.stop()
        write_figures()
        keep = ARTIFACTS / "appliance-console.log"
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(machine.console, keep)


class Api:
    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.token: str | None = None

    def login(self, password: str = ADMIN_PASSWORD) -> dict[str, Any]:
        status, body, headers = self.vm.http("/api/v1/login", data={"username": "admin", "password": password},
                                             timeout=120)
        assert status == 200, (status, body)
        cookie = headers.get("Set-Cookie", "").split(";")[0]
        # a script's token, made through the browser session (cookie + CSRF)
        status, tok, _ = self.vm.http("/api/v1/tokens", data={"name": f"boot-test-{time.time_ns()}"}, timeout=60,
                                      headers={"Cookie": cookie, "X-CSRF-Token": body["csrf_token"]})
        assert status == 201, (status, tok)
        self.token = tok["token"]
        return body

    def call(self, path: str, data: Any = None, method: str | None = None) -> tuple[int, Any]:
        status, body, _ = self.vm.http(path, data=data, method=method, timeout=60,
                                       headers={"Authorization": f"Bearer {self.token}"})
        return status, body


@pytest.fixture(scope="module")
def api(vm: VM) -> Api:
    a = Api(vm)
    a.login()
    return a


def unit_pid(vm: VM, unit: str) -> int:
    return int(vm.agent.sh(f"systemctl show -p MainPID --value {unit}").out.strip() or 0)


def publish(vm: VM, creds: dict[str, str], device: str, values: list[float], *, wait_s: float = 30) -> int:
    """Publish QoS 1 readings; returns how many were acknowledged (PUBACK) within wait_s."""
    # the broker wants the client id to be the device id its credentials were minted for
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
    client.username_pw_set(creds["username"], creds["password"])
    client.connect("127.0.0.1", vm.mqtt_port, keepalive=60)
    client.loop_start()
    try:
        infos = [client.publish(f"devices/{device}/telemetry", json.dumps({"temperature": v}), qos=1) for v in values]
        end = time.monotonic() + wait_s
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, end - time.monotonic()))
        return sum(1 for i in infos if i.is_published())
    finally:
        client.loop_stop()
        client.disconnect()


def readings(api: Api, device: str) -> list[float]:
    status, body = api.call(f"/api/v1/devices/{device}/readings?metric=temperature&limit=10000")
    assert status == 200, (status, body)
    return sorted(r["value"] for r in body["readings"])


def wait_for(predicate: Any, timeout: float, what: str, step: float = 2) -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


# -- the tests, in boot order --------------------------------------------------------------

def test_healthz_answers_and_first_boot_applied_the_card(vm: VM) -> None:
    _, body, _ = vm.http("/healthz")
    assert body["gateway"] == "boot-gw1", body
    assert body["setup_required"] is False  # the admin came from the card's hash
    assert body["components"]["boot_config"]["state"] == "configured", body["components"]
    # secrets left the FAT partition; a redacted record stays for the installer
    listing = vm.agent.sh("ls /boot/firmware").out.split()
    assert "siteward.toml" not in listing and "siteward.toml.applied" in listing
    applied = vm.agent.sh("cat /boot/firmware/siteward.toml.applied").out
    assert "cloud secret on the card" not in applied and "not a real passphrase" not in applied
    perms = vm.agent.sh("stat -c '%a %U:%G' /etc/siteward/siteward.toml /etc/siteward "
                        "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf").out.split("\n")
    assert perms[:3] == ["640 root:siteward", "750 root:siteward", "600 root:root"], perms
    assert vm.agent.sh("hostname").out.strip() == "boot-gw1"
    assert vm.agent.sh("readlink /etc/localtime").out.strip().endswith("Europe/Berlin")
    # keys made on the device, readable by the service only
    keys = vm.agent.sh("stat -c '%a %U' /var/lib/siteward/tls/ca.key /var/lib/siteward/ota/signing-ed25519.key")
    assert keys.out.split("\n")[:2] == ["600 siteward", "600 siteward"], keys
    # the console shows first boot's result and systemd's status lines (no getty hides them)
    console = ANSI.sub("", vm.console_text())
    assert "Siteward: boot configuration configured" in console
    # systemd shortens long names on an 80-column console: "siteward-gateway.s…eway (MQTT ...)"
    assert re.search(r"Started siteward-gateway", console), console[-3000:]


def test_both_units_run_under_systemd_with_their_hardening(vm: VM) -> None:
    # the sync starts after the gateway; under emulation its start-up takes a while
    both = "systemctl is-active siteward-gateway.service siteward-sync.service"
    wait_for(lambda: vm.agent.sh(both).out.split() == ["active", "active"], 300, "both units active", step=5)
    FIGURES["sync_active_after_boot_s"] = round(time.monotonic() - vm.started_at, 1)
    show = vm.agent.sh("systemctl show -p Type,User,NRestarts,WatchdogUSec siteward-gateway.service").out
    assert "Type=notify" in show and "User=siteward" in show and "WatchdogUSec=1min" in show, show
    # the process really is confined: no capabilities, no new privileges
    pid = unit_pid(vm, "siteward-gateway.service")
    status = vm.agent.sh(f"grep -E '^(CapEff|NoNewPrivs|Uid)' /proc/{pid}/status").out
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status, status
    # systemd's own verdict on the installed units, inside the real system
    verify = vm.agent.sh("systemd-analyze verify siteward-gateway.service siteward-sync.service "
                         "siteward-firstboot.service siteward-growdata.service siteward-recover@siteward-gateway.timer "
                         "siteward-recover@siteward-gateway.service siteward-recover@siteward-sync.service 2>&1")
    assert verify.code == 0 and verify.out.strip() == "", verify
    # the crash-loop recovery (its logic runs under a private systemd in test_crash_loop.py): wired up,
    # and its sandboxed systemctl really reaches PID 1. Recovering a unit that is up changes nothing.
    assert vm.agent.sh("systemctl show -p OnFailure --value siteward-gateway.service").out.strip() == \
        "siteward-recover@siteward-gateway.timer"
    recover = vm.agent.sh("systemctl start siteward-recover@siteward-gateway.service && "
                          "systemctl show -p Result,ExecMainStatus siteward-recover@siteward-gateway.service")
    assert recover.code == 0 and "Result=success" in recover.out and "ExecMainStatus=0" in recover.out, recover
    assert unit_pid(vm, "siteward-gateway.service") == pid
    # "degraded" would name a failed unit; "starting" while Wi-Fi still waits for a radio that is not there
    FIGURES["system_state_at_test"] = vm.agent.sh("systemctl is-system-running").out.strip()
    failed = vm.agent.sh("systemctl --failed --no-legend --plain").out
    FIGURES["failed_units_at_boot"] = failed.strip()


def test_the_card_is_laid_out_for_the_sd_card(vm: VM) -> None:
    # the data partition grew into the extra 512 MiB of the "card"
    df = vm.agent.sh("findmnt -bno SIZE,SOURCE /var/lib/siteward").out.split()
    assert int(df[0]) > 400 * 1024 * 1024, df
    assert vm.agent.sh("findmnt -no FSTYPE /").out.strip() == "ext4"
    assert vm.agent.sh("findmnt -no FSTYPE /boot/firmware").out.strip() == "vfat"
    # the journal lives in RAM
    assert vm.agent.sh("journalctl --header | grep -c '/run/log/journal' || true").out.strip() not in ("", "0")
    assert vm.agent.sh("test -e /var/log/journal && ls /var/log/journal | wc -l || echo 0").out.strip() == "0"
    # nothing of the build machine leaked in
    assert vm.agent.sh("readlink /etc/resolv.conf").out.strip().endswith("stub-resolv.conf")
    # Wi-Fi for a network that is not there: configured, harmless, and the gateway serves on Ethernet
    assert "no-such-network" in vm.agent.sh("cat /etc/wpa_supplicant/wpa_supplicant-wlan0.conf").out
    assert vm.agent.sh("systemctl is-enabled wpa_supplicant@wlan0.service").out.strip() == "enabled"


def test_the_configured_admin_logs_in(vm: VM) -> None:
    status, body, _ = vm.http("/api/v1/login", data={"username": "admin", "password": "wrong password!"},
                              timeout=120)
    assert status == 401, (status, body)
    body = Api(vm).login()
    assert body["role"] == "admin"


def test_mqtt_reading_through_the_forwarded_port_appears_in_the_api(vm: VM, api: Api) -> None:
    status, minted = api.call("/api/v1/devices", {"id": "node-boot", "profiles": ["native"]})
    assert status == 201, (status, minted)
    creds = minted["mqtt"]
    assert publish(vm, creds, "node-boot", [21.5]) == 1
    assert wait_for(lambda: readings(api, "node-boot") == [21.5], 60, "the reading in the API")
    vm.creds = creds  # type: ignore[attr-defined]  # for the tests below


def test_killing_the_gateway_loses_nothing_acknowledged(vm: VM, api: Api) -> None:
    creds = vm.creds  # type: ignore[attr-defined]
    acked = publish(vm, creds, "node-boot", [float(i) for i in range(100, 150)])
    assert acked == 50
    before = unit_pid(vm, "siteward-gateway.service")
    vm.agent.sh(f"kill -9 {before}")
    t0 = time.monotonic()
    after = wait_for(lambda: (p := unit_pid(vm, "siteward-gateway.service")) not in (0, before) and
                     vm.agent.sh("systemctl is-active siteward-gateway.service").out.strip() == "active" and p,
                     300, "systemd to restart the gateway")
    vm.wait_http("/healthz", timeout=300)
    FIGURES["restart_after_kill_s"] = round(time.monotonic() - t0, 1)
    assert after != before
    got = readings(api, "node-boot")
    assert got == [21.5, *[float(i) for i in range(100, 150)]]
    nrestarts = vm.agent.sh("systemctl show -p NRestarts --value siteward-gateway.service").out.strip()
    assert nrestarts == "1"
    # the sync never noticed: it does not depend on the gateway
    assert vm.agent.sh("systemctl is-active siteward-sync.service").out.strip() == "active"


def test_a_full_data_partition_is_reported_and_survived(vm: VM, api: Api) -> None:
    creds = vm.creds  # type: ignore[attr-defined]
    pid = unit_pid(vm, "siteward-gateway.service")
    # fill the card's data partition to the last block the service may use
    fill = vm.agent.sh("fallocate -l $(( $(findmnt -bno AVAIL /var/lib/siteward) )) /var/lib/siteward/filler "
                       "|| dd if=/dev/zero of=/var/lib/siteward/filler bs=1M status=none; "
                       "findmnt -bno AVAIL /var/lib/siteward", timeout=300)
    try:
        assert int(fill.out.split()[-1]) < 64 * 1024 * 1024, fill
        acked = publish(vm, creds, "node-boot", [7.0, 8.0, 9.0], wait_s=20)

        def disk_reported() -> Any:
            status, body, _ = vm.http("/healthz")
            return status == 503 and body if not body["components"]["disk"]["ok"] else None

        body = wait_for(disk_reported, 120, "/healthz to report the full disk")
        assert body["components"]["disk"]["free_bytes"] < 64 * 1024 * 1024
        # still the same process, still serving: a restart would not make room
        assert unit_pid(vm, "siteward-gateway.service") == pid
        stored = [v for v in readings(api, "node-boot") if v in (7.0, 8.0, 9.0)]
        # what was acknowledged is stored; what could not be stored was not acknowledged
        assert len(stored) >= acked
        FIGURES["disk_full_acked"] = acked
    finally:
        vm.agent.sh("rm -f /var/lib/siteward/filler")
    assert publish(vm, creds, "node-boot", [10.0]) == 1
    assert wait_for(lambda: 10.0 in readings(api, "node-boot"), 120, "collection to resume")
    assert unit_pid(vm, "siteward-gateway.service") == pid


def test_idle_figures(vm: VM) -> None:
    time.sleep(20)  # let start-up work settle
    script = r"""
for u in siteward-gateway siteward-sync; do
  p=$(systemctl show -p MainPID --value $u.service)
  echo "$u rss_kb $(awk '/^VmRSS/ {print $2}' /proc/$p/status)"
  echo "$u cpu_ns_0 $(systemctl show -p CPUUsageNSec --value $u.service)"
done
head -1 /proc/stat
sleep 30
for u in siteward-gateway siteward-sync; do
  echo "$u cpu_ns_1 $(systemctl show -p CPUUsageNSec --value $u.service)"
done
head -1 /proc/stat
"""
    out = vm.agent.sh(script, timeout=120).out.splitlines()
    vals: dict[str, dict[str, int]] = {}
    stats = [ln.split()[1:] for ln in out if ln.startswith("cpu ")]
    for ln in out:
        parts = ln.split()
        if len(parts) == 3 and parts[0].startswith("siteward-") and parts[2].isdigit():
            vals.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    busy = [sum(map(int, s)) - int(s[3]) - int(s[4]) for s in stats]
    total = [sum(map(int, s)) for s in stats]
    FIGURES["guest_idle_cpu_percent"] = round(100 * (busy[1] - busy[0]) / max(1, total[1] - total[0]), 1)
    for unit, v in vals.items():
        if "rss_kb" in v:
            FIGURES[f"{unit}_rss_mb"] = round(v["rss_kb"] / 1024, 1)
        if "cpu_ns_0" in v and "cpu_ns_1" in v:  # needs CPU accounting (systemd's default on cgroup v2)
            FIGURES[f"{unit}_cpu_percent_of_one_core"] = round((v["cpu_ns_1"] - v["cpu_ns_0"]) / 30e9 * 100, 2)
    assert FIGURES["siteward-gateway_rss_mb"] < 512  # under MemoryMax with room to spare


def test_a_reboot_keeps_the_data(vm: VM, api: Api) -> None:
    before = readings(api, "node-boot")
    boot_id = vm.agent.sh("cat /proc/sys/kernel/random/boot_id").out.strip()
    t0 = time.monotonic()
    vm.agent.send("guest-shutdown", mode="reboot")  # a clean reboot through systemd

    def rebooted() -> bool:
        try:
            vm.agent.wait_ready(10)
            now = vm.agent.sh("cat /proc/sys/kernel/random/boot_id", timeout=30).out.strip()
        except (OSError, TimeoutError, RuntimeError, ValueError):
            vm.agent.close()
            return False
        return bool(now) and now != boot_id

    wait_for(rebooted, 900, "the guest to come back with a new boot id", step=5)
    vm.wait_http("/healthz", timeout=900)
    FIGURES["reboot_to_healthz_s"] = round(time.monotonic() - t0, 1)
    assert readings(api, "node-boot") == before  # the token survived too: it is in the database
    _, body, _ = vm.http("/healthz")
    assert body["components"]["boot_config"]["state"] == "unchanged"
    assert wait_for(lambda: vm.agent.sh("systemctl is-active siteward-gateway.service siteward-sync.service")
                    .out.split() == ["active", "active"], 300, "both units active after the reboot")


def test_a_broken_boot_config_leaves_setup_mode_with_the_error_shown(image: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    machine = VM(tmp_path / "vm2", image["img"], image["kernel"], image["initrd"], grow_mb=64)
    put_on_boot_partition(machine.disk, {"siteward.toml": "[site]\nname = \"Broken\"\ngateway = \"no good!\"\n"})
    machine.start()
    try:
        machine.wait_http("/healthz", timeout=900)
        status, body, _ = machine.http("/healthz")
        assert status == 503 and body["setup_required"] is True
        problem = body["components"]["boot_config"]
        assert problem["ok"] is False and "site.gateway" in problem["error"]
        status, page, _ = machine.http("/setup")
        assert status == 200 and "Boot configuration problem" in page and "site.gateway" in page
        console = wait_for(lambda: "setup code" in machine.console_text() and ANSI.sub("", machine.console_text()),
                           300, "the setup code on the console")
        assert "BOOT CONFIG PROBLEM" in console
        assert re.search(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", console)
        # the file stays for the installer to fix; nothing looped
        machine.agent.wait_ready(300)
        assert "siteward.toml" in machine.agent.sh("ls /boot/firmware").out.split()
        assert machine.agent.sh("systemctl show -p NRestarts --value siteward-gateway.service").out.strip() == "0"
        assert machine.agent.sh("systemctl is-enabled siteward-sync.service").out.strip() != "enabled"
    finally:
        machine.stop()
    assert "siteward.toml" in list_boot_partition(machine.disk)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(machine.console, ARTIFACTS / "appliance-console-setup-mode.log")
