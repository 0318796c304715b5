"""A bare amqtt 0.12.1 broker in its own process: the routing reference for bench.ingest.

    python -m bench.amqtt_bare --port 18830 [--uvloop] [--max-s 900]

Plain ``amqtt.broker.Broker`` with nothing of Siteward's: one TCP listener on loopback
and an explicit plugin list holding only ``AnonymousAuthPlugin(allow_anonymous=True)``.
The list is explicit because amqtt's default one (event and packet loggers, $SYS
publisher) halves its throughput, which would flatter Siteward in the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

PLUGINS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


def broker_config(host: str, port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": dict(PLUGINS),
    }


async def serve(host: str, port: int, max_s: float) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # bounded even if the orchestrator is killed and never sends SIGTERM
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_s)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of the stdlib loop")
    ap.add_argument("--max-s", type=float, default=900.0)
    args = ap.parse_args()
    # amqtt logs every connection at INFO; that is I/O the routing figure should not carry
    logging.basicConfig(level=logging.WARNING)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.host, args.port, args.max_s))


if __name__ == "__main__":
    main()
