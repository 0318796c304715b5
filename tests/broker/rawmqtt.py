"""A byte-level MQTT 3.1.1 client for tests that need to misbehave on purpose.

Real client libraries hide exactly what these tests look at (packet ids, DUP flags, the
order of acknowledgements) or refuse to do what the tests need (go silent, never read,
announce a 10 MB packet), so the broker tests speak the protocol directly where it matters.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _str(topic) + _str(message)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    vh = _str("MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big")
    return packet(0x10, vh + payload)


def publish_packet(
    topic: str,
    payload: bytes,
    qos: int = 0,
    pid: int | None = None,
    *,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    body = _str(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return packet(0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0), body)


def subscribe_packet(pid: int, filters: list[tuple[str, int]]) -> bytes:
    body = pid.to_bytes(2, "big") + b"".join(_str(f) + bytes((q,)) for f, q in filters)
    return packet(0x82, body)


def ack_packet(kind: int, pid: int) -> bytes:
    return packet((kind << 4) | (2 if kind == PUBREL else 0), pid.to_bytes(2, "big"))


@dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def pid(self) -> int:
        if self.kind == PUBLISH:
            tlen = int.from_bytes(self.body[:2], "big")
            return int.from_bytes(self.body[2 + tlen : 4 + tlen], "big")
        return int.from_bytes(self.body[:2], "big")

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 1)

    @property
    def topic(self) -> str:
        tlen = int.from_bytes(self.body[:2], "big")
        return self.body[2 : 2 + tlen].decode()

    @property
    def payload(self) -> bytes:
        tlen = int.from_bytes(self.body[:2], "big")
        return self.body[2 + tlen + (2 if self.qos else 0) :]


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.connack_code: int | None = None
        self.session_present = False

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        rcvbuf: int | None = None,
    ) -> RawClient:
        if rcvbuf is not None:
            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
        else:
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, port: int, client_id: str, *, expect: int | None = 0, **kw: object) -> RawClient:
        open_kw = {k: kw.pop(k) for k in ("host", "ssl_context", "rcvbuf") if k in kw}
        c = await cls.open(port, **open_kw)  # type: ignore[arg-type]
        c.send(connect_packet(client_id, **kw))  # type: ignore[arg-type]
        ack = await c.read()
        assert ack is not None and ack.kind == CONNACK, ack
        c.session_present = bool(ack.body[0] & 1)
        c.connack_code = ack.body[1]
        if expect is not None:
            assert c.connack_code == expect, f"CONNACK {c.connack_code}, expected {expect}"
        return c

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, within: float = 5.0) -> Packet | None:
        """Next packet, or None at EOF."""
        async with asyncio.timeout(within):
            try:
                first = (await self.reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await self.reader.readexactly(length) if length else b""
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
        return Packet(first >> 4, first & 0x0F, body)

    async def expect(self, kind: int, within: float = 5.0) -> Packet:
        p = await self.read(within)
        assert p is not None, f"connection closed, expected packet type {kind}"
        assert p.kind == kind, f"got packet type {p.kind}, expected {kind}"
        return p

    async def subscribe(self, filters: list[tuple[str, int]], pid: int = 1) -> list[int]:
        self.send(subscribe_packet(pid, filters))
        while True:
            p = await self.expect_any()
            if p.kind == SUBACK:
                return list(p.body[2:])

    async def expect_any(self, within: float = 5.0) -> Packet:
        p = await self.read(within)
        assert p is not None, "connection closed"
        return p

    async def ping(self, within: float = 5.0) -> list[Packet]:
        """PINGREQ; returns whatever arrived before the PINGRESP."""
        self.send(packet(0xC0, b""))
        before: list[Packet] = []
        while True:
            p = await self.expect_any(within)
            if p.kind == PINGRESP:
                return before
            before.append(p)

    async def closed_by_peer(self, within: float = 5.0) -> bool:
        """True if the broker closes the connection (reading only EOF) within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def disconnect(self) -> None:
        self.send(packet(0xE0, b""))
        self.writer.close()

    def close(self) -> None:
        self.writer.close()
