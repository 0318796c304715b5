"""The unit files: systemd's own verifier and security analysis, and the relations the issue asks for."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted([*(ROOT / "systemd").glob("*.service"), *(ROOT / "systemd").glob("*.timer")])
NAMES = [u.name for u in UNITS]
DAEMONS = ["siteward-gateway.service", "siteward-sync.service"]
# templates are verified as the instances the daemons use
VERIFY = [n for n in NAMES if "@." not in n] + [
    n.replace("@.", f"@{d.removesuffix('.service')}.") for n in NAMES if "@." in n for d in DAEMONS]

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (scripts/test.sh installs systemd)")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the host's systemd units, ours, and the programs they start (as stubs),
    so ``--root`` verification checks our files against a complete unit set."""
    root = tmp_path_factory.mktemp("root")
    units = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    for unit in UNITS:
        shutil.copy(unit, units / unit.name)
    for prog in ("opt/siteward/venv/bin/siteward", "opt/siteward/venv/bin/python",
                 "usr/lib/siteward/grow-data-partition", "usr/bin/systemctl"):
        path = root / prog
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


def unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(ROOT / "systemd" / name)
    return cp


def values(name: str, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps the last; read the text)."""
    text = (ROOT / "systemd" / name).read_text()
    part = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    return [m.group(1).strip() for m in re.finditer(rf"^{re.escape(key)}=(.*)$", part, re.M)]


def test_every_unit_is_there() -> None:
    assert {"siteward-gateway.service", "siteward-sync.service", "siteward-firstboot.service",
            "siteward-recover@.timer", "siteward-recover@.service"} <= set(NAMES)
    assert "siteward-recover@siteward-gateway.timer" in VERIFY and "siteward-recover@siteward-sync.service" in VERIFY


@needs_systemd
@pytest.mark.parametrize("name", VERIFY)
def test_systemd_analyze_verify_passes(fake_root: Path, name: str) -> None:
    res = subprocess.run(["systemd-analyze", "verify", f"--root={fake_root}", name],
                         capture_output=True, text=True, timeout=120)
    # verify reports unknown keys and bad values on stderr but still exits 0: both must be clean
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


@needs_systemd
def test_the_verifier_would_catch_a_mistake(fake_root: Path) -> None:
    bad = fake_root / "usr/lib/systemd/system/siteward-typo.service"
    bad.write_text((ROOT / "systemd/siteward-gateway.service").read_text().replace("NoNewPrivileges", "NoNewPrivilege"))
    res = subprocess.run(["systemd-analyze", "verify", f"--root={fake_root}", bad.name],
                         capture_output=True, text=True, timeout=120)
    bad.unlink()
    assert "Unknown key" in res.stderr


@needs_systemd
@pytest.mark.parametrize("name", [*DAEMONS, "siteward-recover@siteward-gateway.service"])
def test_services_are_hardened(fake_root: Path, name: str) -> None:
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={fake_root}", name],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    # 10 is a root service with no sandbox; systemd calls < 2.5 "OK"
    assert float(m.group(1)) <= 2.5, res.stdout


@pytest.mark.parametrize("name", ["siteward-gateway.service", "siteward-sync.service"])
def test_daemons_are_notify_watchdog_restart_and_limited(name: str) -> None:
    s = unit(name)["Service"]
    assert s["Type"] == "notify"
    assert s["Restart"] == "always"
    assert s["WatchdogSec"]
    assert s["User"] == "siteward" and s["Group"] == "siteward"
    assert s["StateDirectory"] == "siteward"
    assert s["ProtectSystem"] == "strict" and s["PrivateTmp"] == "yes" and s["NoNewPrivileges"] == "yes"
    assert s["CapabilityBoundingSet"] == ""  # no capabilities at all: ports are above 1024
    assert s["MemoryMax"]
    families = set(s["RestrictAddressFamilies"].split())
    assert "AF_UNIX" in families and families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    u = unit(name)["Unit"]
    assert int(u["StartLimitBurst"]) > 1 and u["StartLimitIntervalSec"]


def seconds(span: str) -> float:
    """A systemd time span ("5s", "10min", "1min 30s", "100ms") in seconds."""
    scale = {"ms": 0.001, "s": 1, "sec": 1, "": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * scale[u] for n, u in parts)


@pytest.mark.parametrize("name", DAEMONS)
def test_a_crash_loop_is_bounded_and_then_recovered(name: str) -> None:
    """No restart storm: a burst of at most 10 starts, seconds apart, then the start limit trips
    and the unit fails. It never stays down: its failure arms a back-off timer of minutes
    whose service clears the failure and starts it again. (Run under a real systemd in
    test_crash_loop.py.)"""
    u, s = unit(name)["Unit"], unit(name)["Service"]
    burst, window, pause = int(u["StartLimitBurst"]), seconds(u["StartLimitIntervalSec"]), seconds(s["RestartSec"])
    assert 2 <= burst <= 10 and pause >= 1
    assert burst * pause < window  # a crash loop does trip the limit (else: restarts every RestartSec for ever)
    assert u.get("StartLimitAction", "none") == "none"
    # the failure, and only that, starts the back-off of this very unit (%N: the unit's name)
    assert u["OnFailure"].split() == ["siteward-recover@%N.timer"]
    timer = unit("siteward-recover@.timer")
    assert 60 <= seconds(timer["Timer"]["OnActiveSec"]) <= 30 * 60
    assert timer["Timer"]["RemainAfterElapse"] == "no"  # gone after firing: the next failure arms it again
    assert timer["Timer"].get("Unit") is None  # so: siteward-recover@<daemon>.service
    assert timer["Unit"]["PartOf"] == "%i.service"  # an operator's stop of the daemon cancels its recovery
    assert not re.search(r"^(Persistent|OnBootSec|OnCalendar|WakeSystem)=", (ROOT / "systemd/siteward-recover@.timer")
                         .read_text(), re.M)
    rec = values("siteward-recover@.service", "Service", "ExecStart")
    assert rec == ["/usr/bin/systemctl reset-failed %i.service", "/usr/bin/systemctl start --no-block %i.service"]
    assert unit("siteward-recover@.service")["Service"]["Type"] == "oneshot"
    # nothing installs them on their own: they exist only for OnFailure=
    assert not unit("siteward-recover@.timer").has_section("Install")
    assert not unit("siteward-recover@.service").has_section("Install")


def test_sync_follows_the_gateway_but_can_never_stop_it() -> None:
    sync = unit("siteward-sync.service")["Unit"]
    assert "siteward-gateway.service" in sync["After"].split()
    # no dependency that propagates a stop or failure to the gateway
    for key in ("Requires", "BindsTo", "PartOf", "Requisite", "Conflicts", "PropagatesStopTo",
                "PropagatesReloadTo", "StopPropagatedFrom"):
        assert "siteward-gateway" not in sync.get(key, ""), key
    # its crash loop and back-off start its own recovery only
    assert "gateway" not in sync["OnFailure"] and "%N" in sync["OnFailure"]
    gw = unit("siteward-gateway.service")["Unit"]
    for key in ("Requires", "BindsTo", "PartOf", "Requisite", "Wants", "After", "OnFailure"):
        assert "siteward-sync" not in gw.get(key, ""), key
    # and it yields in every contest for resources
    assert int(unit("siteward-sync.service")["Service"]["OOMScoreAdjust"]) > int(
        unit("siteward-gateway.service")["Service"]["OOMScoreAdjust"])


def test_firstboot_runs_before_the_daemons_without_holding_them_hostage() -> None:
    fb = unit("siteward-firstboot.service")
    assert fb["Service"]["Type"] == "oneshot"
    assert {"siteward-gateway.service", "siteward-sync.service"} <= set(fb["Unit"]["Before"].split())
    gw = unit("siteward-gateway.service")["Unit"]
    assert "siteward-firstboot.service" in gw["Wants"] and "siteward-firstboot.service" in gw["After"]
    assert "siteward-firstboot" not in gw.get("Requires", "")  # its failure must not stop the gateway
    # never a boot loop: nothing reboots the machine
    for name in NAMES:
        text = (ROOT / "systemd" / name).read_text()
        assert not re.search(r"^(FailureAction|SuccessAction|StartLimitAction|JobTimeoutAction)=reboot", text, re.M)


def test_the_gateway_may_read_the_clock_sync_state() -> None:
    # the clock monitor calls adjtimex(2): allowed by name, while ProtectClock would deny it
    assert "adjtimex" in values("siteward-gateway.service", "Service", "SystemCallFilter")
    assert unit("siteward-gateway.service")["Service"].get("ProtectClock") is None
