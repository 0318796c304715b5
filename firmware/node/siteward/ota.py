# Over-the-air updates on the node.
#
# A manifest arrives on devices/{id}/ota (envelope: manifest text + Ed25519 signature +
# download URL). The node checks the signature against the keys it was provisioned with,
# that the manifest is for it (its id, or its project when the manifest names no
# device), and that the version is newer than what it runs; then streams the image from
# the gateway into the inactive OTA partition (or, on builds without OTA partitions, the
# application files into a staging directory) while hashing, checks size and SHA-256,
# switches, reboots, and confirms only once it is back on the broker. Anything that goes
# wrong before the switch leaves the running firmware untouched.
import binascii
import hashlib
import json
import os
import time

from siteward import ed25519
from siteward import http

STATE_FILE = "ota_state.json"
STAGE_DIR = "stage"
BLOCK = 4096
CHUNK = 2048
MAX_ATTEMPTS = 5
RETRY_BASE_MS = 500
APP_DESC_MAGIC = 0xABCD5432


class OtaFailed(Exception):
    def __init__(self, code, detail=""):
        super().__init__(code)
        self.code = code
        self.detail = detail


def _cstr(b):
    i = b.find(b"\x00")
    return bytes(b if i < 0 else b[:i]).decode()


def version_tuple(v):
    core = v.split("-")[0].split("+")[0]
    out = []
    for p in core.split("."):
        out.append(int(p))
    return tuple(out)


def _read_json(name):
    try:
        with open(name) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(name, obj):
    tmp = name + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, name)


def _remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


def _rmtree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        return
    for e in entries:
        p = path + "/" + e[0]
        if e[1] == 0x4000:
            _rmtree(p)
        else:
            _remove(p)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _makedirs(path):
    cur = ""
    for part in path.split("/"):
        cur = part if not cur else cur + "/" + part
        try:
            os.mkdir(cur)
        except OSError:
            pass


def running_partition():
    try:
        import esp32

        return esp32.Partition(esp32.Partition.RUNNING)
    except (ImportError, OSError, AttributeError):
        return None


def image_identity():
    """(project, version) from the app description of the running image, or None."""
    p = running_partition()
    if p is None:
        return None
    buf = bytearray(BLOCK)
    try:
        p.readblocks(0, buf)
    except OSError:
        return None
    # image header (24) + first segment header (8), then esp_app_desc_t
    if buf[0] != 0xE9 or int.from_bytes(buf[32:36], "little") != APP_DESC_MAGIC:
        return None
    return _cstr(buf[80:112]), _cstr(buf[48:80])


def partition_mode():
    """True when the build has OTA partitions to update into."""
    p = running_partition()
    if p is None:
        return False
    try:
        return p.get_next_update() is not None
    except OSError:
        return False


class PartitionSink:
    """Writes the stream into the inactive OTA partition, a 4 KiB block at a time."""

    def __init__(self, size):
        import esp32

        self.part = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
        psize = self.part.info()[3]
        if size > psize:
            raise OtaFailed("too_large", "image of %d bytes, partition holds %d" % (size, psize))
        self.size = size
        self.buf = bytearray(BLOCK)
        self.fill = 0
        self.block = 0

    def feed(self, data):
        pos = 0
        n = len(data)
        while pos < n:
            take = min(BLOCK - self.fill, n - pos)
            self.buf[self.fill:self.fill + take] = data[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == BLOCK:
                self.part.writeblocks(self.block, self.buf)
                self.block += 1
                self.fill = 0

    def finish(self, sha256):
        if self.fill:
            for i in range(self.fill, BLOCK):
                self.buf[i] = 0xFF
            self.part.writeblocks(self.block, self.buf)
            self.fill = 0
        # read back what the flash holds: a write that did not stick fails here, not at boot
        h = hashlib.sha256()
        left = self.size
        blk = 0
        buf = bytearray(BLOCK)
        while left > 0:
            self.part.readblocks(blk, buf)
            h.update(buf if left >= BLOCK else memoryview(buf)[:left])
            left -= BLOCK
            blk += 1
        if binascii.hexlify(h.digest()).decode() != sha256:
            raise OtaFailed("readback_mismatch", "flash content differs from the download")

    def commit(self):
        self.part.set_boot()

    def abort(self):
        pass


class FilesSink:
    """Unpacks a file bundle (firmware/tools/bundle.py) into the staging directory."""

    def __init__(self, size, project):
        self.project = project
        _rmtree(STAGE_DIR)
        os.mkdir(STAGE_DIR)
        self.head = bytearray()
        self.files = None
        self.cur = None
        self.cur_left = 0
        self.cur_hash = None
        self.cur_meta = None
        self.version = None

    def _open_next(self):
        while self.files:
            meta = self.files.pop(0)
            path = STAGE_DIR + "/" + meta["path"]
            if "/" in meta["path"]:
                _makedirs(path.rsplit("/", 1)[0])
            self.cur = open(path, "wb")
            self.cur_left = meta["size"]
            self.cur_hash = hashlib.sha256()
            self.cur_meta = meta
            if self.cur_left:
                return
            self._close_current()
        self.cur = None

    def _close_current(self):
        self.cur.close()
        if binascii.hexlify(self.cur_hash.digest()).decode() != self.cur_meta["sha256"]:
            raise OtaFailed("sha256_mismatch", "bundle file %s" % self.cur_meta["path"])
        self.cur = None

    def feed(self, data):
        data = bytes(data)
        if self.files is None:
            self.head += data
            nl = self.head.find(b"\n", 5)
            if nl < 0:
                if len(self.head) > 8192:
                    raise OtaFailed("bad_bundle", "header too long")
                return
            if bytes(self.head[:5]) != b"SWB1\n":
                raise OtaFailed("bad_bundle", "not a file bundle")
            hdr = json.loads(bytes(self.head[5:nl]))
            if hdr.get("project") != self.project:
                raise OtaFailed("wrong_project", hdr.get("project", ""))
            self.version = hdr.get("version")
            self.files = list(hdr["files"])
            for f in self.files:
                p = f["path"]
                if p.startswith("/") or ".." in p.split("/"):
                    raise OtaFailed("bad_bundle", "unsafe path %s" % p)
            data = bytes(self.head[nl + 1:])
            self.head = None
            self._open_next()
        pos = 0
        while pos < len(data):
            if self.cur is None:
                raise OtaFailed("bad_bundle", "data after the last file")
            take = min(self.cur_left, len(data) - pos)
            piece = data[pos:pos + take]
            self.cur.write(piece)
            self.cur_hash.update(piece)
            self.cur_left -= take
            pos += take
            if self.cur_left == 0:
                self._close_current()
                self._open_next()

    def finish(self, sha256):
        if self.files is None or self.cur is not None or self.files:
            raise OtaFailed("bad_bundle", "bundle ended early")

    def commit(self):
        active = None
        try:
            with open("app_active") as f:
                active = f.read().strip()
        except OSError:
            pass
        target = "app_b" if active == "app_a" else "app_a"
        _rmtree(target)
        os.rename(STAGE_DIR, target)
        with open("app_next", "w") as f:
            f.write(target)
        _remove("app_trial")

    def abort(self):
        if self.cur is not None:
            try:
                self.cur.close()
            except OSError:
                pass
        _rmtree(STAGE_DIR)


class Updater:
    def __init__(self, node):
        self.node = node
        self.busy = False
        self.keys = []
        for k in node.cfg.get("ota_keys", []):
            try:
                raw = binascii.a2b_base64(k)
                if len(raw) == 32:
                    self.keys.append(raw)
            except ValueError:
                pass

    # -- checks ---------------------------------------------------------------------------
    def check(self, payload):
        """The manifest (dict) and envelope, or OtaFailed naming why it is refused."""
        try:
            env = json.loads(payload)
            text = env["manifest"]
            sig = binascii.a2b_base64(env["sig"])
        except (ValueError, KeyError, TypeError):
            raise OtaFailed("bad_envelope")
        if not self.keys:
            raise OtaFailed("no_keys", "node has no OTA public key")
        data = text.encode()
        if not any(ed25519.verify(k, data, sig) for k in self.keys):
            raise OtaFailed("bad_signature")
        try:
            m = json.loads(text)
        except ValueError:
            raise OtaFailed("bad_manifest")
        node = self.node
        if m.get("v") != 1 or m.get("type") not in ("app", "files"):
            raise OtaFailed("bad_manifest", "unsupported manifest")
        if m.get("device") not in (None, node.id):
            raise OtaFailed("wrong_device", str(m.get("device")))
        project, current = node.identity()
        if m.get("project") != project:
            raise OtaFailed("wrong_project", str(m.get("project")))
        try:
            newer = version_tuple(m["version"]) > version_tuple(current)
        except (ValueError, KeyError):
            raise OtaFailed("bad_manifest", "bad version")
        if not newer:
            raise OtaFailed("not_newer", "runs %s, manifest offers %s" % (current, m["version"]))
        # a replayed manifest is an older or the same version: refused above as not_newer
        chip = node.chip()
        if m["type"] == "app" and m.get("chip") and chip and m["chip"] != chip:
            raise OtaFailed("wrong_chip", "image for %s, this is %s" % (m["chip"], chip))
        if m["type"] == "app" and not partition_mode():
            raise OtaFailed("no_ota_partition", "this build updates application files only")
        return m, env

    # -- the update -----------------------------------------------------------------------
    def handle(self, payload):
        if self.busy:
            # a redelivered manifest while one is installing: the running update answers for it
            print("ota: busy, manifest ignored")
            return False
        self.busy = True
        try:
            return self._handle(payload)
        finally:
            self.busy = False

    def _handle(self, payload):
        node = self.node
        campaign = None
        try:
            try:
                campaign = json.loads(payload).get("campaign")
            except (ValueError, AttributeError):
                pass
            m, env = self.check(payload)
        except OtaFailed as e:
            node.ota_report("FAILED", reason=e.code, detail=e.detail, campaign=campaign)
            return False
        node.ota_report("STARTED", version=m["version"], campaign=campaign)
        sink = None
        try:
            sink = PartitionSink(m["size"]) if m["type"] == "app" else FilesSink(m["size"], m["project"])
            self._download(env.get("url") or "", m, sink, campaign)
            sink.finish(m["sha256"])
            sink.commit()
        except OtaFailed as e:
            if sink is not None:
                sink.abort()
            node.ota_report("FAILED", reason=e.code, detail=e.detail, campaign=campaign)
            return False
        except OSError as e:
            if sink is not None:
                sink.abort()
            node.ota_report("FAILED", reason="io_error", detail=str(e), campaign=campaign)
            return False
        _write_json(STATE_FILE, {"version": m["version"], "from": node.identity()[1], "type": m["type"],
                                 "campaign": campaign})
        node.ota_report("IN_PROGRESS", progress=100, phase="rebooting", version=m["version"], campaign=campaign)
        node.reboot("ota")
        return True

    def _download(self, url, m, sink, campaign):
        node = self.node
        host, port, path = http.split_url(url, node.cfg["mqtt"]["host"], node.cfg.get("http_port", 8080))
        size = m["size"]
        h = hashlib.sha256()
        # bytes hashed and written so far: a cut connection resumes exactly here
        done = [0]
        step = [0]
        attempt = 0

        def feed(mv):
            h.update(mv)
            sink.feed(mv)
            done[0] += len(mv)
            node.feed_watchdog()
            pct = done[0] * 100 // size
            if step[0] + 10 <= pct < 100:
                step[0] = pct - pct % 10
                node.ota_report("IN_PROGRESS", progress=step[0], campaign=campaign)
                node.service()

        while done[0] < size:
            if attempt >= MAX_ATTEMPTS:
                raise OtaFailed("download_failed", "connection lost %d times" % attempt)
            if attempt:
                # the gateway may be restarting or the Wi-Fi dropping out: back off, then resume
                time.sleep_ms(node.cfg.get("ota_retry_ms", RETRY_BASE_MS) << (attempt - 1))
                node.service()
            attempt += 1
            try:
                status, length, offset, s = http.get(host, port, path, start=done[0])
            except OSError:
                continue
            try:
                if status in (401, 403, 404, 410):
                    raise OtaFailed("download_refused", "HTTP %d" % status)
                if status == 200 and done[0]:
                    raise OtaFailed("download_failed", "server ignored the Range request")
                if status not in (200, 206) or length is None or (status == 206 and offset != done[0]):
                    continue
                if done[0] + length != size:
                    raise OtaFailed("size_mismatch",
                                    "server offers %d bytes, manifest says %d" % (done[0] + length, size))
                http.read_body(s, length, CHUNK, feed)
            except OSError:
                pass
            finally:
                s.close()
        if binascii.hexlify(h.digest()).decode() != m["sha256"]:
            raise OtaFailed("sha256_mismatch")

    # -- after the reboot -----------------------------------------------------------------
    def confirm(self):
        """Called once back on the broker: confirm the new firmware, or report the rollback."""
        st = _read_json(STATE_FILE)
        running = self.node.identity()[1]
        if st is None:
            return
        if running == st["version"]:
            if st["type"] == "app":
                try:
                    import esp32

                    esp32.Partition.mark_app_valid_cancel_rollback()
                except (ImportError, OSError):
                    pass
            else:
                with open("app_next") as f:
                    nxt = f.read().strip()
                with open("app_active.tmp", "w") as f:
                    f.write(nxt)
                os.rename("app_active.tmp", "app_active")
                _remove("app_next")
                _remove("app_trial")
            self.node.ota_report("SUCCESS", version=running, campaign=st.get("campaign"))
        else:
            _remove("app_rolled_back")
            self.node.ota_report("FAILED", reason="rolled_back", detail="running %s" % running,
                                 version=running, campaign=st.get("campaign"))
        _remove(STATE_FILE)

    def pending(self):
        return _read_json(STATE_FILE) is not None
