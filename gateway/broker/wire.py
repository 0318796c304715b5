"""MQTT 3.1.1 byte layouts for the packets on the broker's hot path.

amqtt's packet classes build a handful of objects and read the stream a few bytes per await
for every PUBLISH; the broker layer parses a whole packet body from one buffer and builds
outgoing packets as bytes directly. CONNECT is still parsed by amqtt (see amqtt_fixes).
"""

from __future__ import annotations

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

# CONNACK return codes (MQTT 3.1.1 table 3.1)
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORISED = 5

SUBACK_FAILURE = 0x80

PINGRESP_BYTES = b"\xd0\x00"

# fixed-header first bytes with the flags the spec requires [MQTT-2.2.2-1]
_PUBACK = 0x40
_PUBREC = 0x50
_PUBCOMP = 0x70


class ProtocolViolation(Exception):
    """Malformed input: the connection is closed (and the will published) per MQTT 3.1.1."""


def encode_length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def puback(packet_id: int) -> bytes:
    return bytes((_PUBACK, 2, packet_id >> 8, packet_id & 0xFF))


def pubrec(packet_id: int) -> bytes:
    return bytes((_PUBREC, 2, packet_id >> 8, packet_id & 0xFF))


def pubcomp(packet_id: int) -> bytes:
    return bytes((_PUBCOMP, 2, packet_id >> 8, packet_id & 0xFF))


def connack(session_present: bool, code: int) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present and code == 0 else 0, code))


def suback(packet_id: int, codes: list[int]) -> bytes:
    body = bytes((packet_id >> 8, packet_id & 0xFF, *codes))
    return bytes((SUBACK << 4,)) + encode_length(len(body)) + body


def unsuback(packet_id: int) -> bytes:
    return bytes((UNSUBACK << 4, 2, packet_id >> 8, packet_id & 0xFF))


def encode_topic(topic: str) -> bytes:
    """Length-prefixed UTF-8 topic, computed once per routed message and reused per subscriber."""
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw


def publish(
    topic_field: bytes, payload: bytes, qos: int, packet_id: int, *, dup: bool, retain: bool
) -> bytes:
    """A PUBLISH packet; ``topic_field`` comes from :func:`encode_topic`."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (1 if retain else 0)
    if qos:
        rl = len(topic_field) + 2 + len(payload)
        return b"".join(
            (bytes((first,)), encode_length(rl), topic_field, packet_id.to_bytes(2, "big"), payload)
        )
    rl = len(topic_field) + len(payload)
    return b"".join((bytes((first,)), encode_length(rl), topic_field, payload))


def parse_publish(flags: int, body: bytes) -> tuple[str, int, int | None, bytes]:
    """(topic, qos, packet id, payload) of a PUBLISH body."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3")
    if len(body) < 2:
        raise ProtocolViolation("PUBLISH too short")
    tlen = (body[0] << 8) | body[1]
    end = 2 + tlen
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("topic is not UTF-8") from None
    if qos:
        if len(body) < end + 2:
            raise ProtocolViolation("PUBLISH too short")
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise ProtocolViolation("packet id 0")
        return topic, qos, pid, body[end + 2 :]
    if len(body) < end:
        raise ProtocolViolation("PUBLISH too short")
    return topic, 0, None, body[end:]


def _packet_id(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolViolation("missing packet id")
    return (body[0] << 8) | body[1]


def parse_packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolViolation("bad acknowledgement length")
    return (body[0] << 8) | body[1]


def _strings(body: bytes, start: int, with_qos: bool) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    i = start
    n = len(body)
    while i < n:
        if i + 2 > n:
            raise ProtocolViolation("truncated topic filter")
        flen = (body[i] << 8) | body[i + 1]
        end = i + 2 + flen
        if end > n:
            raise ProtocolViolation("truncated topic filter")
        try:
            text = body[i + 2 : end].decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("topic filter is not UTF-8") from None
        qos = 0
        if with_qos:
            if end >= n:
                raise ProtocolViolation("missing requested QoS")
            qos = body[end]
            if qos > 2:  # [MQTT-3-8.3-4]
                raise ProtocolViolation("requested QoS > 2")
            end += 1
        out.append((text, qos))
        i = end
    if not out:  # [MQTT-3.8.3-3], [MQTT-3.10.3-2]
        raise ProtocolViolation("no topic filter")
    return out


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    return _packet_id(body), _strings(body, 2, True)


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    return _packet_id(body), [f for f, _ in _strings(body, 2, False)]
