# Test shim: the ESP32 `esp32` module (OTA partitions and NVS) for the unix port.
#
# Flash lives in files under flash/ in the node's directory:
#   layout.json   which partitions exist: {"ota": true} (ota_0 + ota_1) or {"ota": false} (factory only)
#   ota_0.bin, ota_1.bin, factory.bin   partition contents (app images)
#   otadata.json  what the bootloader reads: boot partition and each one's state
#   nvs.bin       an NVS partition image as esp-idf-nvs-partition-gen writes it
# Importing this module is "booting": the bootloader logic of ESP-IDF with
# CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE runs here (new -> pending_verify on first boot;
# still pending_verify on the next boot -> aborted, boot the other partition).
import json
import struct

FLASH = "flash/"
BLOCK = 4096
PART_SIZE = 0x180000


def _load(name, default):
    try:
        with open(FLASH + name) as f:
            return json.load(f)
    except OSError:
        return default


def _save(name, obj):
    with open(FLASH + name, "w") as f:
        json.dump(obj, f)


_layout = _load("layout.json", {"ota": False})
_labels = ["ota_0", "ota_1"] if _layout.get("ota") else ["factory"]


def _valid_image(label):
    try:
        with open(FLASH + label + ".bin", "rb") as f:
            return f.read(1) == b"\xe9"
    except OSError:
        return False


def _boot():
    if not _layout.get("ota"):
        return "factory"
    od = _load("otadata.json", {"boot": "ota_0", "state": {}})
    boot = od["boot"]
    st = od["state"].get(boot, "valid")
    if st == "new" and _valid_image(boot):
        od["state"][boot] = "pending_verify"
    elif st in ("pending_verify", "aborted") or not _valid_image(boot):
        # the new app never confirmed itself (or is not an image): roll back
        od["state"][boot] = "aborted"
        boot = "ota_1" if boot == "ota_0" else "ota_0"
        od["boot"] = boot
        print("[shim] bootloader: rollback to", boot)
    _save("otadata.json", od)
    return boot


_running = _boot()


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=BLOCK):
        if id == Partition.RUNNING:
            id = _running
        elif id == Partition.BOOT:
            id = _load("otadata.json", {"boot": _running})["boot"] if _layout.get("ota") else "factory"
        if id not in _labels:
            raise ValueError("partition not found")
        self.label = id

    def __repr__(self):
        return "<Partition " + self.label + ">"

    def info(self):
        sub = {"ota_0": 0x10, "ota_1": 0x11, "factory": 0x00}[self.label]
        addr = {"ota_0": 0x20000, "ota_1": 0x1A0000, "factory": 0x10000}[self.label]
        return (0, sub, addr, PART_SIZE, self.label, False)

    def _file(self, mode):
        try:
            return open(FLASH + self.label + ".bin", mode)
        except OSError:
            with open(FLASH + self.label + ".bin", "wb") as f:
                f.write(b"")
            return open(FLASH + self.label + ".bin", mode)

    def readblocks(self, block_num, buf, offset=0):
        pos = block_num * BLOCK + offset
        if pos + len(buf) > PART_SIZE:
            raise OSError(22)
        with self._file("rb") as f:
            f.seek(pos)
            data = f.read(len(buf))
        n = len(data)
        buf[:n] = data
        for i in range(n, len(buf)):
            buf[i] = 0xFF  # erased flash reads as 0xFF

    def writeblocks(self, block_num, buf, offset=None):
        # without an offset the driver erases whole 4 KiB sectors first: length must fit them
        if offset is None and len(buf) % BLOCK:
            raise OSError(22)
        pos = block_num * BLOCK + (offset or 0)
        if pos + len(buf) > PART_SIZE:
            raise OSError(22)
        with self._file("rb") as f:
            data = bytearray(f.read())
        if len(data) < pos + len(buf):
            data += b"\xff" * (pos + len(buf) - len(data))
        data[pos:pos + len(buf)] = buf
        with open(FLASH + self.label + ".bin", "wb") as f:
            f.write(data)

    def ioctl(self, op, arg):
        if op == 4:
            return PART_SIZE // BLOCK
        if op == 5:
            return BLOCK
        if op == 6:
            return 0
        return None

    def set_boot(self):
        od = _load("otadata.json", {"boot": _running, "state": {}})
        od["boot"] = self.label
        od["state"][self.label] = "new"
        _save("otadata.json", od)

    def get_next_update(self):
        if not _layout.get("ota"):
            raise OSError(2)  # ENOENT: no OTA partitions in this build
        return Partition("ota_1" if self.label == "ota_0" else "ota_0")

    @staticmethod
    def mark_app_valid_cancel_rollback():
        if not _layout.get("ota"):
            return
        od = _load("otadata.json", {"boot": _running, "state": {}})
        od["state"][_running] = "valid"
        _save("otadata.json", od)

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None):
        return [Partition(x) for x in _labels if label is None or x == label]


# -- NVS ---------------------------------------------------------------------------------
# Reads the NVS partition format of ESP-IDF (v2, multipage blobs): 4 KiB pages with a
# 32-byte header and an entry-state bitmap, then 126 entries of 32 bytes each.

_PAGE = 4096
_ACTIVE, _FULL = 0xFFFFFFFE, 0xFFFFFFFC
_T_I32, _T_SZ, _T_BLOB_DATA, _T_BLOB_IDX = 0x14, 0x21, 0x42, 0x48


def _parse_nvs():
    try:
        with open(FLASH + "nvs.bin", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    namespaces = {}
    items = {}
    chunks = {}
    for base in range(0, len(data) - _PAGE + 1, _PAGE):
        page = data[base:base + _PAGE]
        state = struct.unpack("<I", page[0:4])[0]
        if state not in (_ACTIVE, _FULL):
            continue
        bitmap = page[32:64]
        i = 0
        while i < 126:
            st = (bitmap[i // 4] >> ((i % 4) * 2)) & 3
            if st != 2:
                i += 1
                continue
            e = page[64 + 32 * i:96 + 32 * i]
            ns, typ, span, chunk = e[0], e[1], e[2], e[3]
            key = e[8:24].split(b"\x00")[0].decode()
            payload = e[24:32]
            if ns == 0:
                namespaces[payload[0]] = key
            elif typ == _T_I32:
                items[(ns, key)] = struct.unpack("<i", payload[:4])[0]
            elif typ in (_T_SZ, _T_BLOB_DATA):
                size = struct.unpack("<H", payload[:2])[0]
                raw = page[96 + 32 * i:96 + 32 * i + size]
                if typ == _T_SZ:
                    items[(ns, key)] = raw.rstrip(b"\x00")
                else:
                    chunks[(ns, key, chunk)] = raw
            elif typ == _T_BLOB_IDX:
                items[(ns, key)] = ("blob", payload[4], payload[5])
            i += max(1, span)
    out = {}
    for (ns, key), v in items.items():
        if isinstance(v, tuple):
            _, count, start = v
            v = b"".join(chunks.get((ns, key, start + c), b"") for c in range(count))
        out[(namespaces.get(ns), key)] = v
    return out


class NVS:
    _data = None

    def __init__(self, namespace):
        if NVS._data is None:
            NVS._data = _parse_nvs()
        self.ns = namespace

    def _get(self, key):
        v = NVS._data.get((self.ns, key))
        if v is None:
            raise OSError(-4354)  # ESP_ERR_NVS_NOT_FOUND
        return v

    def get_i32(self, key):
        v = self._get(key)
        if not isinstance(v, int):
            raise OSError(-4355)  # ESP_ERR_NVS_TYPE_MISMATCH
        return v

    def get_blob(self, key, buf):
        v = self._get(key)
        if isinstance(v, int):
            raise OSError(-4355)
        if len(v) > len(buf):
            raise OSError(-4364)  # ESP_ERR_NVS_INVALID_LENGTH
        buf[:len(v)] = v
        return len(v)

    def set_i32(self, key, value):
        NVS._data[(self.ns, key)] = int(value)

    def set_blob(self, key, value):
        NVS._data[(self.ns, key)] = bytes(value)

    def erase_key(self, key):
        self._get(key)
        del NVS._data[(self.ns, key)]

    def commit(self):
        pass
