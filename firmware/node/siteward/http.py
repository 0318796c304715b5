# Streaming HTTP/1.1 GET with Range, for firmware downloads: the body is handed over in
# chunks as it arrives, never held whole in RAM.
import socket

TIMEOUT_S = 15


class HTTPError(OSError):
    pass


def split_url(url, default_host, default_port):
    """(host, port, path) of an absolute http:// URL, or of a path resolved against the defaults."""
    if url.startswith("https://"):
        raise HTTPError("https downloads are not supported on the node")
    if url.startswith("http://"):
        rest = url[7:]
        slash = rest.find("/")
        hostport, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        if ":" in hostport:
            host, port = hostport.rsplit(":", 1)
            return host, int(port), path
        return hostport, 80, path
    if not url.startswith("/"):
        raise HTTPError("bad download URL")
    return default_host, default_port, url


def get(host, port, path, start=0, headers=None):
    """Open a GET; returns (status, length of the body, offset the body starts at, socket)."""
    addr = socket.getaddrinfo(host, port)[0][-1]
    s = socket.socket()
    s.settimeout(TIMEOUT_S)
    try:
        s.connect(addr)
        req = "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\nUser-Agent: siteward-node\r\n" % (
            path, host, port)
        if start:
            req += "Range: bytes=%d-\r\n" % start
        for k, v in (headers or {}).items():
            req += "%s: %s\r\n" % (k, v)
        s.write((req + "\r\n").encode())
        line = s.readline()
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise HTTPError("malformed HTTP status line")
        status = int(parts[1])
        length = None
        offset = 0
        while True:
            h = s.readline()
            if not h or h == b"\r\n":
                break
            name, _, value = h.decode().partition(":")
            name = name.strip().lower()
            value = value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "content-range":
                # "bytes 1000-1999/2000"
                offset = int(value.split()[1].split("-")[0])
            elif name == "transfer-encoding" and value.lower() != "identity":
                raise HTTPError("chunked transfer encoding is not supported")
        return status, length, offset, s
    except Exception:
        s.close()
        raise


def read_body(s, length, chunk, sink):
    """Feed up to ``length`` bytes to ``sink(data)`` as they arrive; returns how many came."""
    got = 0
    buf = bytearray(chunk)
    mv = memoryview(buf)
    while got < length:
        n = s.readinto(mv[:min(chunk, length - got)])
        if not n:
            return got
        sink(mv[:n])
        got += n
    return got
