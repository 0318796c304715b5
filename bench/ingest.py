"""Ingest benchmark: Siteward's durable QoS 1 ingest against bare amqtt and mosquitto.

    python -m bench.ingest [--quick] [--json-only] [--keep] [--py-spy DIR]

Every broker under test runs in its own process; the load generator (bench.mqttload)
runs in another, and the reference subscriber in a third, so that nothing measured
shares an interpreter with what measures it. See bench/README.md for what each figure
means. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.amqtt_bare import PLUGINS as AMQTT_PLUGINS
from bench.mqttload import (
    PublisherSpec,
    SubscriberSpec,
    count_at,
    publisher_main,
    subscriber_main,
)

HOST = "127.0.0.1"
MOSQUITTO = "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRICS_PER_MSG = 3
TARGETS = {
    "durable_vs_amqtt": (">=", 1.0),
    "p99_puback_ms": ("<=", 50.0),
    "rss_mb_200_clients": ("<=", 80.0),
    "bytes_written_per_reading": ("<=", 300.0),
}
# Per-device rate limits raised so the limiter (tested elsewhere) does not throttle a
# benchmark whose whole point is to find the ingest ceiling.
BENCH_RATE_LIMIT = 1_000_000.0


@dataclass
class Plan:
    clients: int = 100
    idle_clients: int = 200
    window: int = 16
    rate: float = 1000.0
    rounds: int = 2
    full_warmup_s: float = 3.0
    full_s: float = 10.0
    paced_warmup_s: float = 3.0
    # three of the gateway's 60 s maintenance intervals and a little: the window holds three
    # outbox -> history merges, the case that once set the p99, and its bytes per reading
    # pay for the merges of nearly all of its own readings (docs/performance.md)
    paced_s: float = 185.0
    sweep_warmup_s: float = 3.0
    sweep_s: float = 10.0
    sweep_ms: list[float] = field(
        default_factory=lambda: [0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1000.0])
    commit_interval_ms: float | None = None  # None: the default of the code under test
    # context figures (mosquitto without its in-flight limit, bare amqtt RSS and on uvloop);
    # off in --quick, where their keys are null
    extras: bool = True
    source: str = "worktree"
    # below mosquitto's default max_queued_messages (1000) + max_inflight_messages (20),
    # so a gated run never makes it drop
    gate_limit: int = 800

    @classmethod
    def quick(cls) -> Plan:
        return cls(rounds=1, full_warmup_s=1.0, full_s=2.0, paced_warmup_s=1.0, paced_s=3.0,
                   sweep_warmup_s=1.0, sweep_s=2.0, sweep_ms=[100.0], extras=False)


class Out:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


# -- /proc ------------------------------------------------------------------------------

def proc_write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/<pid>/io")


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        # the command name may contain spaces; fields after it are fixed
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    p = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def pick_workdir_parent() -> Path:
    # write_bytes counts only what reaches a block device: tmpfs would report 0 bytes
    for cand in (os.environ.get("TMPDIR"), "/var/tmp", tempfile.gettempdir()):
        if cand and Path(cand).is_dir() and fs_type(Path(cand)) not in ("tmpfs", "ramfs"):
            return Path(cand)
    return Path(tempfile.gettempdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log_file: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening{_tail(log_file)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s{_tail(log_file)}")


def _tail(log_file: Path | None, n: int = 25) -> str:
    if log_file is None or not log_file.exists():
        return ""
    lines = log_file.read_text(errors="replace").splitlines()[-n:]
    return "\n--- server log (tail) ---\n" + "\n".join(lines)


class Server:
    """A broker under test, in its own process, stopped by SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], port: int, log_file: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 also_wait: tuple[int, ...] = ()) -> None:
        self.name = name
        self.port = port
        self.also_wait = also_wait
        self.log_file = log_file
        self._log = open(log_file, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        for port in (self.port, *self.also_wait):
            wait_port(port, self.proc, timeout, self.log_file)
        # a server can open its MQTT port and then die starting a later part (seen: the
        # web app failing to import while the tree was being edited)
        time.sleep(0.5)
        self.check()

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}{_tail(self.log_file)}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def running(server: Server, timeout: float = 60.0) -> Iterator[Server]:
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


# -- driving the load processes ---------------------------------------------------------

_MP = mp.get_context("spawn")


def _drive(spec: PublisherSpec, on_mark: Callable[[str, float], None], timeout: float,
           delivered: Any = None) -> dict[str, Any]:
    parent, child = _MP.Pipe()
    proc = _MP.Process(target=publisher_main, args=(child, spec, delivered), daemon=True)
    proc.start()
    child.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not parent.poll(left):
                raise RuntimeError(f"load generator gave no answer within {timeout:.0f}s")
            try:
                msg = parent.recv()
            except EOFError:
                raise RuntimeError(f"load generator died (exit code {proc.exitcode})") from None
            if msg[0] == "mark":
                on_mark(msg[1], msg[2])
            elif msg[0] == "result":
                return dict(msg[1])
            elif msg[0] == "error":
                raise RuntimeError(f"load generator failed: {msg[1]}")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()


class _SubscriberProc:
    def __init__(self, spec: SubscriberSpec) -> None:
        self.delivered = _MP.RawValue("q", 0)
        self.conn, child = _MP.Pipe()
        self.proc = _MP.Process(target=subscriber_main, args=(child, spec, self.delivered), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(20):
            self.kill()
            raise RuntimeError("subscriber did not subscribe within 20s")
        try:
            msg = self.conn.recv()
        except EOFError:
            msg = ("error", f"died (exit code {self.proc.exitcode})")
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"subscriber failed: {msg[1]}")

    def finish(self) -> dict[str, Any]:
        try:
            self.conn.send("stop")
            if not self.conn.poll(20):
                raise RuntimeError("subscriber did not report")
            try:
                msg = self.conn.recv()
            except EOFError:
                msg = ("error", f"died (exit code {self.proc.exitcode})")
            if msg[0] != "result":
                raise RuntimeError(f"subscriber failed: {msg[1]}")
            return dict(msg[1])
        finally:
            self.kill()

    def kill(self) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _cpu_marks(pid: int) -> tuple[dict[str, float], Callable[[str, float], None]]:
    marks: dict[str, float] = {}

    def on_mark(name: str, t: float) -> None:
        marks[name] = t
        marks[name + "_cpu"] = proc_cpu_s(pid)

    return marks, on_mark


def anonymous_clients(n: int) -> list[tuple[str, str | None, str | None]]:
    return [(f"bench-{i:03d}", None, None) for i in range(n)]


# -- references: publish -> subscribe routing, no storage -------------------------------

def reference(name: str, server: Server, plan: Plan, out: Out) -> dict[str, Any]:
    """Full-speed publishers, one QoS 1 subscriber on devices/+/telemetry; rate = delivered/s."""
    with running(server):
        sub = _SubscriberProc(SubscriberSpec(HOST, server.port))
        try:
            marks, on_mark = _cpu_marks(server.pid)
            spec = PublisherSpec(HOST, server.port, anonymous_clients(plan.clients), "full",
                                 window=plan.window, warmup_s=plan.full_warmup_s, duration_s=plan.full_s,
                                 gate_limit=plan.gate_limit)
            pub = _drive(spec, on_mark, plan.full_warmup_s + plan.full_s + 120, sub.delivered)
        finally:
            subres = sub.finish()
    span = pub["t_end"] - pub["t_start"]
    delivered = count_at(subres["timeline"], pub["t_end"]) - count_at(subres["timeline"], pub["t_start"])
    r = {
        "broker": name,
        "delivered_per_s": delivered / span,
        "published_acked_per_s": pub["acked_per_s"],
        "publish_latency_p50_ms": pub["latency"]["p50_ms"],
        "publish_latency_p99_ms": pub["latency"]["p99_ms"],
        "delivered_total": subres["received"],
        "broker_cpu_fraction": (marks["end_cpu"] - marks["start_cpu"]) / span,
        "loadgen_cpu_fraction": pub["loadgen_cpu_fraction"],
        "subscriber_lost_connection": subres["lost_connection"],
        "clients": pub["clients"],
        "window_s": span,
    }
    out(f"  {name}: delivered {r['delivered_per_s']:,.0f} msg/s to the subscriber; publishers acked "
        f"{r['published_acked_per_s']:,.0f}/s; broker CPU {r['broker_cpu_fraction']:.0%}, "
        f"load generator CPU {r['loadgen_cpu_fraction']:.0%}")
    return r


def reference_idle_rss(server: Server, plan: Plan, out: Out) -> dict[str, Any]:
    """RSS of a bare broker holding the same number of idle connections (context for Siteward's)."""
    with running(server):
        before = proc_status_kb(server.pid, "VmRSS") / 1024
        at: dict[str, float] = {}

        def on_mark(name: str, t: float) -> None:
            at["rss_kb"] = proc_status_kb(server.pid, "VmRSS")

        spec = PublisherSpec(HOST, server.port, anonymous_clients(plan.idle_clients), "idle", hold_s=3.0)
        res = _drive(spec, on_mark, 120)
    r = {"rss_mb_no_clients": before, "rss_mb_idle_clients": at["rss_kb"] / 1024, "clients": res["clients"]}
    out(f"  {server.name}: RSS {before:.1f} MB with no clients, {r['rss_mb_idle_clients']:.1f} MB with "
        f"{res['clients']} idle clients")
    return r


def loadgen_ceiling(work: Path, plan: Plan, out: Out) -> dict[str, Any]:
    """The load generator's own ceiling: ungated, no subscriber, against mosquitto."""
    server = mosquitto_server(work)
    with running(server):
        marks, on_mark = _cpu_marks(server.pid)
        spec = PublisherSpec(HOST, server.port, anonymous_clients(plan.clients), "full", window=plan.window,
                             warmup_s=plan.full_warmup_s, duration_s=plan.full_s)
        pub = _drive(spec, on_mark, plan.full_warmup_s + plan.full_s + 120)
    span = pub["t_end"] - pub["t_start"]
    r = {"acked_per_s": pub["acked_per_s"], "loadgen_cpu_fraction": pub["loadgen_cpu_fraction"],
         "broker_cpu_fraction": (marks["end_cpu"] - marks["start_cpu"]) / span}
    out(f"  load generator ceiling: {r['acked_per_s']:,.0f} QoS 1 publishes acked/s by mosquitto "
        f"(load generator CPU {r['loadgen_cpu_fraction']:.0%}, mosquitto {r['broker_cpu_fraction']:.0%})")
    return r


def mosquitto_server(work: Path, unbounded_inflight: bool = False) -> Server:
    port = free_port()
    name = "mosquitto-inflight0" if unbounded_inflight else "mosquitto"
    conf = work / f"{name}.conf"
    # only what the comparison needs; everything else is mosquitto's default (in particular
    # max_inflight_messages 20 and max_queued_messages 1000 per client)
    extra = "max_inflight_messages 0\n" if unbounded_inflight else ""
    conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                    f"log_dest stderr\nlog_type error\nlog_type warning\n{extra}")
    return Server(name, [MOSQUITTO, "-c", str(conf)], port, work / f"{name}.log")


def amqtt_server(work: Path, uvloop: bool = False) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.amqtt_bare", "--port", str(port)]
    if uvloop:
        argv.append("--uvloop")
    name = "amqtt-uvloop" if uvloop else "amqtt"
    return Server(name, argv, port, work / f"{name}.log", cwd=REPO)


# -- Siteward ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=False).stdout.strip()


def _compile(src: Path) -> Path:
    # Byte-compile as an install would: compiling on first import costs the gateway process
    # several MB of heap that stays in its RSS, which a deployed gateway does not pay.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=False,
                   stdout=subprocess.DEVNULL)
    return src


def snapshot_source(work: Path, source: str) -> tuple[Path, str]:
    """Copy the gateway's packages so every gateway start in this run uses the same code.

    Other people edit the tree while a run lasts minutes; without a snapshot one sweep
    point could measure different code than the next (or a half-written module).
    ``source`` is "worktree" (the files as they are now) or a git revision.
    """
    src = work / "src"
    src.mkdir(parents=True)
    pkgs = [p for p in ("gateway", "cloud_sync", "firmware") if (REPO / p).is_dir()]
    if source == "worktree":
        for pkg in pkgs:
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        dirty = _git("status", "--porcelain", "--", *pkgs)
        label = _git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
        return _compile(src), label
    rev = _git("rev-parse", "--short", source)
    if not rev:
        raise RuntimeError(f"unknown git revision {source!r}")
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "--", *pkgs],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    return _compile(src), rev


def _src_env(src: Path) -> dict[str, str]:
    # cwd = src puts the snapshot first on sys.path; REPO after it only provides bench
    env = dict(os.environ)
    env.pop("SITEWARD_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Site:
    """One Siteward data dir with minted device credentials, reused across restarts."""

    work: Path
    data: Path
    creds: list[tuple[str, str | None, str | None]]
    src: Path  # source snapshot the gateway runs from
    default_commit_interval_ms: float

    @property
    def db(self) -> Path:
        return self.data / "siteward.db"


def make_site(work: Path, src: Path, n_devices: int) -> Site:
    """Mint per-device credentials with the project's own code path, before the gateway runs."""
    data = work / "siteward-data"
    proc = subprocess.run([sys.executable, "-m", "bench.isolated", "bench.mint", str(data), str(n_devices)],
                          cwd=src, env=_src_env(src), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"minting credentials with the code under test failed:\n{proc.stderr[-2000:]}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    creds = [(c[0], c[1], c[2]) for c in answer["creds"]]
    return Site(work, data, creds, src, float(answer["commit_interval_ms"]))


def siteward_server(site: Site, commit_interval_ms: float, tag: str) -> tuple[Server, int]:
    port, web_port = free_port(), free_port()
    cfg = site.work / f"siteward-{tag}.toml"
    cfg.write_text(
        "[gateway]\n"
        f'data_dir = "{site.data}"\n'
        'id = "gw-bench"\n'
        "[broker]\n"
        f'host = "{HOST}"\n'
        f"port = {port}\n"
        "allow_anonymous = false\n"
        f"rate_limit_per_s = {BENCH_RATE_LIMIT}\n"
        f"rate_limit_burst = {int(BENCH_RATE_LIMIT)}\n"
        "[store]\n"
        f"commit_interval_ms = {commit_interval_ms}\n"
        "[web]\n"
        f'host = "{HOST}"\n'
        f"port = {web_port}\n"
        f'admin_password = "{secrets.token_urlsafe(16)}"\n'
        "[time]\n"
        'source = "assume_synced"\n'
        "[logging]\n"
        'level = "warning"\n'
        'format = "json"\n'
    )
    argv = [sys.executable, "-m", "bench.isolated", "gateway.cli", "--config", str(cfg), "gateway"]
    # the web app starts last: when it answers, everything before it has started too
    srv = Server(f"siteward-{tag}", argv, port, site.work / f"siteward-{tag}.log", env=_src_env(site.src),
                 cwd=site.src, also_wait=(web_port,))
    return srv, web_port


def db_max_id(db: Path) -> int:
    # read-only, separate connection: touches nothing the gateway's write_bytes counts
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0])
    finally:
        conn.close()


def scrape_metrics(web_port: int) -> dict[str, float]:
    """Prometheus text from the gateway, flattened; empty if /metrics is not reachable."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{web_port}/metrics", timeout=3) as resp:
            text = resp.read().decode()
    except Exception:
        return {}
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            vals[name] = float(value)
    return vals


def _metric_delta(a: dict[str, float], b: dict[str, float], prefix: str) -> dict[str, float]:
    # histogram buckets would triple the JSON for nothing the counts and sums do not say
    return {k: b[k] - a.get(k, 0.0) for k in b
            if k.startswith(prefix) and "_bucket{" not in k and b[k] != a.get(k, 0.0)}


class _GatewayMarks:
    """Samples the gateway process at the load generator's window edges."""

    def __init__(self, server: Server, site: Site, web_port: int) -> None:
        self.server, self.site, self.web_port = server, site, web_port
        self.at: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, t: float) -> None:
        pid = self.server.pid
        self.at[name] = {"t": t, "cpu": proc_cpu_s(pid), "wb": proc_write_bytes(pid),
                         "rss_kb": proc_status_kb(pid, "VmRSS"), "max_id": db_max_id(self.site.db),
                         "metrics": scrape_metrics(self.web_port)}

    def delta(self) -> dict[str, Any]:
        a, b = self.at["start"], self.at["end"]
        span = b["t"] - a["t"]
        readings = b["max_id"] - a["max_id"]
        ma, mb = a["metrics"], b["metrics"]
        prefix = 'siteward_commit_seconds_bucket{le="'
        # cumulative bucket counts -> "commits that took at most <le> ms", for the tail analysis
        hist = {f"le_{float(k[len(prefix):-2]) * 1000:g}ms" if "Inf" not in k else "all":
                mb[k] - ma.get(k, 0.0) for k in mb if k.startswith(prefix)}
        n_commits = mb.get("siteward_commit_seconds_count", 0.0) - ma.get("siteward_commit_seconds_count", 0.0)
        commit_sum = mb.get("siteward_commit_seconds_sum", 0.0) - ma.get("siteward_commit_seconds_sum", 0.0)
        return {
            "commits": n_commits,
            "commit_ms_mean": (commit_sum / n_commits * 1000) if n_commits else None,
            "commit_seconds_hist": hist,
            "span_s": span,
            "readings": readings,
            "readings_per_s": readings / span,
            "write_bytes": b["wb"] - a["wb"],
            "bytes_per_reading": (b["wb"] - a["wb"]) / readings if readings else float("nan"),
            "gateway_cpu_fraction": (b["cpu"] - a["cpu"]) / span,
            "rss_mb_end": b["rss_kb"] / 1024,
            "metrics_delta": _metric_delta(a["metrics"], b["metrics"], "siteward_"),
        }


def siteward_idle_rss(server: Server, site: Site, plan: Plan, out: Out) -> dict[str, Any]:
    rss_before = proc_status_kb(server.pid, "VmRSS") / 1024
    at: dict[str, float] = {}

    def on_mark(name: str, t: float) -> None:
        at["rss_kb"] = proc_status_kb(server.pid, "VmRSS")
        at["hwm_kb"] = proc_status_kb(server.pid, "VmHWM")

    spec = PublisherSpec(HOST, server.port, site.creds[:plan.idle_clients], "idle", hold_s=3.0)
    res = _drive(spec, on_mark, 120)
    if res["clients"] < plan.idle_clients:
        server.check()
        raise RuntimeError(f"only {res['clients']} of {plan.idle_clients} idle clients connected")
    r = {"rss_mb_before_clients": rss_before, "rss_mb_200_clients": at["rss_kb"] / 1024,
         "vmhwm_mb": at["hwm_kb"] / 1024, "clients": res["clients"], "connect_s": res["connect_s"]}
    out(f"  RSS {r['rss_mb_before_clients']:.1f} MB with no clients, {r['rss_mb_200_clients']:.1f} MB "
        f"with {res['clients']} idle clients (connected in {res['connect_s']:.1f}s)")
    return r


def siteward_full(server: Server, site: Site, web_port: int, plan: Plan, out: Out,
                  py_spy: Path | None = None, tag: str = "") -> dict[str, Any]:
    marks = _GatewayMarks(server, site, web_port)
    spy: subprocess.Popen[bytes] | None = None

    def on_mark(name: str, t: float) -> None:
        nonlocal spy
        marks(name, t)
        if name == "start" and py_spy is not None:
            spy = start_py_spy(server.pid, py_spy / f"full{tag}", plan.full_s)

    spec = PublisherSpec(HOST, server.port, site.creds[:plan.clients], "full", window=plan.window,
                         warmup_s=plan.full_warmup_s, duration_s=plan.full_s)
    pub = _drive(spec, on_mark, plan.full_warmup_s + plan.full_s + 120)
    if spy is not None:
        finish_py_spy(spy, out)
    if pub["clients"] < plan.clients:
        server.check()
        raise RuntimeError(f"only {pub['clients']} of {plan.clients} clients connected to Siteward")
    g = marks.delta()
    r = {
        "durable_msgs_per_s": pub["acked_per_s"],
        "readings_stored_per_s": g["readings_per_s"],
        "puback_p50_ms": pub["latency"]["p50_ms"],
        "puback_p99_ms": pub["latency"]["p99_ms"],
        "gateway_cpu_fraction": g["gateway_cpu_fraction"],
        "loadgen_cpu_fraction": pub["loadgen_cpu_fraction"],
        "bytes_per_reading": g["bytes_per_reading"],
        "rss_mb_end": g["rss_mb_end"],
        "unacked_at_end": pub.get("unacked_at_end"),
        "lost_connections": pub.get("lost_connections"),
        "gateway_metrics_delta": g["metrics_delta"],
        "window_s": g["span_s"],
    }
    out(f"  siteward full speed: {r['durable_msgs_per_s']:,.0f} durable msg/s "
        f"({r['readings_stored_per_s']:,.0f} readings/s stored), PUBACK p50 {r['puback_p50_ms']:.1f} ms "
        f"p99 {r['puback_p99_ms']:.1f} ms, gateway CPU {r['gateway_cpu_fraction']:.0%}, "
        f"load generator CPU {r['loadgen_cpu_fraction']:.0%}")
    return r


def siteward_paced(server: Server, site: Site, web_port: int, plan: Plan, out: Out,
                   warmup_s: float, duration_s: float) -> dict[str, Any]:
    marks = _GatewayMarks(server, site, web_port)
    spec = PublisherSpec(HOST, server.port, site.creds[:plan.clients], "paced", window=plan.window,
                         rate=plan.rate, warmup_s=warmup_s, duration_s=duration_s)
    pub = _drive(spec, marks, warmup_s + duration_s + 120)
    if pub["clients"] < plan.clients:
        server.check()
        raise RuntimeError(f"only {pub['clients']} of {plan.clients} clients connected to Siteward")
    g = marks.delta()
    commits = g["metrics_delta"].get("siteward_commit_seconds_count")
    r = {
        "target_msgs_per_s": plan.rate,
        "acked_msgs_per_s": pub["acked_per_s"],
        "p50_ms": pub["latency"]["p50_ms"],
        "p90_ms": pub["latency"]["p90_ms"],
        "p99_ms": pub["latency"]["p99_ms"],
        "p999_ms": pub["latency"]["p999_ms"],
        "max_ms": pub["latency"]["max_ms"],
        "samples": pub["latency"]["n"],
        "readings": g["readings"],
        "write_bytes": g["write_bytes"],
        "bytes_per_reading": g["bytes_per_reading"],
        "commits_per_s": (commits / g["span_s"]) if commits else None,
        "commit_ms_mean": g["commit_ms_mean"],
        "commit_seconds_hist": g["commit_seconds_hist"],
        "gateway_cpu_fraction": g["gateway_cpu_fraction"],
        "loadgen_schedule_lag_p99_ms": pub.get("schedule_lag_p99_ms"),
        # a merge in the window is the case the history file exists for (docs/performance.md)
        "history_merged_readings": g["metrics_delta"].get("siteward_history_merged_total", 0.0),
        "history_merges": g["metrics_delta"].get("siteward_history_merge_seconds_count", 0.0),
        "window_s": g["span_s"],
    }
    return r


def start_py_spy(pid: int, out_base: Path, duration: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    out_base.parent.mkdir(parents=True, exist_ok=True)
    # raw collapsed stacks: greppable, and flamegraph.pl / speedscope read them
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(max(1, int(duration))),
                             "-r", "200", "--threads", "--format", "raw", "-o", f"{out_base}.txt"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_py_spy(proc: subprocess.Popen[bytes], out: Out) -> None:
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    out(f"  py-spy finished (rc={proc.returncode})")


# -- the run ----------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _round(v: Any, nd: int = 2) -> Any:
    if isinstance(v, float):
        return round(v, nd)
    if isinstance(v, dict):
        return {k: _round(x, nd) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x, nd) for x in v]
    return v


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run(plan: Plan, out: Out, work: Path, py_spy: Path | None) -> dict[str, Any]:
    t_all = time.monotonic()
    load_start = loadavg()
    durations: dict[str, float] = {}
    res: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            return fn()
        finally:
            durations[name] = durations.get(name, 0.0) + time.monotonic() - t

    out(f"load average {load_start[0]:.1f} on {os.cpu_count()} CPUs")
    out(f"work dir {work} ({fs_type(work)}); {plan.clients} clients, window {plan.window}, "
        f"QoS 1, {METRICS_PER_MSG} metrics/message; full speed {plan.full_warmup_s:g}+{plan.full_s:g}s "
        f"x{plan.rounds} rounds")

    src, res["source"] = snapshot_source(work, plan.source)
    out(f"gateway source: {res['source']} (snapshot in {src})")
    out("minting device credentials")
    site = timed("mint_credentials", lambda: make_site(work, src, max(plan.clients, plan.idle_clients)))
    commit_ms = plan.commit_interval_ms
    if commit_ms is None:
        commit_ms = plan.commit_interval_ms = site.default_commit_interval_ms

    out(f"siteward: starting gateway (commit_interval_ms={commit_ms:g}, per-device rate "
        f"limit raised to {BENCH_RATE_LIMIT:g}/s so it cannot throttle)")
    gw, web_port = siteward_server(site, commit_ms, "main")
    rounds: list[dict[str, Any]] = []
    with running(gw):
        out(f"siteward: RSS with {plan.idle_clients} idle connected clients")
        res["rss"] = timed("siteward_rss", lambda: siteward_idle_rss(gw, site, plan, out))
        for r in range(plan.rounds):
            out(f"round {r + 1}/{plan.rounds}")
            rd: dict[str, Any] = {}
            rd["mosquitto"] = timed("mosquitto_full", lambda: reference(
                "mosquitto", mosquitto_server(work), plan, out))
            if plan.extras:
                rd["mosquitto_inflight0"] = timed("mosquitto_inflight0_full", lambda: reference(
                    "mosquitto (max_inflight_messages 0)", mosquitto_server(work, True), plan, out))
            rd["amqtt"] = timed("amqtt_full", lambda: reference("amqtt", amqtt_server(work), plan, out))
            rd["siteward"] = timed("siteward_full", lambda r=r: siteward_full(
                gw, site, web_port, plan, out, py_spy=py_spy if r == 0 else None, tag=str(r)))
            rounds.append(rd)
        if plan.extras:
            out(f"bare amqtt: RSS with {plan.idle_clients} idle connected clients")
            res["amqtt_rss"] = timed("amqtt_rss", lambda: reference_idle_rss(amqtt_server(work), plan, out))
        out("load generator ceiling (mosquitto, no subscriber, ungated)")
        res["ceiling"] = timed("loadgen_ceiling", lambda: loadgen_ceiling(work, plan, out))
        if plan.extras:
            out("extra reference: bare amqtt on uvloop (Siteward runs on uvloop)")
            res["amqtt_uvloop"] = timed("amqtt_uvloop_full", lambda: reference(
                "amqtt-uvloop", amqtt_server(work, uvloop=True), plan, out))
        out(f"siteward: fixed {plan.rate:g} msg/s for {plan.paced_s:g}s")
        paced = timed("siteward_paced", lambda: siteward_paced(
            gw, site, web_port, plan, out, plan.paced_warmup_s, plan.paced_s))
        out(f"  acked {paced['acked_msgs_per_s']:,.0f} msg/s, PUBACK p50 {paced['p50_ms']:.1f} ms p99 "
            f"{paced['p99_ms']:.1f} ms, {paced['bytes_per_reading']:.0f} bytes written/reading, "
            f"{paced['history_merges']:.0f} history merge(s) of {paced['history_merged_readings']:,.0f} "
            "readings in the window")
        res["rss_after_load_mb"] = proc_status_kb(gw.pid, "VmRSS") / 1024
        res["vmhwm_after_load_mb"] = proc_status_kb(gw.pid, "VmHWM") / 1024

    sweep: list[dict[str, Any]] = []
    for ms in plan.sweep_ms:
        out(f"sweep: commit_interval_ms={ms:g} at {plan.rate:g} msg/s")
        srv, wp = siteward_server(site, ms, f"sweep{ms:g}")
        with running(srv):
            # a restart: the admin exists already, so this is RSS without first-start work
            rss_start = proc_status_kb(srv.pid, "VmRSS") / 1024
            s = timed("sweep", lambda srv=srv, wp=wp: siteward_paced(
                srv, site, wp, plan, out, plan.sweep_warmup_s, plan.sweep_s))
        s["commit_interval_ms"] = ms
        s["rss_mb_at_start"] = rss_start
        sweep.append(s)
        out(f"  p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
            f"{s['bytes_per_reading']:.0f} bytes/reading, commits/s {s['commits_per_s'] or float('nan'):.0f}")

    mosq = [rd["mosquitto"]["delivered_per_s"] for rd in rounds]
    amq = [rd["amqtt"]["delivered_per_s"] for rd in rounds]
    sw = [rd["siteward"]["durable_msgs_per_s"] for rd in rounds]
    swr = [rd["siteward"]["readings_stored_per_s"] for rd in rounds]
    durable, amqtt_rate = _mean(sw), _mean(amq)
    summary: dict[str, Any] = {
        "durable_msgs_per_s": durable,
        "durable_readings_per_s": _mean(swr),
        "amqtt_bare_msgs_per_s": amqtt_rate,
        "mosquitto_msgs_per_s": _mean(mosq),
        "mosquitto_inflight_unlimited_msgs_per_s": _mean(
            [rd["mosquitto_inflight0"]["delivered_per_s"] for rd in rounds if "mosquitto_inflight0" in rd])
        if plan.extras else None,
        "durable_vs_amqtt": durable / amqtt_rate if amqtt_rate else float("nan"),
        # each round runs the references right before Siteward, so a per-round ratio is the
        # least disturbed by a neighbour's load coming and going
        "durable_vs_amqtt_per_round": [rd["siteward"]["durable_msgs_per_s"] / rd["amqtt"]["delivered_per_s"]
                                       for rd in rounds],
        "p50_puback_ms": paced["p50_ms"],
        "p99_puback_ms": paced["p99_ms"],
        "fixed_rate_msgs_per_s": plan.rate,
        "fixed_rate_acked_msgs_per_s": paced["acked_msgs_per_s"],
        "rss_mb_200_clients": res["rss"]["rss_mb_200_clients"],
        "bytes_written_per_reading": paced["bytes_per_reading"],
        "commit_interval_ms": plan.commit_interval_ms,
        "durable_full_speed_p99_puback_ms": _mean([rd["siteward"]["puback_p99_ms"] for rd in rounds]),
        "gateway_cpu_fraction_full_speed": _mean([rd["siteward"]["gateway_cpu_fraction"] for rd in rounds]),
        "loadgen_ceiling_msgs_per_s": res["ceiling"]["acked_per_s"],
        "loadgen_cpu_fraction_at_ceiling": res["ceiling"]["loadgen_cpu_fraction"],
        "loadgen_cpu_fraction_siteward_full_speed": _mean(
            [rd["siteward"]["loadgen_cpu_fraction"] for rd in rounds]),
        "rss_mb_idle_no_clients": res["rss"]["rss_mb_before_clients"],
        "amqtt_bare_rss_mb_200_clients": res["amqtt_rss"]["rss_mb_idle_clients"] if "amqtt_rss" in res else None,
        "amqtt_bare_rss_mb_no_clients": res["amqtt_rss"]["rss_mb_no_clients"] if "amqtt_rss" in res else None,
        "rss_mb_after_load": res["rss_after_load_mb"],
        "vmhwm_mb_after_load": res["vmhwm_after_load_mb"],
    }
    summary["amqtt_bare_uvloop_msgs_per_s"] = summary["durable_vs_amqtt_uvloop"] = None
    if "amqtt_uvloop" in res:
        u = res["amqtt_uvloop"]["delivered_per_s"]
        summary["amqtt_bare_uvloop_msgs_per_s"] = u
        summary["durable_vs_amqtt_uvloop"] = durable / u if u else float("nan")
    summary["targets"] = {
        k: {"target": f"{op} {lim:g}", "measured": summary[k],
            "met": (summary[k] >= lim) if op == ">=" else (summary[k] <= lim)}
        for k, (op, lim) in TARGETS.items()
    }
    summary["commit_sweep"] = [
        {k: s[k] for k in ("commit_interval_ms", "p50_ms", "p99_ms", "p999_ms", "bytes_per_reading",
                           "commits_per_s", "commit_ms_mean", "acked_msgs_per_s", "gateway_cpu_fraction",
                           "rss_mb_at_start")}
        for s in sweep
    ]
    summary["gateway_source"] = res["source"]
    summary["setup"] = {
        "clients": plan.clients, "idle_clients": plan.idle_clients, "window_per_client": plan.window,
        "qos": 1, "metrics_per_message": METRICS_PER_MSG, "rounds": plan.rounds,
        "full_speed_window_s": plan.full_s, "fixed_rate_window_s": plan.paced_s,
        "siteward_rate_limit_per_s": BENCH_RATE_LIMIT,
        "amqtt_plugins": list(AMQTT_PLUGINS), "amqtt_loop": "asyncio (stdlib)",
        "mosquitto": "defaults + loopback listener, allow_anonymous true, persistence false; "
                     "variant: max_inflight_messages 0",
        "reference_gate_limit": plan.gate_limit,
        "cpus": os.cpu_count(), "fs": fs_type(work),
        # everything here is relative to a machine others share: this says how busy it was
        "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": loadavg(),
    }
    summary["rounds"] = rounds
    summary["fixed_rate_detail"] = paced
    summary["durations_s"] = {**durations, "total": time.monotonic() - t_all}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (seconds, not minutes)")
    ap.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, database)")
    ap.add_argument("--rounds", type=int, default=None, help="full-speed rounds (default 2, quick 1)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the commit-interval sweep")
    ap.add_argument("--paced-s", type=float, default=None,
                    help="length of the fixed-rate window (default 185 s: three history merges)")
    ap.add_argument("--commit-interval-ms", type=float, default=None,
                    help="commit interval for the main Siteward scenarios (default: Siteward's default)")
    ap.add_argument("--source", default="worktree",
                    help='gateway code to measure: "worktree" (default) or a git revision (e.g. HEAD)')
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="record the gateway with py-spy during the first full-speed window")
    args = ap.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.rounds is not None:
        plan.rounds = max(1, args.rounds)
    if args.paced_s is not None:
        plan.paced_s = max(1.0, args.paced_s)
    plan.source = args.source
    if args.no_sweep:
        plan.sweep_ms = []
    if args.commit_interval_ms is not None:
        plan.commit_interval_ms = args.commit_interval_ms
    out = Out(args.json_only)
    work = Path(tempfile.mkdtemp(prefix="siteward-bench-", dir=pick_workdir_parent()))
    try:
        summary = run(plan, out, work, args.py_spy)
    except Exception as exc:
        print(f"bench.ingest: failed: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc), "work_dir": str(work)}))
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.keep:
        summary["work_dir"] = str(work)
    for line in _report_lines(summary):
        out(line)
    print(json.dumps(_round(summary), separators=(",", ":")), flush=True)
    return 0


def _report_lines(s: dict[str, Any]) -> list[str]:
    lines = ["summary:"]
    for k, t in s["targets"].items():
        lines.append(f"  {k}: {t['measured']:.2f} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")
    lines.append(f"  mosquitto {s['mosquitto_msgs_per_s']:,.0f} msg/s, bare amqtt "
                 f"{s['amqtt_bare_msgs_per_s']:,.0f} msg/s, load generator ceiling "
                 f"{s['loadgen_ceiling_msgs_per_s']:,.0f} msg/s")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
