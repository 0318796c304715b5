"""A minimal raw-asyncio MQTT 3.1.1 load generator and counting subscriber.

Why not paho or aiomqtt: at tens of thousands of messages per second a general client
spends more CPU per message than the broker under test, so the figures would measure
the client. This one pre-encodes every PUBLISH except its two packet-id bytes, writes
all the publishes an incoming batch of PUBACKs allows in one ``transport.write``, and
parses PUBACKs on a fast path. It speaks just enough MQTT for the benchmark: CONNECT/
CONNACK, PUBLISH QoS 1/PUBACK, SUBSCRIBE/SUBACK, PINGRESP and DISCONNECT.

Each role runs in its own process (``publisher_main`` / ``subscriber_main``) and talks
to the orchestrator over a ``multiprocessing`` pipe: ``("ready", t)``, ``("mark", name,
t)`` at the edges of the measurement window (so the orchestrator can sample the broker's
/proc counters at the same instants), then ``("result", dict)``. All times are
``time.monotonic()``, which on Linux is one clock for every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import resource
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

# -- encoding ----------------------------------------------------------------------------

_PIDS = [i.to_bytes(2, "big") for i in range(65536)]
DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 120, clean: bool = True) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    body = _str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + _varlen(len(body)) + body


def subscribe_packet(pid: int, topic_filter: str, qos: int = 1) -> bytes:
    body = _PIDS[pid] + _str(topic_filter) + bytes([qos])
    return b"\x82" + _varlen(len(body)) + body


class PublishTemplate:
    """A QoS 1 PUBLISH encoded once; ``packet(pid)`` only splices in the packet id."""

    __slots__ = ("head", "tail")

    def __init__(self, topic: str, payload: bytes) -> None:
        t = _str(topic)
        self.head = b"\x32" + _varlen(len(t) + 2 + len(payload)) + t
        self.tail = payload

    def packet(self, pid: int) -> bytes:
        return self.head + _PIDS[pid] + self.tail


def telemetry_payload(i: int) -> bytes:
    # three metrics, as an ESP32 climate node sends them; values differ per node only so
    # that nothing downstream can get away with caching one parse
    return (b'{"temperature":%.1f,"humidity":%.1f,"pressure":%.1f}'
            % (18.0 + (i % 70) / 10, 35.0 + (i % 40) / 2, 1000.0 + (i % 30)))


# -- stats shared by every connection in one process ------------------------------------

class Stats:
    __slots__ = ("acks", "connect_failures", "delivered", "gate_limit", "latencies", "lost", "received",
                 "recording", "sent", "starved")

    def __init__(self, delivered: Any = None, gate_limit: int = 0) -> None:
        self.acks = 0
        self.sent = 0
        self.received = 0
        self.lost = 0
        self.connect_failures = 0
        self.recording = False
        self.latencies: list[float] = []
        # A QoS 1 PUBACK to a publisher says nothing about delivery, so a publisher
        # flood outruns any subscriber and the broker drops (mosquitto: past
        # max_queued_messages) or hoards (amqtt: unbounded) the difference. For the
        # routing figure the publishers are therefore gated end to end: at most
        # ``gate_limit`` messages published but not yet delivered, read from a counter
        # the subscriber process keeps in shared memory.
        self.delivered = delivered
        self.gate_limit = gate_limit
        # publishers whose window the gate left short, in the order they were cut
        self.starved: deque[Publisher] = deque()

    def allow(self, want: int) -> int:
        if self.delivered is None:
            return want
        return max(0, min(want, self.gate_limit - (self.sent - self.delivered.value)))


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Base(asyncio.Protocol):
    """Framing shared by both roles: buffer bytes, hand complete packets to ``_packet``."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.stats.lost += 1
        self.closed = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))

    def _packet(self, b0: int, buf: bytearray, start: int, end: int) -> None:
        kind = b0 >> 4
        if kind == 2 and not self.connack.done():  # CONNACK
            self.connack.set_result(buf[start + 1])

    def _frames(self) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            i = pos + 1
            mult = 1
            length = 0
            complete = False
            while i < n and i < pos + 5:  # at most four remaining-length bytes
                d = buf[i]
                i += 1
                length += (d & 0x7F) * mult
                if d < 0x80:
                    complete = True
                    break
                mult *= 128
            if not complete:
                break
            end = i + length
            if end > n:
                break
            self._packet(buf[pos], buf, i, end)
            pos = end
        if pos:
            del buf[:pos]

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.transport.write(DISCONNECT)
            self.transport.close()


class Publisher(_Base):
    """One device connection: a window of in-flight QoS 1 publishes, or paced sends."""

    def __init__(self, stats: Stats, template: PublishTemplate, window: int) -> None:
        super().__init__(stats)
        self.template = template
        self.window = window
        self.inflight: dict[int, float] = {}
        self.refill = False  # full-speed mode: every PUBACK releases the next publish
        self.starved = False
        self._next = 0

    def _pid(self) -> int:
        inflight = self.inflight
        while True:
            self._next = self._next % 65535 + 1
            if self._next not in inflight:
                return self._next

    def _build(self, count: int) -> bytes:
        now = time.perf_counter()
        inflight = self.inflight
        tpl = self.template
        parts = []
        for _ in range(count):
            pid = self._pid()
            inflight[pid] = now
            parts.append(tpl.packet(pid))
        self.stats.sent += count
        return b"".join(parts)

    def send(self, count: int = 1) -> None:
        if self.transport is None or self.closed or count <= 0:
            return
        self.transport.write(self._build(count))

    def top_up(self, want: int) -> None:
        n = self.stats.allow(want)
        self.send(n)
        if n < want and not self.starved:
            self.starved = True
            self.stats.starved.append(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        inflight = self.inflight
        stats = self.stats
        n = len(buf)
        pos = 0
        acked = 0
        now = 0.0
        lat = stats.latencies if stats.recording else None
        # fast path: a run of 4-byte PUBACKs is almost all a publisher ever receives
        while n - pos >= 4 and buf[pos] == 0x40 and buf[pos + 1] == 2:
            t = inflight.pop((buf[pos + 2] << 8) | buf[pos + 3], None)
            pos += 4
            if t is not None:
                acked += 1
                if lat is not None:
                    if not now:
                        now = time.perf_counter()
                    lat.append(now - t)
        if pos:
            del buf[:pos]
        if buf:
            self._frames()
        if acked:
            stats.acks += acked
            if self.refill and not self.closed:
                self.top_up(acked)

    def _packet(self, b0: int, buf: bytearray, start: int, end: int) -> None:
        if b0 == 0x40:  # a PUBACK split across reads
            t = self.inflight.pop((buf[start] << 8) | buf[start + 1], None)
            if t is not None:
                self.stats.acks += 1
                if self.stats.recording:
                    self.stats.latencies.append(time.perf_counter() - t)
                if self.refill and not self.closed:
                    self.top_up(1)
            return
        super()._packet(b0, buf, start, end)


class Subscriber(_Base):
    """Counts every PUBLISH delivered to it and acknowledges QoS 1 at once, batched."""

    def __init__(self, stats: Stats) -> None:
        super().__init__(stats)
        self.suback: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._frames()
        if self.stats.delivered is not None:
            self.stats.delivered.value = self.stats.received
        if self._acks and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._acks))
            self._acks.clear()

    def _packet(self, b0: int, buf: bytearray, start: int, end: int) -> None:
        kind = b0 >> 4
        if kind == 3:
            self.stats.received += 1
            if b0 & 0x06:  # QoS > 0: the packet id follows the topic
                tlen = (buf[start] << 8) | buf[start + 1]
                p = start + 2 + tlen
                self._acks.append(b"\x40\x02" + bytes(buf[p:p + 2]))
        elif kind == 9 and not self.suback.done():
            self.suback.set_result(bytes(buf[start + 2:end]))
        else:
            super()._packet(b0, buf, start, end)


# -- process entry points ---------------------------------------------------------------

@dataclass
class PublisherSpec:
    host: str
    port: int
    # (client id, username, password); the client id is the device id for Siteward
    clients: list[tuple[str, str | None, str | None]]
    mode: str  # "full", "paced" or "idle"
    window: int = 16
    rate: float = 1000.0  # paced mode: messages per second over all clients
    gate_limit: int = 0  # full mode with a subscriber: max published-but-undelivered (0: ungated)
    warmup_s: float = 2.0
    duration_s: float = 10.0
    hold_s: float = 2.0  # idle mode: how long connections sit before the "idle" mark
    drain_s: float = 3.0
    connect_concurrency: int = 25
    connect_timeout_s: float = 15.0


@dataclass
class SubscriberSpec:
    host: str
    port: int
    topic_filter: str = "devices/+/telemetry"
    client_id: str = "bench-sub"
    username: str | None = None
    password: str | None = None
    sample_s: float = 0.02
    max_s: float = 600.0  # hard bound in case the orchestrator dies


def _install_fast_loop() -> None:
    # the load generator must not be the bottleneck: use the fastest loop available
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def latency_summary(lat_s: list[float]) -> dict[str, float]:
    v = sorted(lat_s)
    ms = 1000.0
    return {"n": len(v), "p50_ms": _pct(v, 0.50) * ms, "p90_ms": _pct(v, 0.90) * ms,
            "p99_ms": _pct(v, 0.99) * ms, "p999_ms": _pct(v, 0.999) * ms,
            "max_ms": (v[-1] * ms) if v else float("nan")}


async def _connect_all(spec: PublisherSpec, stats: Stats) -> list[Publisher]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(spec.connect_concurrency)

    async def one(i: int, cid: str, user: str | None, pw: str | None) -> Publisher | None:
        tpl = PublishTemplate(f"devices/{cid}/telemetry", telemetry_payload(i))
        for _attempt in range(3):
            async with sem:
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: Publisher(stats, tpl, spec.window),
                                               spec.host, spec.port),
                        spec.connect_timeout_s)
                    assert proto.transport is not None
                    proto.transport.write(connect_packet(cid, user, pw))
                    rc = await asyncio.wait_for(proto.connack, spec.connect_timeout_s)
                except (OSError, TimeoutError, ConnectionError):
                    await asyncio.sleep(0.2)
                    continue
                if rc == 0:
                    return proto
                proto.close()
                break  # refused: retrying with the same credentials cannot help
        stats.connect_failures += 1
        return None

    got = await asyncio.gather(*(one(i, *c) for i, c in enumerate(spec.clients)))
    return [p for p in got if p is not None]


async def _publisher(spec: PublisherSpec, report: Callable[..., None], delivered: Any) -> dict[str, Any]:
    stats = Stats(delivered if spec.gate_limit else None, spec.gate_limit)
    t_connect = time.monotonic()
    pubs = await _connect_all(spec, stats)
    result: dict[str, Any] = {"mode": spec.mode, "clients": len(pubs),
                              "connect_failures": stats.connect_failures,
                              "connect_s": time.monotonic() - t_connect}
    report("ready", time.monotonic())
    if not pubs:
        return result
    try:
        if spec.mode == "idle":
            await asyncio.sleep(spec.hold_s)
            report("mark", "idle", time.monotonic())
            await asyncio.sleep(0.5)
            result["lost_connections"] = stats.lost
            return result
        if spec.mode == "full":
            await _run_full(spec, pubs, stats, report, result)
        else:
            await _run_paced(spec, pubs, stats, report, result)
        # let what is in flight come back so the broker is quiet for the next phase
        for _ in range(max(1, int(spec.drain_s / 0.05))):
            if not any(p.inflight for p in pubs):
                break
            await asyncio.sleep(0.05)
        result["unacked_at_end"] = sum(len(p.inflight) for p in pubs)
        result["lost_connections"] = stats.lost
        return result
    finally:
        for p in pubs:
            p.close()
        await asyncio.sleep(0.2)


async def _window(spec: PublisherSpec, stats: Stats, report: Callable[..., None],
                  result: dict[str, Any]) -> None:
    """Warm up, then count PUBACKs and CPU between the "start" and "end" marks."""
    await asyncio.sleep(spec.warmup_s)
    stats.latencies.clear()
    stats.recording = True
    a0, s0, c0, t0 = stats.acks, stats.sent, _cpu_s(), time.monotonic()
    report("mark", "start", t0)
    await asyncio.sleep(spec.duration_s)
    a1, s1, c1, t1 = stats.acks, stats.sent, _cpu_s(), time.monotonic()
    stats.recording = False
    report("mark", "end", t1)
    span = t1 - t0
    result.update(window_s=span, t_start=t0, t_end=t1, acked=a1 - a0, sent=s1 - s0,
                  acked_per_s=(a1 - a0) / span, sent_per_s=(s1 - s0) / span,
                  loadgen_cpu_fraction=(c1 - c0) / span,
                  latency=latency_summary(stats.latencies))


async def _run_full(spec: PublisherSpec, pubs: list[Publisher], stats: Stats,
                    report: Callable[..., None], result: dict[str, Any]) -> None:
    for p in pubs:
        p.refill = True
        p.top_up(p.window)
    pump: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    if stats.delivered is not None:
        pump = asyncio.create_task(_pump(pubs, stats, stop))
    try:
        await _window(spec, stats, report, result)
    finally:
        stop.set()
        for p in pubs:
            p.refill = False
        if pump is not None:
            await pump


async def _pump(pubs: list[Publisher], stats: Stats, stop: asyncio.Event) -> None:
    """Gated mode: once deliveries free budget, top up the windows the gate left short."""
    starved = stats.starved
    while not stop.is_set():
        budget = stats.allow(1 << 30) if starved else 0
        while budget > 0 and starved:
            p = starved.popleft()
            p.starved = False
            free = p.window - len(p.inflight)
            k = min(free, budget)
            p.send(k)
            budget -= k
            if k < free:
                p.starved = True
                starved.appendleft(p)
        await asyncio.sleep(0.001)


async def _run_paced(spec: PublisherSpec, pubs: list[Publisher], stats: Stats,
                     report: Callable[..., None], result: dict[str, Any]) -> None:
    # Open loop: messages leave on a fixed schedule whether or not earlier ones were
    # acknowledged, round-robin so each node publishes at rate/N, as real nodes do.
    done = asyncio.Event()
    lag: list[float] = []

    async def ticker() -> None:
        t0 = time.monotonic()
        sent = 0
        n = len(pubs)
        period = 1.0 / spec.rate
        while not done.is_set():
            now = time.monotonic()
            due = int((now - t0) * spec.rate) - sent
            if due > 0:
                lag.append(now - (t0 + (sent + 1) * period))
                for k in range(sent, sent + due):
                    pubs[k % n].send(1)
                sent += due
            await asyncio.sleep(min(period, 0.002))

    task = asyncio.create_task(ticker())
    try:
        await _window(spec, stats, report, result)
    finally:
        done.set()
        await task
    lag.sort()
    result["schedule_lag_p99_ms"] = _pct(lag, 0.99) * 1000.0
    result["target_rate"] = spec.rate


def publisher_main(conn: Connection, spec: PublisherSpec, delivered: Any = None) -> None:
    _install_fast_loop()

    def report(*msg: Any) -> None:
        conn.send(msg)

    try:
        result = asyncio.run(_publisher(spec, report, delivered))
        conn.send(("result", result))
    except Exception as exc:  # the orchestrator must learn why, not just see a dead pipe
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _subscriber(spec: SubscriberSpec, conn: Connection, delivered: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = Stats(delivered)
    _, proto = await loop.create_connection(lambda: Subscriber(stats), spec.host, spec.port)
    assert proto.transport is not None
    proto.transport.write(connect_packet(spec.client_id, spec.username, spec.password))
    rc = await asyncio.wait_for(proto.connack, 15)
    if rc != 0:
        raise ConnectionError(f"subscriber CONNACK rc={rc}")
    proto.transport.write(subscribe_packet(1, spec.topic_filter, 1))
    granted = await asyncio.wait_for(proto.suback, 15)
    if not granted or granted[0] > 2:
        raise ConnectionError(f"subscription refused: {granted!r}")
    conn.send(("ready", time.monotonic()))
    timeline: list[tuple[float, int]] = []
    c0 = _cpu_s()
    t_end = time.monotonic() + spec.max_s
    while time.monotonic() < t_end and not proto.closed:
        timeline.append((time.monotonic(), stats.received))
        if conn.poll():
            break
        await asyncio.sleep(spec.sample_s)
    timeline.append((time.monotonic(), stats.received))
    proto.close()
    return {"received": stats.received, "timeline": timeline, "cpu_s": _cpu_s() - c0,
            "lost_connection": stats.lost > 0}


def subscriber_main(conn: Connection, spec: SubscriberSpec, delivered: Any = None) -> None:
    _install_fast_loop()
    try:
        result = asyncio.run(_subscriber(spec, conn, delivered))
        conn.send(("result", result))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def count_at(timeline: list[tuple[float, int]], t: float) -> float:
    """Messages the subscriber had received at monotonic time ``t`` (linear interpolation)."""
    if not timeline:
        return 0.0
    if t <= timeline[0][0]:
        return float(timeline[0][1])
    for (ta, ca), (tb, cb) in itertools.pairwise(timeline):
        if ta <= t <= tb:
            return ca + (cb - ca) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
    return float(timeline[-1][1])
