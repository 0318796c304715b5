"""OTA fan-out: N simulated nodes download one firmware image at once from the gateway.

    python -m bench.ota [--nodes 50] [--size-mb 1.5] [--rounds 3] [--json-only]

The gateway runs as its own process (``siteward gateway``) with the image registered the
way an upload registers it; each node fetches ``/ota/v1/images/<sha>.bin`` with its own
download token, streams the body and checks its SHA-256, as the firmware does. The
reference is ``python -m http.server`` serving the same file, measured in the same run
with the same clients. Rounds alternate gateway / reference; the medians are reported.

Gateway CPU is the process's user+system time over the measured rounds (from /proc), RSS
its resident size after them (and the peak, VmHWM). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHUNK = 16 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


async def wait_http(url: str, within: float = 30.0) -> None:
    end = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            try:
                async with s.get(url) as r:
                    await r.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within} s")


async def fan_out(urls: list[str], sha256: str, size: int) -> float:
    """All nodes at once; returns seconds until the last one has its verified image."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:

        async def one(url: str) -> None:
            h = hashlib.sha256()
            n = 0
            async with s.get(url) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status} for {url}")
                async for chunk in r.content.iter_chunked(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
            if n != size or h.hexdigest() != sha256:
                raise RuntimeError("a node got a corrupt image")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(u) for u in urls))
        return time.perf_counter() - t0


async def register_image(data_dir: Path, image: bytes) -> tuple[str, bytes]:
    """Register the image in the gateway's store as an upload would; returns (sha, download secret)."""
    from gateway.metrics import Metrics
    from gateway.ota.registry import FirmwareRegistry
    from gateway.ota.service import OtaService
    from gateway.store.database import Database

    db = Database(data_dir / "siteward.db", Metrics())
    await db.open()
    try:
        reg = FirmwareRegistry(db, data_dir / "firmware", max_bytes=16 * 1024 * 1024)
        fw, _ = await reg.add(image, filename="bench.bin", actor="bench")
    finally:
        await db.close()
    secret = OtaService._load_secret(data_dir / "ota" / "download.key")
    return fw.sha256, secret


def run(args: argparse.Namespace) -> dict[str, Any]:
    from firmware.tools.image import build_app_image

    work = Path(tempfile.mkdtemp(prefix="siteward-bench-ota-"))
    data_dir = work / "data"
    data_dir.mkdir()
    image = build_app_image(version="9.9.9", payload_len=int(args.size_mb * 1024 * 1024) - 512)
    sha, secret = asyncio.run(register_image(data_dir, image))
    ref_dir = work / "ref"
    ref_dir.mkdir()
    (ref_dir / "image.bin").write_bytes(image)

    web_port, mqtt_port, ref_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SITEWARD_WEB__ADMIN_PASSWORD": "bench only password", "SITEWARD_LOGGING__LEVEL": "warning",
           "SITEWARD_TIME__SOURCE": "assume_synced", "SITEWARD_WEB__HOST": "127.0.0.1",
           "SITEWARD_BROKER__HOST": "127.0.0.1"}
    with open(work / "gateway.log", "wb") as log:
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "gateway", "--web-port", str(web_port),
                               "--mqtt-port", str(mqtt_port), "--data-dir", str(data_dir)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
        ref = subprocess.Popen([sys.executable, "-m", "http.server", str(ref_port), "--bind", "127.0.0.1",
                                "--directory", str(ref_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            m = asyncio.run(measure(args, gw.pid, ref.pid, web_port, ref_port, sha, secret, image))
        finally:
            for p in (gw, ref):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    total = statistics.median(m["gw_times"])
    reference = statistics.median(m["ref_times"])
    mb = len(image) * args.nodes / 1e6
    return {
        "bench": "ota",
        "nodes": args.nodes,
        "image_mb": round(len(image) / 1e6, 3),
        "rounds": args.rounds,
        "total_s": round(total, 3),
        "reference_s": round(reference, 3),
        "vs_reference": round(total / reference, 3),
        "gateway_mb_per_s": round(mb / total, 1),
        "reference_mb_per_s": round(mb / reference, 1),
        "gateway_rss_mb": round(m["rss"], 1),
        "gateway_peak_rss_mb": round(m["hwm"], 1),
        "gateway_idle_rss_mb": round(m["rss_idle"], 1),
        "gateway_peak_rss_before_mb": round(m["hwm_idle"], 1),
        "gateway_cpu_s": round(m["gw_cpu"] / args.rounds, 3),
        "reference_cpu_s": round(m["ref_cpu"] / args.rounds, 3),
        "work_dir": str(work) if args.keep else None,
    }


async def measure(args: argparse.Namespace, gw_pid: int, ref_pid: int, web_port: int, ref_port: int, sha: str,
                  secret: bytes, image: bytes) -> dict[str, Any]:
    from gateway.ota.service import make_download_token

    await wait_http(f"http://127.0.0.1:{web_port}/healthz")
    await wait_http(f"http://127.0.0.1:{ref_port}/")
    exp = int(time.time()) + 3600
    gw_urls = [f"http://127.0.0.1:{web_port}/ota/v1/images/{sha}.bin?device=node-{i}&exp={exp}"
               f"&token={make_download_token(secret, f'node-{i}', sha, exp)}" for i in range(args.nodes)]
    ref_urls = [f"http://127.0.0.1:{ref_port}/image.bin"] * args.nodes
    # warm-up: first-request costs (imports, page cache) are not what this measures
    await fan_out(gw_urls[:2], sha, len(image))
    await fan_out(ref_urls[:2], sha, len(image))
    rss_idle, hwm_idle = proc_mem_mb(gw_pid)
    cpu0, ref_cpu0 = proc_cpu_s(gw_pid), proc_cpu_s(ref_pid)
    gw_times: list[float] = []
    ref_times: list[float] = []
    for r in range(args.rounds):
        gw_times.append(await fan_out(gw_urls, sha, len(image)))
        ref_times.append(await fan_out(ref_urls, sha, len(image)))
        if not args.json_only:
            print(f"round {r + 1}: gateway {gw_times[-1]:.3f} s, http.server {ref_times[-1]:.3f} s", flush=True)
    rss, hwm = proc_mem_mb(gw_pid)
    return {"gw_times": gw_times, "ref_times": ref_times, "gw_cpu": proc_cpu_s(gw_pid) - cpu0,
            "ref_cpu": proc_cpu_s(ref_pid) - ref_cpu0, "rss": rss, "hwm": hwm, "rss_idle": rss_idle,
            "hwm_idle": hwm_idle}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ota", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--size-mb", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-only", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work dir (gateway log, database)")
    args = p.parse_args()
    result = run(args)
    if not args.json_only:
        print(f"{args.nodes} nodes x {result['image_mb']} MB: gateway {result['total_s']} s "
              f"({result['gateway_mb_per_s']} MB/s, {result['gateway_cpu_s']} s CPU per round), "
              f"http.server {result['reference_s']} s ({result['reference_mb_per_s']} MB/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
