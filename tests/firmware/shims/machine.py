# Test shim: the ESP32 `machine` module for the MicroPython unix port.
#
# Simulates the hardware edge only: GPIO pins (state mirrored to pins.json so tests can
# see the relay), an I2C bus with an SHT3x and a BME280 that answer like the real parts
# (register maps, CRCs, compensation), the watchdog, and reset() (the process exits with
# code 77 and the test harness starts it again, as the chip would boot again).
import json
import struct
import sys

REBOOT_EXIT = 77
HW_FILE = "hw.json"
PINS_FILE = "pins.json"


def _hw():
    try:
        with open(HW_FILE) as f:
            return json.load(f)
    except OSError:
        return {}


def reset():
    print("[shim] machine.reset()")
    # a test may stage a change of the world for the next boot (the Wi-Fi going away
    # while the node restarts): hw_on_reset.json is merged into hw.json, once
    try:
        with open("hw_on_reset.json") as f:
            change = json.load(f)
        hw = _hw()
        hw.update(change)
        with open(HW_FILE, "w") as f:
            json.dump(hw, f)
        import os

        os.remove("hw_on_reset.json")
    except OSError:
        pass
    sys.exit(REBOOT_EXIT)


def soft_reset():
    reset()


def unique_id():
    return b"\x24\x6f\x28\xa1\xb2\xc3"


def freq(*a):
    return 240000000


def reset_cause():
    return 1


PWRON_RESET = 1


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    _state = {}

    def __init__(self, pin_id, mode=-1, pull=-1, value=None):
        if not isinstance(pin_id, int) or not 0 <= pin_id <= 39:
            raise ValueError("invalid pin")
        if mode == Pin.OUT and 34 <= pin_id <= 39:
            raise ValueError("pin can only be input")  # GPIO34-39 have no output driver
        self.id = pin_id
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            return Pin._state.get(self.id, 0)
        Pin._state[self.id] = 1 if v else 0
        with open(PINS_FILE, "w") as f:
            json.dump({str(k): x for k, x in Pin._state.items()}, f)
        return None

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


def _crc8(data):
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class _SHT3x:
    def __init__(self, env):
        self.env = env
        self.out = b""

    def write(self, data):
        if bytes(data) == b"\x24\x00":
            t = self.env.get("temperature", 21.5)
            h = self.env.get("humidity", 45.0)
            tr = round((t + 45) * 65535 / 175)
            hr = round(h * 65535 / 100)
            a, b = struct.pack(">H", tr), struct.pack(">H", hr)
            self.out = a + bytes([_crc8(a)]) + b + bytes([_crc8(b)])
        else:
            raise OSError(19)  # NACK: unknown command

    def read(self, n):
        out, self.out = self.out[:n], b""
        if len(out) < n:
            raise OSError(19)
        return out


# calibration words as a real part might carry them (temperature/pressure from Bosch's
# worked example, humidity typical)
_T = (27504, 26435, -1000)
_P = (36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
_H = (75, 362, 0, 313, 50, 30)


def _t_fine(adc_t):
    t1, t2, t3 = _T
    v1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    v2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    return v1 + v2


def _int_temp(adc_t):  # 0.01 degC, Bosch's integer formula
    return (_t_fine(adc_t) * 5 + 128) >> 8


def _int_press(adc_p, tf):  # Pa * 256
    p1, p2, p3, p4, p5, p6, p7, p8, p9 = _P
    v1 = tf - 128000
    v2 = v1 * v1 * p6
    v2 = v2 + ((v1 * p5) << 17)
    v2 = v2 + (p4 << 35)
    v1 = ((v1 * v1 * p3) >> 8) + ((v1 * p2) << 12)
    v1 = (((1 << 47) + v1) * p1) >> 33
    if v1 == 0:
        return 0
    p = 1048576 - adc_p
    p = (((p << 31) - v2) * 3125) // v1
    v1 = (p9 * (p >> 13) * (p >> 13)) >> 25
    v2 = (p8 * p) >> 19
    return ((p + v1 + v2) >> 8) + (p7 << 4)


def _int_hum(adc_h, tf):  # %RH * 1024
    h1, h2, h3, h4, h5, h6 = _H
    v = tf - 76800
    v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * (
        ((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    v = max(0, min(v, 419430400))
    return v >> 12


def _search(fn, target, lo, hi, increasing=True):
    while lo < hi:
        mid = (lo + hi) // 2
        val = fn(mid)
        if (val < target) == increasing:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _BME280:
    def __init__(self, env):
        self.env = env
        self.regs = bytearray(256)
        self.regs[0xD0] = 0x60
        cal = struct.pack("<Hhh", *_T) + struct.pack("<Hhhhhhhhh", *_P)
        self.regs[0x88:0x88 + len(cal)] = cal
        h1, h2, h3, h4, h5, h6 = _H
        self.regs[0xA1] = h1
        self.regs[0xE1:0xE3] = struct.pack("<h", h2)
        self.regs[0xE3] = h3
        self.regs[0xE4] = (h4 >> 4) & 0xFF
        self.regs[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        self.regs[0xE6] = (h5 >> 4) & 0xFF
        self.regs[0xE7] = h6 & 0xFF
        self.ptr = 0

    def _measure(self):
        t = self.env.get("temperature", 21.0)
        p = self.env.get("pressure", 1013.25)
        h = self.env.get("humidity", 45.0)
        adc_t = _search(_int_temp, int(t * 100), 0, (1 << 20) - 1)
        tf = _t_fine(adc_t)
        adc_p = _search(lambda a: _int_press(a, tf), int(p * 100 * 256), 0, (1 << 20) - 1, increasing=False)
        adc_h = _search(lambda a: _int_hum(a, tf), int(h * 1024), 0, 65535)
        d = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
                   adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4, adc_h >> 8, adc_h & 0xFF])
        self.regs[0xF7:0xFF] = d

    def write(self, data):
        data = bytes(data)
        self.ptr = data[0]
        for i, b in enumerate(data[1:]):
            self.regs[self.ptr + i] = b
            if self.ptr + i == 0xF4 and b & 0x03:
                self._measure()  # forced or normal mode: a conversion completes at once

    def read(self, n):
        out = bytes(self.regs[self.ptr:self.ptr + n])
        self.ptr += n
        return out


class I2C:
    def __init__(self, bus_id=0, scl=None, sda=None, freq=400000, timeout=50000):
        hw = _hw()
        self.devices = {}
        if hw.get("sht3x", {}) is not None:
            self.devices[0x44] = _SHT3x(hw.get("sht3x", {}))
        if hw.get("bme280", {}) is not None:
            self.devices[0x76] = _BME280(hw.get("bme280", {}))

    def _dev(self, addr):
        d = self.devices.get(addr)
        if d is None:
            raise OSError(19)  # ENODEV: no ACK on the bus, as the ESP32 driver reports it
        return d

    def scan(self):
        return sorted(self.devices)

    def writeto(self, addr, buf, stop=True):
        self._dev(addr).write(buf)
        return len(buf)

    def readfrom(self, addr, nbytes, stop=True):
        return self._dev(addr).read(nbytes)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        d = self._dev(addr)
        d.write(bytes([memaddr]))
        return d.read(nbytes)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self._dev(addr).write(bytes([memaddr]) + bytes(buf))


class WDT:
    # The watchdog cannot preempt a single-threaded unix process; the shim checks its
    # arguments and counts feeds (tests read wdt.json) so a loop that stops feeding shows.
    feeds = 0

    def __init__(self, id=0, timeout=5000):
        if timeout < 1:
            raise ValueError("timeout must be >= 1 ms")
        self.timeout = timeout

    def feed(self):
        WDT.feeds += 1
