"""Cloud sync benchmark: drain 1,000,000 buffered readings to a local mosquitto.

    python -m bench.sync [--readings N] [--encoding json|json+zlib] [--json-only] [--keep]

Separate processes, so nothing measured shares an interpreter with what measures it:

* the **store** is filled through the gateway's own writer (``gateway.store.Database``);
* **``siteward sync``** runs as in production (its own process, default settings except
  where the cloud is and how to authenticate: TLS with username/password);
* a **cloud consumer** process subscribes to everything and checks every reading by key;
* a **feeder** (this process) keeps adding fresh readings (100/s) during the drain, the
  consumer measures their latency (receive time - reading timestamp);
* the **naive reference**, measured in the same run against the same broker and
  consumer: one reading per message, QoS 1, each PUBACK awaited before the next
  publish (rows read in chunks and no watermark writes at all, which flatters it).

The last line printed is one JSON object (``readings_per_s``, ``naive_readings_per_s``,
``vs_naive``, ``bytes_per_reading``, ``rss_mb``, ``live_p99_s``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.fixtures.loopback import MOSQUITTO, free_port, wait_listening

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = "gw-bench"
USER, PASSWORD = "gw-bench", "bench password"
DEVICES, METRICS = 100, ("temperature", "humidity", "pressure")
LIVE_PER_S = 100
NAIVE_TOPIC = "bench/naive/readings"
TARGETS = {"readings_per_s": 50_000, "vs_naive": 20.0, "rss_mb": 60.0, "live_p99_s": 2.0}


def work_dir() -> Path:
    # a disk filesystem, as on the appliance (tmpfs would flatter SQLite)
    for base in (os.environ.get("TMPDIR"), "/var/tmp", "/tmp"):
        if base and Path(base).is_dir():
            return Path(tempfile.mkdtemp(prefix="siteward-bench-sync-", dir=base))
    return Path(tempfile.mkdtemp(prefix="siteward-bench-sync-"))


# -- the cloud broker -------------------------------------------------------------------------
class Broker:
    def __init__(self, work: Path) -> None:
        from tests.sync.pki import make_pki

        self.pki = make_pki(work / "pki", client_cn=GATEWAY)
        self.plain, self.tls = free_port(), free_port()
        pw = work / "passwords"
        pw.write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(pw), USER, PASSWORD], check=True, capture_output=True)
        conf = work / "mosquitto.conf"
        conf.write_text(
            "per_listener_settings true\npersistence false\nuser root\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\n"
            f"listener {self.plain} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
            f"cafile {self.pki.ca}\ncertfile {self.pki.server_cert}\nkeyfile {self.pki.server_key}\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_listening(self.plain)
        wait_listening(self.tls)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the store --------------------------------------------------------------------------------
async def fill(db_path: Path, n: int) -> float:
    from gateway.metrics import Metrics
    from gateway.models import Reading, Source
    from gateway.store.database import Database

    db = Database(db_path, Metrics())
    await db.open()
    t0 = time.time() - n / 1000.0  # as if collected at 1000 readings/s during an outage
    began = time.perf_counter()
    try:
        chunk = 5000
        for i in range(0, n, chunk):
            batch = [Reading(device=f"node-{j % DEVICES:03d}", metric=METRICS[j % 3], value=20.0 + (j % 997) / 10,
                             unit="", ts=t0 + j / 1000.0, source=Source.MQTT) for j in range(i, min(n, i + chunk))]
            await db.add_readings(batch)
    finally:
        await db.close()
    return time.perf_counter() - began


async def feed(db_path: Path, stop: asyncio.Event, counter: list[int]) -> None:
    """Fresh readings during the drain, like 100 nodes reporting once a second."""
    from gateway.metrics import Metrics
    from gateway.models import Reading, Source
    from gateway.store.database import Database

    db = Database(db_path, Metrics())
    await db.open()
    try:
        n = 0
        while not stop.is_set():
            now = time.time()
            await db.add_readings([Reading(device=f"live-{(n + k) % DEVICES:03d}", metric="live", value=float(n + k),
                                           ts=now, source=Source.MQTT) for k in range(LIVE_PER_S // 10)])
            n += LIVE_PER_S // 10
            counter[0] = n
            await asyncio.sleep(0.1)
    finally:
        await db.close()


# -- the cloud consumer (its own process) -----------------------------------------------------
async def consumer_main(port: int, expect: int, *, live_only: bool = False) -> None:
    import aiomqtt

    from cloud_sync.codec import decode

    seen = bytearray(expect + 1)
    backlog_seen = dups = messages = wire = readings_msgs = 0
    live_lat: list[float] = []
    pickup: list[float] = []
    transit: list[float] = []
    naive = naive_bytes = 0
    first_at = done_at = None
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def run() -> None:
        nonlocal backlog_seen, dups, messages, wire, readings_msgs, naive, naive_bytes, first_at, done_at
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-live" if live_only else "bench-cloud",
                                  max_queued_incoming_messages=0) as c:
            if live_only:
                # the live lane only: no backlog to decode, so its own queue never delays a live batch
                await c.subscribe(f"siteward/{GATEWAY}/up/readings/live", qos=1)
            else:
                await c.subscribe(f"siteward/{GATEWAY}/up/#", qos=1)
                await c.subscribe(NAIVE_TOPIC, qos=1)
            print(json.dumps({"ready": True}), flush=True)
            async for m in c.messages:
                now = time.time()
                topic, payload = str(m.topic), bytes(m.payload)  # type: ignore[arg-type]
                # MQTT framing as on the wire: fixed header, length, topic, packet id
                size = len(payload) + len(topic) + 2 + 2 + 1 + (1 if len(payload) < 128 else 3)
                if topic == NAIVE_TOPIC:
                    naive += 1
                    naive_bytes += size
                    continue
                body = decode(payload)
                if body.get("type") != "readings":
                    continue
                messages += 1
                wire += size
                readings_msgs += body["count"]
                if first_at is None:
                    first_at = now
                    if not live_only:
                        print(json.dumps({"started": True}), flush=True)
                for r in body["readings"]:
                    rid = r["id"]
                    if rid <= expect:
                        if seen[rid]:
                            dups += 1
                        else:
                            seen[rid] = 1
                            backlog_seen += 1
                    elif live_only and r["metric"] == "live":
                        live_lat.append(now - r["ts"])
                        # where the time went: in the store until the sync took it / on the way
                        pickup.append(body["sent_at"] - r["ts"])
                        transit.append(now - body["sent_at"])
                if done_at is None and backlog_seen == expect and not live_only:
                    done_at = now
                    print(json.dumps({"drained": True, "first_at": first_at, "done_at": done_at}), flush=True)

    task = asyncio.create_task(run())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    live_lat.sort()
    pickup.sort()
    transit.sort()
    print(json.dumps({"result": True, "pickup_p99": pct(pickup, 99), "transit_p99": pct(transit, 99),
                      "backlog_seen": backlog_seen, "duplicates": dups, "messages": messages,
                      "wire_bytes": wire, "readings_in_messages": readings_msgs, "first_at": first_at,
                      "done_at": done_at, "live": live_lat, "naive_messages": naive, "naive_bytes": naive_bytes}),
          flush=True)


# -- the naive reference (its own process) ----------------------------------------------------
async def naive_main(port: int, ca: str, db_path: str, seconds: float) -> None:
    import ssl

    import aiomqtt

    ctx = ssl.create_default_context(cafile=ca)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    series = {sid: (d, m, u) for sid, d, m, u in conn.execute("SELECT id, device_id, metric, unit FROM series")}
    sent = 0
    async with aiomqtt.Client("127.0.0.1", port, username=USER, password=PASSWORD, tls_context=ctx,
                              identifier="bench-naive") as c:
        began = time.perf_counter()
        last = 0
        while time.perf_counter() - began < seconds:
            rows = conn.execute("SELECT id, series_id, ts, value, flags FROM readings WHERE id > ? ORDER BY id"
                                " LIMIT 1000", (last,)).fetchall()
            for rid, sid, ts, value, flags in rows:
                d, m, u = series[sid]
                body = json.dumps({"gateway": GATEWAY, "id": rid, "device": d, "metric": m, "unit": u,
                                   "value": value, "ts": ts, "flags": flags})
                await c.publish(NAIVE_TOPIC, body, qos=1)  # waits for the PUBACK
                sent += 1
                last = rid
                if time.perf_counter() - began >= seconds:
                    break
        elapsed = time.perf_counter() - began
    print(json.dumps({"naive_sent": sent, "seconds": elapsed}), flush=True)


# -- the run ------------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.samples.append(int(line.split()[1]) / 1024)
            except OSError:
                return


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def say(args: argparse.Namespace, *parts: object) -> None:
    if not args.json_only:
        print(*parts, file=sys.stderr, flush=True)


def write_config(path: Path, work: Path, broker: Broker, encoding: str) -> None:
    path.write_text(
        f'[gateway]\nid = "{GATEWAY}"\ndata_dir = "{work / "data"}"\n'
        '[logging]\nlevel = "warning"\nformat = "json"\n'
        f'[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.tls}\ntransport = "tls"\n'
        f'ca_file = "{broker.pki.ca}"\nusername = "{USER}"\npassword = "{PASSWORD}"\nencoding = "{encoding}"\n'
        # one topic per lane (a template), so that latency is measured by a consumer of live
        # batches only: a single consumer decoding a million-reading drain would queue them
        '[cloud.templates]\nreadings_topic = "{prefix}/{gateway}/up/readings/{lane}"\n')


def read_line(proc: subprocess.Popen[str], key: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited while waiting for {key!r}")
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict) and msg.get(key):
                return msg
    raise TimeoutError(f"no {key!r} within {within} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--encoding", choices=["json", "json+zlib"], default="json+zlib")
    ap.add_argument("--naive-seconds", type=float, default=10.0)
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--live-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consumer:
        asyncio.run(consumer_main(args.port, args.readings, live_only=args.live_only))
        return 0
    if args.naive:
        asyncio.run(naive_main(args.port, args.ca, args.db, args.naive_seconds))
        return 0

    work = work_dir()
    broker = Broker(work)
    procs: list[subprocess.Popen[str]] = []
    try:
        n = args.readings
        db_path = work / "data" / "siteward.db"
        say(args, f"filling the store with {n:,} readings …")
        fill_s = asyncio.run(fill(db_path, n))
        say(args, f"  {fill_s:.1f} s ({n / fill_s:,.0f} readings/s through the gateway's writer)")

        py = [sys.executable, "-m", "bench.sync"]
        consumer = subprocess.Popen([*py, "--consumer", "--port", str(broker.plain), "--readings", str(n)],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(consumer)
        read_line(consumer, "ready", 30)
        live_consumer = subprocess.Popen([*py, "--consumer", "--live-only", "--port", str(broker.plain),
                                          "--readings", str(n)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(live_consumer)
        read_line(live_consumer, "ready", 30)

        cfg = work / "siteward.toml"
        write_config(cfg, work, broker, args.encoding)
        say(args, f"draining with siteward sync ({args.encoding}, default window and batches) …")
        started = time.time()
        sync = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "sync"],
                                stdout=subprocess.DEVNULL, stderr=(work / "sync.log").open("w"), text=True, cwd=ROOT)
        procs.append(sync)
        rss = RssSampler(sync.pid)
        rss.start()

        async def drain() -> tuple[dict[str, Any], int]:
            # fresh readings from the moment the drain is under way: their latency is the figure
            await asyncio.to_thread(read_line, consumer, "started", 120)
            stop = asyncio.Event()
            fed = [0]
            feeder = asyncio.create_task(feed(db_path, stop, fed))
            try:
                msg = await asyncio.to_thread(read_line, consumer, "drained", 900)
                await asyncio.sleep(2.0)  # fresh readings keep flowing after the drain too
            finally:
                stop.set()
                await feeder
            return msg, fed[0]

        _drained, fed = asyncio.run(drain())
        time.sleep(1.5)  # the last fresh readings
        sync_cpu = cpu_s(sync.pid)
        rss.stop.set()
        sync.send_signal(signal.SIGTERM)
        sync.wait(30)

        say(args, f"naive reference: one reading per message, QoS 1, {args.naive_seconds:.0f} s …")
        naive = subprocess.Popen([*py, "--naive", "--port", str(broker.tls), "--ca", str(broker.pki.ca), "--db",
                                  str(db_path), "--naive-seconds", str(args.naive_seconds)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(naive)
        nv = read_line(naive, "naive_sent", args.naive_seconds + 60)
        naive.wait(30)
        time.sleep(1.0)
        consumer.send_signal(signal.SIGTERM)
        res = read_line(consumer, "result", 60)
        consumer.wait(30)
        live_consumer.send_signal(signal.SIGTERM)
        live_res = read_line(live_consumer, "result", 60)
        live_consumer.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    drain_s = res["done_at"] - res["first_at"]
    rate = n / drain_s
    naive_rate = nv["naive_sent"] / nv["seconds"]
    live = live_res["live"]
    sent_readings = res["readings_in_messages"]
    out = {
        "readings": n,
        "encoding": args.encoding,
        "readings_per_s": round(rate),
        "messages_per_s": round(res["messages"] / drain_s, 1),
        "drain_s": round(drain_s, 2),
        "start_to_first_reading_s": round(res["first_at"] - started, 2),
        "naive_readings_per_s": round(naive_rate),
        "vs_naive": round(rate / naive_rate, 1),
        "bytes_per_reading": round(res["wire_bytes"] / sent_readings, 1),
        "naive_bytes_per_reading": round(res["naive_bytes"] / max(res["naive_messages"], 1), 1),
        "readings_per_message": round(sent_readings / max(res["messages"], 1), 1),
        "rss_mb": round(max(rss.samples), 1) if rss.samples else None,
        "rss_mb_median": round(sorted(rss.samples)[len(rss.samples) // 2], 1) if rss.samples else None,
        "sync_cpu_s": round(sync_cpu, 1),
        "live_readings": len(live),
        "live_fed": fed,
        "live_p50_s": round(pct(live, 50) or 0, 3),
        "live_p99_s": round(pct(live, 99) or 0, 3),
        "live_max_s": round(live[-1], 3) if live else None,
        # p99 of: reading timestamp -> the sync encoded it (commit, poll, linger, queue) ...
        "live_pickup_p99_s": round(live_res["pickup_p99"] or 0, 3),
        # ... and encoded -> the consumer had it (window, MQTT, broker, consumer)
        "live_transit_p99_s": round(live_res["transit_p99"] or 0, 3),
        "backlog_complete": res["backlog_seen"] == n,
        "duplicates": res["duplicates"],
        "fill_readings_per_s": round(n / fill_s),
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    out["targets_met"] = {
        "readings_per_s": out["readings_per_s"] >= TARGETS["readings_per_s"],
        "vs_naive": out["vs_naive"] >= TARGETS["vs_naive"],
        "rss_mb": out["rss_mb"] is not None and out["rss_mb"] <= TARGETS["rss_mb"],
        "live_p99_s": out["live_p99_s"] <= TARGETS["live_p99_s"],
    }
    say(args, f"drained {n:,} readings in {drain_s:.1f} s: {rate:,.0f} readings/s "
              f"({out['messages_per_s']} msg/s, {out['readings_per_message']} readings/msg), "
              f"{out['bytes_per_reading']} B/reading on the wire")
    say(args, f"naive: {naive_rate:,.0f} readings/s ({out['naive_bytes_per_reading']} B/reading) "
              f"-> {out['vs_naive']}x")
    say(args, f"sync RSS max {out['rss_mb']} MB; live latency p50 {out['live_p50_s']} s, p99 {out['live_p99_s']} s "
              f"over {len(live)} fresh readings; duplicates {res['duplicates']}")
    print(json.dumps(out), flush=True)
    return 0 if out["backlog_complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
