"""ESP32 application image parser and validator.

An ESP-IDF app image (what goes into an ``ota_N`` partition) is::

    common header   8 bytes   magic 0xE9, segment count, SPI mode, SPI size/freq, entry point
    extended header 16 bytes  WP pin, drive settings, chip id, chip revision range, hash-appended flag
    segments        n x (load address u32, length u32, data)
    padding         zeros up to the checksum byte, which ends a 16-byte block
    checksum        1 byte: 0xEF XOR every segment data byte
    SHA-256         32 bytes over everything before it (when the hash-appended flag is set)

The first segment of an app starts with ``esp_app_desc_t`` (magic 0xABCD5432), which holds
the version and project name the gateway shows and compares. Uploads that are *not* an app
(a bootloader, a partition table, a merged full-flash image) are common mistakes; each is
named precisely so a technician knows what to upload instead.

The ROM bootloader and the second-stage bootloader check the same things on the chip; doing
it on the gateway means a broken image is refused before any node downloads it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF
APP_DESC_MAGIC = 0xABCD5432
PARTITION_MAGIC = b"\xaa\x50"
PARTITION_TABLE_OFFSET = 0x8000
SECURE_BOOT_V2_MAGIC = 0xE7
HEADER_LEN = 24
SEGMENT_HEADER_LEN = 8
APP_DESC_LEN = 256
MAX_SEGMENTS = 16
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # largest flash an ESP32 addresses

# esp_chip_id_t values in the extended header
CHIP_IDS: dict[int, str] = {
    0x0000: "esp32",
    0x0002: "esp32s2",
    0x0005: "esp32c3",
    0x0009: "esp32s3",
    0x000C: "esp32c2",
    0x000D: "esp32c6",
    0x0010: "esp32h2",
    0x0012: "esp32p4",
    0x0014: "esp32c61",
    0x0017: "esp32c5",
}
CHIP_NAMES = {v: k for k, v in CHIP_IDS.items()}

# Address windows the MMU maps from flash (instruction and data caches) across the
# ESP32 family. An app always has segments there; a bootloader never does: it runs
# from RAM before the MMU is set up.
_FLASH_MAPPED = (
    (0x3C000000, 0x3E000000),  # S2/S3/C-series DROM
    (0x3F000000, 0x3F400000),  # S2 DROM
    (0x3F400000, 0x3F800000),  # ESP32 DROM
    (0x400C2000, 0x40C00000),  # ESP32 IROM
    (0x40080000 + 0x50000, 0x40C00000),  # S2 IROM
    (0x42000000, 0x44000000),  # S3/C-series IROM
)


class ImageRejected(ValueError):
    """An upload that is not a usable app image; ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Segment:
    load_addr: int
    offset: int  # of the data, in the file
    length: int


@dataclass(frozen=True, slots=True)
class AppImage:
    chip: str
    chip_id: int
    version: str | None
    project: str | None
    idf_version: str | None
    build_date: str | None
    secure_version: int | None
    entry: int
    segments: tuple[Segment, ...]
    image_len: int  # bytes up to and including the appended hash
    file_len: int
    sha256: str  # of the whole file: what nodes verify after downloading
    hash_appended: bool
    min_chip_rev: int
    max_chip_rev: int
    extras: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "chip": self.chip,
            "version": self.version,
            "project": self.project,
            "idf_version": self.idf_version,
            "build_date": self.build_date,
            "secure_version": self.secure_version,
            "entry": f"0x{self.entry:08x}",
            "segments": [{"addr": f"0x{s.load_addr:08x}", "len": s.length} for s in self.segments],
            "size": self.file_len,
            "sha256": self.sha256,
        }


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _flash_mapped(addr: int) -> bool:
    return any(lo <= addr < hi for lo, hi in _FLASH_MAPPED)


def _looks_like_partition_table(data: bytes) -> bool:
    return data[:2] == PARTITION_MAGIC and len(data) >= 32


def parse_app_desc(seg_data: bytes) -> dict[str, Any] | None:
    """``esp_app_desc_t`` at the start of the first segment, or None when absent."""
    if len(seg_data) < APP_DESC_LEN:
        return None
    magic, secure_version = struct.unpack_from("<II", seg_data, 0)
    if magic != APP_DESC_MAGIC:
        return None
    return {
        "secure_version": secure_version,
        "version": _cstr(seg_data[16:48]),
        "project": _cstr(seg_data[48:80]),
        "time": _cstr(seg_data[80:96]),
        "date": _cstr(seg_data[96:112]),
        "idf_version": _cstr(seg_data[112:144]),
        "elf_sha256": seg_data[144:176].hex(),
    }


def _walk(data: bytes) -> tuple[int, list[Segment], int, int, bool, int, int, int]:
    """Walk header and segments; returns (chip_id, segments, checksum_offset, entry, hash_appended,
    min_rev, max_rev, image_end). Raises ImageRejected for structural problems."""
    if len(data) < HEADER_LEN:
        raise ImageRejected("truncated", f"file is {len(data)} bytes; an image header alone is {HEADER_LEN}")
    magic, nseg, _mode, _size_freq, entry = struct.unpack_from("<BBBBI", data, 0)
    if magic != IMAGE_MAGIC:
        raise ImageRejected("bad_magic", f"first byte is 0x{magic:02x}, an ESP32 image starts with 0xE9")
    _wp, _d1, _d2, _d3, chip_id, _min_old, min_rev, max_rev = struct.unpack_from("<BBBBHBHH", data, 8)
    hash_appended = data[23]
    if hash_appended not in (0, 1):
        raise ImageRejected("bad_header", f"hash-appended flag is {hash_appended}, expected 0 or 1")
    if not 1 <= nseg <= MAX_SEGMENTS:
        raise ImageRejected("bad_segments", f"header declares {nseg} segments (1..{MAX_SEGMENTS} allowed)")
    pos = HEADER_LEN
    segments: list[Segment] = []
    for i in range(nseg):
        if pos + SEGMENT_HEADER_LEN > len(data):
            raise ImageRejected("truncated", f"file ends inside the header of segment {i} (offset {pos})")
        addr, length = struct.unpack_from("<II", data, pos)
        pos += SEGMENT_HEADER_LEN
        if length > len(data) - pos:
            raise ImageRejected(
                "truncated",
                f"segment {i} at 0x{addr:08x} declares {length} bytes, only {len(data) - pos} remain in the file")
        if length % 4:
            raise ImageRejected("bad_segments", f"segment {i} length {length} is not a multiple of 4")
        segments.append(Segment(addr, pos, length))
        pos += length
    checksum_at = (pos + 16) & ~15
    checksum_at -= 1
    if checksum_at >= len(data):
        raise ImageRejected("truncated", "file ends before the checksum byte")
    end = checksum_at + 1 + (32 if hash_appended else 0)
    if end > len(data):
        raise ImageRejected("truncated", f"file ends inside the appended SHA-256 ({len(data)} < {end} bytes)")
    return chip_id, segments, checksum_at, entry, bool(hash_appended), min_rev, max_rev, end


def validate_app_image(data: bytes, *, chip: str | None = None, require_hash: bool = True) -> AppImage:
    """Check ``data`` is a complete, intact ESP32 app image (for ``chip`` when given).

    Raises :class:`ImageRejected` naming the first problem found.
    """
    if not data:
        raise ImageRejected("empty", "the file is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected("too_large", f"{len(data)} bytes is larger than any ESP32 flash")
    if _looks_like_partition_table(data):
        raise ImageRejected("partition_table",
                            "this is a partition table (starts 0xAA 0x50), not an app image; "
                            "upload the application .bin (e.g. build/<project>.bin or firmware.bin)")
    if data[0] == 0xFF and len(data) > 0x1000 and data[0x1000] == IMAGE_MAGIC:
        raise ImageRejected("merged_image",
                            "this is a merged full-flash image (bootloader at 0x1000); OTA needs the app "
                            "image alone. Flash the merged image over USB with 'siteward node flash'.")
    chip_id, segments, checksum_at, entry, hash_appended, min_rev, max_rev, end = _walk(data)

    desc = parse_app_desc(data[segments[0].offset:segments[0].offset + segments[0].length])
    if desc is None:
        if not any(_flash_mapped(s.load_addr) for s in segments):
            merged = (len(data) > PARTITION_TABLE_OFFSET + 32
                      and _looks_like_partition_table(data[PARTITION_TABLE_OFFSET:]))
            if merged:
                raise ImageRejected("merged_image",
                                    "this is a merged full-flash image (bootloader + partition table + app); "
                                    "OTA needs the app image alone")
            raise ImageRejected("bootloader",
                                "this is a bootloader image (every segment loads into RAM, no app description); "
                                "OTA needs the application image")
        raise ImageRejected("no_app_desc",
                            "first segment has no esp_app_desc_t (magic 0xABCD5432): not an ESP-IDF app image")

    checksum = CHECKSUM_SEED
    for s in segments:
        for b in data[s.offset:s.offset + s.length]:
            checksum ^= b
    # zeros between the last segment and the checksum byte are part of the format
    if data[checksum_at] != checksum:
        raise ImageRejected("checksum_mismatch",
                            f"image checksum is 0x{data[checksum_at]:02x}, segments give 0x{checksum:02x}: "
                            "the file is corrupt (a flipped or changed byte)")
    if hash_appended:
        want = data[checksum_at + 1:end]
        got = hashlib.sha256(data[:checksum_at + 1]).digest()
        if want != got:
            raise ImageRejected("sha256_mismatch",
                                "appended SHA-256 does not match the image: the file is corrupt or was modified")
    elif require_hash:
        raise ImageRejected("no_hash", "image has no appended SHA-256 (build with the IDF default settings)")

    tail = data[end:]
    if tail and tail.strip(b"\xff") and tail[0] != SECURE_BOOT_V2_MAGIC:
        # secure-boot signature blocks and 0xFF padding may follow; anything else means
        # two files were concatenated or the upload was damaged
        raise ImageRejected("trailing_data", f"{len(tail)} unexpected bytes after the image")

    chip_name = CHIP_IDS.get(chip_id, f"unknown(0x{chip_id:04x})")
    if chip is not None and chip_name != chip:
        raise ImageRejected("wrong_chip", f"image is built for {chip_name}, this target needs {chip}")
    if chip_id not in CHIP_IDS:
        raise ImageRejected("wrong_chip", f"image names chip id 0x{chip_id:04x}, which is no known ESP32 chip")
    return AppImage(
        chip=chip_name,
        chip_id=chip_id,
        version=desc["version"] or None,
        project=desc["project"] or None,
        idf_version=desc["idf_version"] or None,
        build_date=(f"{desc['date']} {desc['time']}".strip() or None),
        secure_version=desc["secure_version"],
        entry=entry,
        segments=tuple(segments),
        image_len=end,
        file_len=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        hash_appended=hash_appended,
        min_chip_rev=min_rev,
        max_chip_rev=max_rev,
    )


def read_app_desc(data: bytes) -> dict[str, Any] | None:
    """Version/project from the start of an image without a full check (e.g. a running partition)."""
    try:
        _, segments, *_ = _walk(data)
    except ImageRejected:
        return None
    s = segments[0]
    return parse_app_desc(data[s.offset:s.offset + s.length])


# -- building images: for tests, the simulator and bench ---------------------------------------

def build_app_image(*, version: str, project: str = "siteward-node", chip: str = "esp32",
                    payload_len: int = 64 * 1024, seed: int = 1, idf_version: str = "v5.2.2",
                    hash_appended: bool = True) -> bytes:
    """A structurally complete app image (header, DROM segment with app description, IROM and
    DRAM segments, checksum, SHA-256) as ESP-IDF would lay it out; the code is filler."""
    chip_id = CHIP_NAMES[chip]
    desc = bytearray(APP_DESC_LEN)
    struct.pack_into("<II", desc, 0, APP_DESC_MAGIC, 0)
    desc[16:16 + len(version)] = version.encode()[:31]
    desc[48:48 + len(project)] = project.encode()[:31]
    desc[80:88] = b"12:00:00"
    desc[96:107] = b"Jan  1 2026"
    desc[112:112 + len(idf_version)] = idf_version.encode()[:31]
    # incompressible filler, like real machine code after zlib: flashing takes its true time
    stream = bytearray()
    block = f"{seed}:{version}:{project}".encode()
    while len(stream) < payload_len:
        block = hashlib.sha256(block).digest()
        stream += block
    body = bytes(stream[:payload_len])
    body = body[: len(body) // 4 * 4]
    half = len(body) // 2
    if chip == "esp32":
        drom, irom, dram = 0x3F400020, 0x400D0020, 0x3FFB0000
    else:
        drom, irom, dram = 0x3C000020, 0x42000020, 0x3FC88000
    segs = [(drom, bytes(desc) + body[:half]), (irom, body[half:]), (dram, b"\x00" * 256)]
    return _assemble(segs, entry=irom + 4, chip_id=chip_id, hash_appended=hash_appended)


def build_bootloader_image(chip: str = "esp32") -> bytes:
    """A second-stage bootloader lookalike: valid image, RAM-only segments, no app description."""
    segs = [(0x3FFF0030, b"\x11" * 0x400), (0x40078000, b"\x22" * 0x1000), (0x40080400, b"\x33" * 0x800)]
    return _assemble(segs, entry=0x40080400, chip_id=CHIP_NAMES[chip], hash_appended=True)


def _assemble(segs: list[tuple[int, bytes]], *, entry: int, chip_id: int, hash_appended: bool) -> bytes:
    """Header, segments (load address, data), padding, checksum and optional SHA-256, as esptool lays them out."""
    out = bytearray(struct.pack("<BBBBI", IMAGE_MAGIC, len(segs), 2, 0x20, entry))
    out += struct.pack("<BBBBHBHHIB", 0xEE, 0, 0, 0, chip_id, 0, 0, 0xFFFF, 0, 1 if hash_appended else 0)
    assert len(out) == HEADER_LEN
    checksum = CHECKSUM_SEED
    for addr, seg in segs:
        out += struct.pack("<II", addr, len(seg)) + seg
        for b in seg:
            checksum ^= b
    while len(out) % 16 != 15:
        out.append(0)
    out.append(checksum)
    if hash_appended:
        out += hashlib.sha256(out).digest()
    return bytes(out)


def build_partition_table(entries: list[tuple[str, int, int, int, int]] | None = None) -> bytes:
    """A partition table binary: (label, type, subtype, offset, size) entries + MD5 row."""
    entries = entries or [
        ("nvs", 1, 0x02, 0x9000, 0x6000),
        ("otadata", 1, 0x00, 0xF000, 0x2000),
        ("phy_init", 1, 0x01, 0x11000, 0x1000),
        ("ota_0", 0, 0x10, 0x20000, 0x180000),
        ("ota_1", 0, 0x11, 0x1A0000, 0x180000),
    ]
    out = bytearray()
    for label, ptype, sub, off, size in entries:
        out += PARTITION_MAGIC + struct.pack("<BBII", ptype, sub, off, size)
        out += label.encode().ljust(16, b"\0") + struct.pack("<I", 0)
    out += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(bytes(out)).digest()
    return bytes(out.ljust(0xC00, b"\xff"))
