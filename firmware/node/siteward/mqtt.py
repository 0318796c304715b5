# A small MQTT 3.1.1 client: what a node needs and no more.
#
# CONNECT with credentials and a last will, PUBLISH at QoS 0/1, SUBSCRIBE, keepalive
# pings, and incoming PUBLISH (QoS 1 acknowledged). Blocking socket with a poll() for
# "is anything there", so one loop can mix sensor reads, pings and downloads.
import select
import socket
import struct

CONNECT_TIMEOUT_S = 10


class MQTTError(OSError):
    pass


def _str(s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def _varlen(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class MQTTClient:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=60):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.sock = None
        self.poller = None
        self.pid = 0
        self.will = None
        self.on_message = None

    def set_last_will(self, topic, msg, retain=True, qos=1):
        self.will = (topic, msg, retain, qos)

    def _send(self, data):
        view = memoryview(data)
        while view:
            n = self.sock.write(view)
            if n is None:
                continue
            view = view[n:]

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.read(n - len(buf))
            if not chunk:
                raise MQTTError("connection closed by broker")
            buf += chunk
        return buf

    def _packet(self, ptype, body):
        self._send(bytes([ptype]) + _varlen(len(body)) + body)

    def connect(self, clean=True):
        addr = socket.getaddrinfo(self.host, self.port)[0][-1]
        self.sock = socket.socket()
        self.sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            self.sock.connect(addr)
        except OSError:
            self.sock.close()
            self.sock = None
            raise
        flags = 0x02 if clean else 0
        payload = _str(self.client_id)
        if self.will:
            topic, msg, retain, qos = self.will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _str(topic) + _str(msg)
        if self.user is not None:
            flags |= 0x80
            payload += _str(self.user)
        if self.password is not None:
            flags |= 0x40
            payload += _str(self.password)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive) + payload
        self._packet(0x10, body)
        hdr = self._recv(4)
        if hdr[0] != 0x20 or hdr[1] != 2:
            self.close()
            raise MQTTError("unexpected answer to CONNECT")
        if hdr[3] != 0:
            self.close()
            raise MQTTError("broker refused the connection (code %d)" % hdr[3])
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        return hdr[2] & 1

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def disconnect(self):
        # a clean DISCONNECT: the broker drops the last will
        try:
            self._send(b"\xe0\x00")
        except OSError:
            pass
        self.close()

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    def publish(self, topic, msg, retain=False, qos=1):
        if isinstance(msg, str):
            msg = msg.encode()
        body = _str(topic)
        if qos:
            body += struct.pack("!H", self._next_pid())
        self._packet(0x30 | (qos << 1) | (1 if retain else 0), body + msg)

    def subscribe(self, topic, qos=1):
        self._packet(0x82, struct.pack("!H", self._next_pid()) + _str(topic) + bytes([qos]))

    def ping(self):
        self._send(b"\xc0\x00")

    def poll(self, timeout_ms=0):
        """Handle every packet waiting (up to timeout_ms for the first one); returns how many."""
        handled = 0
        while True:
            if not self.poller.poll(timeout_ms if handled == 0 else 0):
                return handled
            self._read_packet()
            handled += 1

    def _read_packet(self):
        first = self._recv(1)[0]
        n, shift = 0, 0
        while True:
            b = self._recv(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        body = self._recv(n) if n else b""
        ptype = first & 0xF0
        if ptype == 0x30:
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            qos = (first >> 1) & 3
            if qos:
                pid = body[pos:pos + 2]
                pos += 2
                self._send(b"\x40\x02" + pid)
            if self.on_message:
                self.on_message(topic, body[pos:])
        # CONNACK/PUBACK/SUBACK/PINGRESP need nothing more from us
