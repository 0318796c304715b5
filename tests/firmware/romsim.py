"""A simulated ESP32 serial ROM loader (and flasher stub), for the real esptool to talk to.

The hardware edge of USB flashing is the chip's download mode: a SLIP-framed
request/response protocol. This fixture speaks it on a pty (``/dev/pts/N``, what an
installer's USB-serial adapter looks like) or a TCP port (pyserial's ``socket://``),
keeps a 4 MiB flash image in memory (optionally mirrored to a file), and answers what
esptool sends:

    SYNC, READ_REG, WRITE_REG, MEM_BEGIN/DATA/END (stub upload, then "OHAI"),
    SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE, FLASH_BEGIN/DATA/END,
    FLASH_DEFL_BEGIN/DATA/END (zlib-compressed writes), SPI_FLASH_MD5, ERASE_FLASH/REGION,
    GET_SECURITY_INFO (refused, as the ESP32 ROM does)

Failure modes, for the paths installers hit: ``no_sync`` (board not in download mode),
``bad_md5`` (flash verify fails), ``silent_after=N`` (chip stops answering after N data
blocks), ``vanish_after=N`` (USB cable pulled: the pty closes), and ``chip`` (another chip
model answers).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import tty
import zlib
from pathlib import Path

SLIP_END, SLIP_ESC, SLIP_ESC_END, SLIP_ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD

CMD = {
    "FLASH_BEGIN": 0x02, "FLASH_DATA": 0x03, "FLASH_END": 0x04, "MEM_BEGIN": 0x05, "MEM_END": 0x06,
    "MEM_DATA": 0x07, "SYNC": 0x08, "WRITE_REG": 0x09, "READ_REG": 0x0A, "SPI_SET_PARAMS": 0x0B,
    "SPI_ATTACH": 0x0D, "CHANGE_BAUDRATE": 0x0F, "FLASH_DEFL_BEGIN": 0x10, "FLASH_DEFL_DATA": 0x11,
    "FLASH_DEFL_END": 0x12, "SPI_FLASH_MD5": 0x13, "GET_SECURITY_INFO": 0x14, "ERASE_FLASH": 0xD0,
    "ERASE_REGION": 0xD1,
}
NAMES = {v: k for k, v in CMD.items()}

# per chip: detect magic at 0x40001000, SPI peripheral base + W0 offset, UART clock divider register
CHIPS = {
    "esp32": {"magic": 0x00F01D83, "spi": 0x3FF42000, "w0": 0x80, "uart_clkdiv": 0x3FF40014,
              "efuse": 0x3FF5A000},
    "esp32s3": {"chip_id": 9, "magic": 0x00000009, "spi": 0x60002000, "w0": 0x58, "uart_clkdiv": 0x60000014,
                "efuse": 0x60007000},
}
FLASH_JEDEC_ID = 0x1640EF  # Winbond W25Q32: 4 MiB
ERR_INVALID_CMD = 0x05
ERR_BAD_CHECKSUM = 0x07


def slip_encode(data: bytes) -> bytes:
    out = bytearray([SLIP_END])
    for b in data:
        if b == SLIP_END:
            out += bytes([SLIP_ESC, SLIP_ESC_END])
        elif b == SLIP_ESC:
            out += bytes([SLIP_ESC, SLIP_ESC_ESC])
        else:
            out.append(b)
    out.append(SLIP_END)
    return bytes(out)


class RomLoader:
    def __init__(self, *, chip: str = "esp32", flash_size: int = 4 * 1024 * 1024, transport: str = "pty",
                 no_sync: bool = False, bad_md5: bool = False, silent_after: int | None = None,
                 vanish_after: int | None = None, flash_file: Path | None = None) -> None:
        self.chip = chip
        self.regs = CHIPS[chip]
        self.flash = bytearray(b"\xff" * flash_size)
        self.flash_file = flash_file
        if flash_file is not None and flash_file.exists():
            self.flash[:] = flash_file.read_bytes().ljust(flash_size, b"\xff")[:flash_size]
        self.transport = transport
        self.no_sync = no_sync
        self.bad_md5 = bad_md5
        self.silent_after = silent_after
        self.vanish_after = vanish_after
        self.stub = False
        self.synced = False
        self.data_blocks = 0
        self.commands: list[str] = []
        self.baud_changes: list[int] = []
        self._write_off = 0
        self._write_size = 0
        self._inflate: zlib._Decompress | None = None  # type: ignore[name-defined]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._slave_fd: int | None = None
        self._listen: socket.socket | None = None
        self._conn: socket.socket | None = None
        self.port = ""

    # -- transport -------------------------------------------------------------------------------
    def start(self) -> str:
        if self.transport == "pty":
            master, slave = os.openpty()
            tty.setraw(slave)
            self._fd, self._slave_fd = master, slave
            self.port = os.ttyname(slave)
        else:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            s.settimeout(0.2)
            self._listen = s
            self.port = f"socket://127.0.0.1:{s.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="romsim", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._fd, self._slave_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._slave_fd = None
        for s in (self._conn, self._listen):
            if s is not None:
                s.close()
        self.save()

    def save(self) -> None:
        if self.flash_file is not None:
            self.flash_file.write_bytes(bytes(self.flash))

    def _read(self) -> bytes:
        if self.transport == "pty":
            import select

            assert self._fd is not None
            r, _, _ = select.select([self._fd], [], [], 0.1)
            if not r:
                return b""
            try:
                return os.read(self._fd, 4096)
            except OSError:
                return b""
        if self._conn is None:
            assert self._listen is not None
            try:
                self._conn, _ = self._listen.accept()
                self._conn.settimeout(0.1)
                self.stub = self.synced = False  # a new connection is a fresh reset into the ROM
            except TimeoutError:
                return b""
        try:
            data = self._conn.recv(4096)
        except TimeoutError:
            return b""
        if not data:
            self._conn.close()
            self._conn = None
        return data

    def _send(self, frame: bytes) -> None:
        data = slip_encode(frame)
        if self.transport == "pty":
            assert self._fd is not None
            os.write(self._fd, data)
        elif self._conn is not None:
            self._conn.sendall(data)

    def _vanish(self) -> None:
        # the adapter disappears: both ends of the pty close, the reader gets EIO / EOF
        for fd in (self._slave_fd, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._slave_fd = None
        self._stop.set()

    # -- protocol --------------------------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray()
        in_frame = False
        esc = False
        while not self._stop.is_set():
            chunk = self._read()
            for b in chunk:
                if not in_frame:
                    if b == SLIP_END:
                        in_frame, buf = True, bytearray()
                    continue
                if esc:
                    buf.append(SLIP_END if b == SLIP_ESC_END else SLIP_ESC if b == SLIP_ESC_ESC else b)
                    esc = False
                elif b == SLIP_ESC:
                    esc = True
                elif b == SLIP_END:
                    if buf:
                        self._request(bytes(buf))
                        if self._stop.is_set():
                            return
                        in_frame = False
                    # an empty frame (END END) resynchronises: stay in frame
                else:
                    buf.append(b)

    def _reply(self, op: int, value: int = 0, data: bytes = b"", status: int = 0, error: int = 0) -> None:
        # the ROM appends 4 status bytes, the stub 2
        tail = bytes([status, error]) + (b"" if self.stub else b"\0\0")
        body = data + tail
        self._send(struct.pack("<BBHI", 1, op, len(body), value) + body)

    def _request(self, pkt: bytes) -> None:
        if len(pkt) < 8 or pkt[0] != 0:
            return
        _, op, size, chk = struct.unpack_from("<BBHI", pkt)
        data = pkt[8:8 + size]
        name = NAMES.get(op, f"0x{op:02x}")
        self.commands.append(name)
        if self.no_sync:
            return
        if op == CMD["SYNC"]:
            self.synced = True
            # the ROM answers a SYNC eight times; the stub answers with value 0
            for _ in range(8):
                self._reply(op, 0 if self.stub else 0x20120707)
            return
        if not self.synced:
            return
        handler = getattr(self, f"_op_{name.lower()}", None)
        if handler is None:
            self._reply(op, status=1, error=ERR_INVALID_CMD)
            return
        handler(op, data, chk)

    def _op_read_reg(self, op: int, data: bytes, chk: int) -> None:
        (addr,) = struct.unpack_from("<I", data)
        r = self.regs
        value = 0
        if addr == 0x40001000:
            value = r["magic"]
        elif addr == r["spi"] + r["w0"]:
            value = FLASH_JEDEC_ID
        elif addr == r["uart_clkdiv"]:
            value = 347  # 40 MHz crystal at 115200 baud
        elif addr in (r["efuse"] + 4, r["efuse"] + 8):
            value = 0x00A1B2C3 if addr == r["efuse"] + 4 else 0x0000D4E5  # MAC words
        self._reply(op, value)

    def _op_write_reg(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_get_security_info(self, op: int, data: bytes, chk: int) -> None:
        if self.chip == "esp32":
            self._reply(op, status=1, error=ERR_INVALID_CMD)  # the ESP32 ROM predates this command
            return
        # flags, key count, 7 key purposes, chip id, ECO version
        self._reply(op, data=struct.pack("<IB7BII", 0, 0, *([0] * 7), CHIPS[self.chip]["chip_id"], 0))

    def _op_mem_begin(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_mem_data(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_mem_end(self, op: int, data: bytes, chk: int) -> None:
        _flag, entry = struct.unpack_from("<II", data)
        self._reply(op)
        if entry:
            # the uploaded flasher stub starts and greets the host
            self.stub = True
            self._send(b"OHAI")

    def _op_spi_attach(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_spi_set_params(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _op_change_baudrate(self, op: int, data: bytes, chk: int) -> None:
        baud, _old = struct.unpack_from("<II", data)
        self.baud_changes.append(baud)
        self._reply(op)

    def _begin(self, op: int, data: bytes, compressed: bool) -> None:
        size, _blocks, _blocksize, offset = struct.unpack_from("<IIII", data)
        if offset + size > len(self.flash):
            self._reply(op, status=1, error=0x08)
            return
        self._write_off = offset
        self._write_size = size
        self._inflate = zlib.decompressobj() if compressed else None
        # the ROM erases up front; the stub erases as it goes: the result is the same
        if not compressed or not self.stub:
            self.flash[offset:offset + size] = b"\xff" * size
        self._reply(op)

    def _block(self, op: int, data: bytes, chk: int) -> None:
        length, _seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:16 + length]
        self.data_blocks += 1
        if self.vanish_after is not None and self.data_blocks > self.vanish_after:
            self._vanish()
            return
        if self.silent_after is not None and self.data_blocks > self.silent_after:
            return  # the chip hangs: no answer ever comes
        x = 0xEF
        for b in payload:
            x ^= b
        if x != chk:
            self._reply(op, status=1, error=ERR_BAD_CHECKSUM)
            return
        out = self._inflate.decompress(payload) if self._inflate is not None else payload
        self.flash[self._write_off:self._write_off + len(out)] = out
        self._write_off += len(out)
        self._reply(op)

    def _op_flash_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, compressed=False)

    def _op_flash_defl_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, compressed=True)

    def _op_flash_data(self, op: int, data: bytes, chk: int) -> None:
        self._block(op, data, chk)

    def _op_flash_defl_data(self, op: int, data: bytes, chk: int) -> None:
        self._block(op, data, chk)

    def _op_flash_end(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)
        self.save()

    def _op_flash_defl_end(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)
        self.save()

    def _op_spi_flash_md5(self, op: int, data: bytes, chk: int) -> None:
        addr, size, _, _ = struct.unpack_from("<IIII", data)
        digest = hashlib.md5(self.flash[addr:addr + size]).digest()
        if self.bad_md5:
            digest = bytes(b ^ 0xFF for b in digest)
        self._reply(op, data=digest if self.stub else digest.hex().encode())

    def _op_erase_flash(self, op: int, data: bytes, chk: int) -> None:
        self.flash[:] = b"\xff" * len(self.flash)
        self._reply(op)

    def _op_erase_region(self, op: int, data: bytes, chk: int) -> None:
        offset, size = struct.unpack_from("<II", data)
        self.flash[offset:offset + size] = b"\xff" * size
        self._reply(op)
