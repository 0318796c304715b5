"""Fix: what an idle connection costs (amqtt's per-session state machine and unused queues)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import tracemalloc

import pytest
from amqtt.session import Session
from transitions import MachineError

from gateway.broker.amqtt_fixes import HardenedSession, _SessionState
from gateway.broker.limits import BrokerLimits
from gateway.settings import BrokerSection
from tests.broker.conftest import BrokerFactory, until

pytestmark = pytest.mark.timeout(60)

IDLE_CLIENTS = 100
# bytes the broker's process allocates per idle connection (Python allocations, traced):
# ~15 KiB with the fix, ~45 KiB with amqtt's per-session Machine and four queues (the
# gateway's 200-client RSS target depends on it; see docs/performance.md)
MAX_BYTES_PER_CONNECTION = 25 * 1024

# the clients run in a process of their own, so that only the broker's side is traced
CLIENTS = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    cid = f"idle-{i}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x78" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    socks.append(s)
for s in socks:
    assert s.recv(4) == b"\x20\x02\x00\x00"
print("connected", flush=True)
sys.stdin.read()
"""


async def test_idle_connections_cost_little_broker_memory(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    gc.collect()
    tracemalloc.start()
    clients = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENTS, str(broker.port), str(IDLE_CLIENTS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert clients.stdout is not None
        assert await asyncio.wait_for(clients.stdout.readline(), 30) == b"connected\n"
        assert await until(lambda: broker.stats()["connected_clients"] == IDLE_CLIENTS)
        await asyncio.sleep(0.2)
        gc.collect()
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / IDLE_CLIENTS
    finally:
        tracemalloc.stop()
        assert clients.stdin is not None
        clients.stdin.close()
        await clients.wait()
    assert per_connection < MAX_BYTES_PER_CONNECTION, f"{per_connection:.0f} B per idle connection"


def test_session_state_behaves_like_amqtts_state_machine() -> None:
    """Every sequence of up to four triggers: same states, same refusals, same timestamps set."""
    for n in range(5):
        for triggers in itertools.product(("connect", "disconnect"), repeat=n):
            upstream, ours = Session(), HardenedSession("c", "owner", BrokerLimits.from_settings(BrokerSection()))
            assert isinstance(ours.transitions, _SessionState)
            for trigger in triggers:
                outcomes = []
                for s in (upstream, ours):
                    try:
                        outcomes.append(getattr(s.transitions, trigger)())
                    except MachineError:
                        outcomes.append("refused")
                assert outcomes[0] == outcomes[1], triggers
                assert upstream.transitions.state == ours.transitions.state, triggers
                for state in ("new", "connected", "disconnected"):
                    check = f"is_{state}"
                    assert getattr(upstream.transitions, check)() == getattr(ours.transitions, check)()
                assert (upstream.last_connect_time is None) == (ours.last_connect_time is None)
                assert (upstream.last_disconnect_time is None) == (ours.last_disconnect_time is None)


async def test_upstream_queues_still_there_when_read() -> None:
    """Made on first read, so upstream code and plugins that use them still find real queues."""
    s = HardenedSession("c", "owner", BrokerLimits.from_settings(BrokerSection()))
    assert "retained_messages" not in vars(s)
    assert s.retained_messages_count == 0  # upstream property over the queue
    assert isinstance(s.retained_messages, asyncio.Queue)
    assert s.retained_messages is s.retained_messages
    with pytest.raises(AttributeError):
        _ = s.no_such_attribute  # type: ignore[attr-defined]
