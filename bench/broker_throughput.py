"""Quick check: QoS 1 ingest rate of the embedded broker with a no-op ``on_publish``.

100 publishers (raw asyncio MQTT clients in a separate process, so the broker has a core of
its own) publish QoS 1 with a window of in-flight messages for a fixed time; the figure is
PUBACKs received per second. The same load against a bare amqtt 0.12.1 broker (anonymous
auth plugin only, nothing stored) is measured in the same run as the reference.

    python -m bench.broker_throughput [--clients 100] [--window 20] [--seconds 5] [--uvloop]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from typing import Any

from gateway.broker import EmbeddedBroker, Principal
from gateway.settings import BrokerSection

PAYLOAD = b'{"temperature": 21.5, "humidity": 40.1, "battery": 3.1}'


class _NoopHooks:
    async def authenticate(
        self, client_id: str, username: str | None, password: str | None, peer: str
    ) -> Principal:
        return Principal(username=None, device_id=None, publish=("#",), subscribe=("#",), anonymous=True)

    async def on_publish(
        self, principal: Principal, client_id: str, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        return None

    def on_rejected(self, principal: Principal | None, client_id: str, reason: str, detail: str) -> None:
        return None

    async def on_connect(self, principal: Principal, client_id: str) -> None:
        return None

    async def on_disconnect(self, principal: Principal, client_id: str, *, clean: bool) -> None:
        return None


def _connect_bytes(client_id: str) -> bytes:
    cid = client_id.encode()
    vh = b"\x00\x04MQTT\x04\x02\x00\x3c"
    body = vh + len(cid).to_bytes(2, "big") + cid
    return bytes((0x10, len(body))) + body


async def _publisher(port: int, idx: int, window: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_connect_bytes(f"bench-{idx}"))
    ack = await reader.readexactly(4)
    assert ack[3] == 0, ack
    topic = f"devices/bench-{idx}/telemetry".encode()
    tfield = len(topic).to_bytes(2, "big") + topic
    loop = asyncio.get_running_loop()
    pid = 0

    def pub() -> bytes:
        nonlocal pid
        pid = pid % 65535 + 1
        body = tfield + pid.to_bytes(2, "big") + PAYLOAD
        return bytes((0x32, len(body))) + body

    writer.write(b"".join(pub() for _ in range(window)))
    acked = 0
    while loop.time() < stop_at:
        await reader.readexactly(4)
        acked += 1
        writer.write(pub())
    counts[idx] = acked
    writer.close()


def _client_process(port: int, clients: int, window: int, seconds: float, out: Any) -> None:
    try:
        import uvloop  # the load generator should not be the bottleneck

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        counts = [0] * clients
        stop_at = asyncio.get_running_loop().time() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(_publisher(port, i, window, stop_at, counts) for i in range(clients)))
        out.put(sum(counts) / (time.perf_counter() - t0))

    asyncio.run(main())


def _measure(port: int, clients: int, window: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_client_process, args=(port, clients, window, seconds, q))
    p.start()
    rate = float(q.get(timeout=seconds + 60))
    p.join()
    return rate


def _amqtt_reference(port_q: Any, stop_ev: Any) -> None:
    import logging

    from amqtt.broker import Broker

    logging.getLogger("amqtt").setLevel(logging.WARNING)

    async def main() -> None:
        cfg = {
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        b = Broker(cfg)
        await b.start()
        port = b._servers["default"].instance.sockets[0].getsockname()[1]
        port_q.put(port)
        await asyncio.get_running_loop().run_in_executor(None, stop_ev.wait)
        await b.shutdown()

    asyncio.run(main())


async def _siteward(args: argparse.Namespace) -> float:
    settings = BrokerSection(
        host="127.0.0.1", port=0, allow_anonymous=True, rate_limit_per_s=1e9, rate_limit_burst=1_000_000
    )
    async with EmbeddedBroker(settings, _NoopHooks()) as broker:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, _measure, broker.port, args.clients, args.window, args.seconds
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.uvloop:
        import uvloop

        siteward = uvloop.run(_siteward(args))
    else:
        siteward = asyncio.run(_siteward(args))
    result: dict[str, Any] = {
        "clients": args.clients,
        "window": args.window,
        "loop": "uvloop" if args.uvloop else "asyncio",
        "siteward_qos1_msgs_per_s": round(siteward),
        "cpus": os.cpu_count(),
    }
    if not args.no_reference:
        ctx = mp.get_context("spawn")
        port_q, stop_ev = ctx.Queue(), ctx.Event()
        ref = ctx.Process(target=_amqtt_reference, args=(port_q, stop_ev))
        ref.start()
        port = port_q.get(timeout=30)
        amqtt_rate = _measure(port, args.clients, args.window, args.seconds)
        stop_ev.set()
        ref.join(timeout=30)
        result["amqtt_bare_qos1_msgs_per_s"] = round(amqtt_rate)
        result["siteward_vs_amqtt"] = round(siteward / amqtt_rate, 2) if amqtt_rate else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
