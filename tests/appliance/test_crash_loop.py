"""Crash loops under a real systemd: the start limit, the back-off and the recovery.

The appliance's units (systemd/) keep a crashing daemon from restarting in a tight loop
(``StartLimitBurst=`` starts in ``StartLimitIntervalSec=``) and then, instead of leaving it down
for good, arm ``siteward-recover@<daemon>.timer`` from ``OnFailure=``; minutes later
``siteward-recover@<daemon>.service`` clears the failure and starts it again.

This runs that logic under a private systemd user manager (the host's own systemd binary;
Debian bookworm has 252, like the image): the units' ``[Unit]`` sections and restart settings
exactly as shipped, a stand-in daemon that crashes on demand instead of Siteward, and two time
spans shortened (``RestartSec=``, the timer's ``OnActiveSec=``) so that a test takes seconds.
What a user manager cannot do (``User=``, the sandbox) is left out here; the boot test runs
the real units under the image's PID 1.

The manager runs in its own mount and cgroup namespaces, in a cgroup made for it, so it sees
and touches nothing of the host's cgroups. Needs root (namespaces, mounts); skipped where the
machine does not allow them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd") if os.access(p, os.X_OK)), None)
GATEWAY, SYNC = "siteward-gateway", "siteward-sync"
RESTART_SEC = "100ms"   # shipped: seconds
BACKOFF_S = 2.0         # shipped: minutes (OnActiveSec= of siteward-recover@.timer)
# the keys of a daemon's [Service] that decide how it is restarted; the rest is sandbox and resources
RESTART_KEYS = {"Type", "NotifyAccess", "Restart", "RestartSec", "TimeoutStartSec", "TimeoutStopSec"}

STAND_IN = r'''
import os, socket, sys, time
name, state = sys.argv[1], sys.argv[2]
with open(os.path.join(state, name + ".starts"), "a") as f:
    f.write(f"{os.getpid()}\n")
if os.path.exists(os.path.join(state, name + ".crash")):
    sys.exit(3)
addr = os.environ["NOTIFY_SOCKET"]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(b"READY=1", "\0" + addr[1:] if addr.startswith("@") else addr)
while True:
    time.sleep(60)
'''

# The manager's sandbox, run by the process that execs into systemd (no fork, so $$ is that
# process): it is alone in a fresh cgroup, whose namespace view replaces /sys/fs/cgroup.
INNER = r'''set -e
mount -t cgroup2 cgroup2 /sys/fs/cgroup
n=0
while read -r p; do n=$((n + 1)); [ "$p" = "$$" ] || exit 97; done < /sys/fs/cgroup/cgroup.procs
[ "$n" = 1 ] || exit 97
if [ ! -d /run/systemd/system ]; then
    if [ -d /run/systemd ]; then mount -t tmpfs -o mode=0755 tmpfs /run/systemd
    else mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/systemd; fi
    mkdir /run/systemd/system
fi
echo SANDBOX-READY
exec "$SITEWARD_SYSTEMD" --user
'''

# what a user manager needs besides our units (service default dependencies, exit on SIGTERM)
BASICS = {
    "default.target": "[Unit]\nDescription=crash-loop test\n",
    "basic.target": "[Unit]\nDescription=Basic System\n",
    "shutdown.target": "[Unit]\nDescription=Shutdown\nDefaultDependencies=no\nRefuseManualStart=yes\n",
    "exit.target": "[Unit]\nDescription=Exit\nDefaultDependencies=no\nRequires=systemd-exit.service\n"
                   "After=systemd-exit.service\n",
    "systemd-exit.service": "[Unit]\nDescription=Exit\nDefaultDependencies=no\nRequires=shutdown.target\n"
                            "After=shutdown.target\nSuccessAction=exit-force\n[Service]\nSlice=-.slice\n",
}


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (a mount and a cgroup namespace for the private systemd)"
    missing = [t for t in ("unshare", "systemctl") if shutil.which(t) is None]
    if SYSTEMD is None:
        missing.append("systemd")
    if missing:
        return f"missing: {', '.join(missing)}"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted"
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies (a timeout, a kill), so that a
    manager whose teardown never ran stops its units and exits anyway."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _remove_cgroup(path: Path) -> None:
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    path.rmdir()


def _remove_stale_cgroups(parent: Path) -> None:
    """Empty cgroups left by earlier runs that died before their teardown (their pytest is gone)."""
    for old in parent.glob("siteward-crash-loop-test-*"):
        owner = old.name.split("-")[4]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                _remove_cgroup(old)


def sections(text: str) -> list[tuple[str, list[str]]]:
    """A unit file as (section, lines) in order, comments and blank lines dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if re.match(r"^\[\w+\]$", line):
            out.append((line[1:-1], []))
        elif line.strip() and not line.lstrip().startswith("#"):
            out[-1][1].append(line)
    return out


def render(parts: list[tuple[str, list[str]]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{ln}\n" for ln in lines) for name, lines in parts)


def replace_key(lines: list[str], key: str, value: str) -> list[str]:
    hits = [i for i, ln in enumerate(lines) if ln.startswith(f"{key}=")]
    assert len(hits) == 1, (key, lines)
    return [f"{key}={value}" if i == hits[0] else ln for i, ln in enumerate(lines)]


def stand_in_units(units: Path, state: Path) -> None:
    """The shipped units as a user manager can run them (see the module's docstring)."""
    src = ROOT / "systemd"
    for daemon in (GATEWAY, SYNC):
        parts = []
        for name, lines in sections((src / f"{daemon}.service").read_text()):
            if name == "Service":
                lines = [ln for ln in lines if ln.split("=", 1)[0] in RESTART_KEYS]
                lines = replace_key(lines, "RestartSec", RESTART_SEC)
                lines.append(f"ExecStart={sys.executable} -I -S {state / 'stand_in.py'} {daemon} {state}")
            if name != "Install":
                parts.append((name, lines))
        (units / f"{daemon}.service").write_text(render(parts))
    timer = [(name, replace_key(replace_key(lines, "OnActiveSec", f"{BACKOFF_S}s"), "AccuracySec", "100ms")
              if name == "Timer" else lines) for name, lines in sections((src / "siteward-recover@.timer").read_text())]
    (units / "siteward-recover@.timer").write_text(render(timer))
    recover = []
    for name, lines in sections((src / "siteward-recover@.service").read_text()):
        if name == "Service":  # a user manager cannot build the sandbox (226/NAMESPACE)
            lines = [ln.replace("/usr/bin/systemctl ", "/usr/bin/systemctl --user ") for ln in lines
                     if ln.split("=", 1)[0] in ("Type", "ExecStart")]
            assert sum("systemctl --user " in ln for ln in lines) == 2, lines
        recover.append((name, lines))
    (units / "siteward-recover@.service").write_text(render(recover))


class UserManager:
    """A private ``systemd --user`` in its own mount and cgroup namespaces."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.units = tmp / "units"
        self.state = tmp / "state"
        self.run = tmp / "run"
        for d in (self.units, self.state):
            d.mkdir()
        self.run.mkdir(mode=0o700)
        (self.state / "stand_in.py").write_text(STAND_IN)
        for name, text in BASICS.items():
            (self.units / name).write_text(text)
        stand_in_units(self.units, self.state)
        cg2 = _cgroup2_mount()
        assert cg2 is not None
        _remove_stale_cgroups(cg2)
        self.cgroup = cg2 / f"siteward-crash-loop-test-{os.getpid()}-{time.monotonic_ns()}"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(tmp),
                    "XDG_RUNTIME_DIR": str(self.run), "XDG_CONFIG_HOME": str(tmp / "config"),
                    "SYSTEMD_UNIT_PATH": str(self.units), "SITEWARD_SYSTEMD": str(SYSTEMD)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.cgroup.mkdir()
        (self.tmp / "inner.sh").write_text(INNER)
        self.log = self.tmp / "manager.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'echo $$ > "{self.cgroup}/cgroup.procs" && exec unshare --mount --cgroup '
                 f'--propagation private sh "{self.tmp}/inner.sh"'],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            res = self.ctl("show", "-p", "SystemState", "--value", check=False)
            if res.returncode == 0 and res.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.1)
        text = self.log.read_text(errors="replace")
        self.close()
        if "SANDBOX-READY" not in text:  # the machine does not allow the namespaces or mounts
            pytest.skip(f"no private systemd here: {text.strip()[-300:] or 'sandbox setup failed'}")
        pytest.fail(f"systemd --user did not come up: {text[-2000:]}")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["systemctl", "--user", "--no-pager", *args], env=self.env,
                             capture_output=True, text=True, timeout=30)
        if check:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def prop(self, unit: str, name: str) -> str:
        return self.ctl("show", "-p", name, "--value", unit).stdout.strip()

    def state_of(self, unit: str) -> str:
        return self.prop(unit, "ActiveState")

    def pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def starts(self, daemon: str) -> int:
        path = self.state / f"{daemon}.starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def crash(self, daemon: str, on: bool = True) -> None:
        flag = self.state / f"{daemon}.crash"
        if on:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def reset(self) -> None:
        """Everything stopped, nothing failed, no flags: each test starts from a clean manager."""
        for d in (GATEWAY, SYNC):
            self.crash(d, on=False)
        self.ctl("stop", f"{GATEWAY}.service", f"{SYNC}.service", f"siteward-recover@{GATEWAY}.timer",
                 f"siteward-recover@{SYNC}.timer", check=False)
        self.ctl("reset-failed", check=False)
        for d in (GATEWAY, SYNC):
            (self.state / f"{d}.starts").unlink(missing_ok=True)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a user manager stops its units and exits
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        # whatever it left behind was started by it: end those processes, then remove the cgroups
        if self.cgroup.exists():
            for _ in range(50):
                pids = [int(p) for f in self.cgroup.rglob("cgroup.procs") for p in f.read_text().split()]
                if not pids:
                    break
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                time.sleep(0.1)
            _remove_cgroup(self.cgroup)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserManager]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    m = UserManager(tmp_path_factory.mktemp("usermgr"))
    try:
        m.start()
        yield m
    finally:
        m.close()


@pytest.fixture()
def mgr(manager: UserManager) -> UserManager:
    manager.reset()
    return manager


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def shipped(unit: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", (ROOT / "systemd" / unit).read_text(), re.M)
    assert m, (unit, key)
    return m.group(1).strip()


BURST = int(shipped("siteward-gateway.service", "StartLimitBurst"))


def failed_after_bursts(mgr: UserManager, daemon: str, bursts: int) -> Callable[[], bool]:
    """True once `bursts` complete bursts of starts have ended in the failed state."""
    return lambda: mgr.starts(daemon) >= bursts * BURST and mgr.state_of(f"{daemon}.service") == "failed"


def test_a_crash_loop_stops_at_the_start_limit_and_is_retried_after_the_back_off(mgr: UserManager) -> None:
    assert int(shipped("siteward-sync.service", "StartLimitBurst")) == BURST
    mgr.crash(GATEWAY)
    mgr.ctl("start", "--no-block", f"{GATEWAY}.service")
    wait_for(failed_after_bursts(mgr, GATEWAY, 1), 30, "the start limit to stop the crash loop")
    # one burst of StartLimitBurst starts, then the unit is failed and its back-off armed
    assert mgr.starts(GATEWAY) == BURST
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "active"
    assert mgr.state_of(f"siteward-recover@{SYNC}.timer") == "inactive"
    # while the back-off runs, nothing starts it: no restart storm
    time.sleep(BACKOFF_S / 2)
    assert mgr.starts(GATEWAY) == BURST and mgr.state_of(f"{GATEWAY}.service") == "failed"
    # the recovery clears the failure and starts it again; still crashing, it gets another burst,
    # fails again, and the (one-shot, unloaded) timer is armed again: it keeps trying
    wait_for(failed_after_bursts(mgr, GATEWAY, 2), 30, "the second burst after the back-off")
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "active"
    assert mgr.prop(f"siteward-recover@{GATEWAY}.service", "Result") == "success"
    # the cause goes away (a full disk emptied, an uplink back, an update): it comes up and stays
    mgr.crash(GATEWAY, on=False)
    wait_for(lambda: mgr.state_of(f"{GATEWAY}.service") == "active", 30, "the gateway to come back")
    bursts, extra = divmod(mgr.starts(GATEWAY), BURST)
    assert bursts >= 2 and extra == 1, mgr.starts(GATEWAY)  # whole bursts, then the start that stuck
    pid = mgr.pid(GATEWAY)
    time.sleep(BACKOFF_S + 0.5)
    assert mgr.pid(GATEWAY) == pid and mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "inactive"


def test_each_daemon_crash_loop_and_recovery_leave_the_other_alone(mgr: UserManager) -> None:
    mgr.ctl("start", f"{GATEWAY}.service")
    gw_pid = mgr.pid(GATEWAY)
    assert gw_pid
    # the sync crash-loops, fails, is recovered, crash-loops again: the gateway never notices
    mgr.crash(SYNC)
    mgr.ctl("start", "--no-block", f"{SYNC}.service")
    wait_for(failed_after_bursts(mgr, SYNC, 2), 30, "two sync bursts and its recovery in between")
    assert mgr.pid(GATEWAY) == gw_pid and mgr.state_of(f"{GATEWAY}.service") == "active"
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "inactive"
    mgr.crash(SYNC, on=False)
    wait_for(lambda: mgr.state_of(f"{SYNC}.service") == "active", 30, "the sync to come back")
    assert mgr.pid(GATEWAY) == gw_pid
    # and the other way round: a gateway crash loop neither stops nor restarts the sync
    sync_pid = mgr.pid(SYNC)
    mgr.crash(GATEWAY)
    os.kill(gw_pid, signal.SIGKILL)
    wait_for(failed_after_bursts(mgr, GATEWAY, 1), 30, "the gateway's start limit")
    assert mgr.pid(SYNC) == sync_pid and mgr.state_of(f"{SYNC}.service") == "active"
    mgr.crash(GATEWAY, on=False)
    wait_for(lambda: mgr.state_of(f"{GATEWAY}.service") == "active", 30, "the gateway to come back")
    assert mgr.pid(SYNC) == sync_pid


def test_an_operator_stop_is_not_undone(mgr: UserManager) -> None:
    # a clean stop is not a failure: nothing is armed
    mgr.ctl("start", f"{GATEWAY}.service")
    mgr.ctl("stop", f"{GATEWAY}.service")
    assert mgr.state_of(f"{GATEWAY}.service") == "inactive"
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "inactive"
    # stopping a unit that is failed and waiting for its recovery cancels the recovery
    mgr.crash(GATEWAY)
    mgr.ctl("start", "--no-block", f"{GATEWAY}.service")
    wait_for(failed_after_bursts(mgr, GATEWAY, 1), 30, "the start limit")
    starts = mgr.starts(GATEWAY)
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "active"
    mgr.ctl("stop", f"{GATEWAY}.service")
    assert mgr.state_of(f"siteward-recover@{GATEWAY}.timer") == "inactive"
    time.sleep(BACKOFF_S + 1)
    assert mgr.starts(GATEWAY) == starts and mgr.state_of(f"{GATEWAY}.service") != "active"
