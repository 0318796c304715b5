# Sensors and actuators on the node: SHT3x and BME280 over I2C, a relay on a GPIO.
#
# Each sensor is optional: probed at start, skipped when absent, and a read error
# costs that reading only (a loose wire must not stop telemetry from the others).
import struct
import time

SHT3X_ADDRS = (0x44, 0x45)
BME280_ADDRS = (0x76, 0x77)
BME280_CHIP_ID = 0x60


def crc8(data):
    # Sensirion CRC-8: polynomial 0x31, init 0xFF
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SensorError(OSError):
    pass


class SHT3x:
    def __init__(self, i2c, addr):
        self.i2c = i2c
        self.addr = addr

    def read(self):
        # single shot, high repeatability, no clock stretching; 15 ms conversion
        self.i2c.writeto(self.addr, b"\x24\x00")
        time.sleep_ms(16)
        d = self.i2c.readfrom(self.addr, 6)
        if crc8(d[0:2]) != d[2] or crc8(d[3:5]) != d[5]:
            raise SensorError("SHT3x CRC mismatch")
        t_raw = (d[0] << 8) | d[1]
        h_raw = (d[3] << 8) | d[4]
        return {"temperature": round(-45 + 175 * t_raw / 65535, 2), "humidity": round(100 * h_raw / 65535, 2)}


class BME280:
    def __init__(self, i2c, addr):
        self.i2c = i2c
        self.addr = addr
        c = i2c.readfrom_mem(addr, 0x88, 26)
        self.t = struct.unpack("<Hhh", c[0:6])
        self.p = struct.unpack("<Hhhhhhhhh", c[6:24])
        h = i2c.readfrom_mem(addr, 0xE1, 7)
        e4, e5, e6 = h[3], h[4], h[5]
        h4 = (e4 << 4) | (e5 & 0x0F)
        h5 = (e6 << 4) | (e5 >> 4)
        if h4 & 0x800:
            h4 -= 0x1000
        if h5 & 0x800:
            h5 -= 0x1000
        h6 = h[6] - 256 if h[6] & 0x80 else h[6]
        self.h = (c[25], struct.unpack("<h", h[0:2])[0], h[2], h4, h5, h6)

    def read(self):
        i2c, a = self.i2c, self.addr
        i2c.writeto_mem(a, 0xF2, b"\x01")  # humidity x1 (applies at the next ctrl_meas write)
        i2c.writeto_mem(a, 0xF4, b"\x25")  # temperature x1, pressure x1, forced mode
        for _ in range(20):
            time.sleep_ms(5)
            if not i2c.readfrom_mem(a, 0xF3, 1)[0] & 0x08:
                break
        d = i2c.readfrom_mem(a, 0xF7, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        t1, t2, t3 = self.t
        # Bosch's floating-point compensation (BME280 datasheet, section 8.1)
        v1 = (adc_t / 16384.0 - t1 / 1024.0) * t2
        v2 = (adc_t / 131072.0 - t1 / 8192.0) ** 2 * t3
        t_fine = v1 + v2
        temp = t_fine / 5120.0
        p1, p2, p3, p4, p5, p6, p7, p8, p9 = self.p
        v1 = t_fine / 2.0 - 64000.0
        v2 = v1 * v1 * p6 / 32768.0
        v2 = v2 + v1 * p5 * 2.0
        v2 = v2 / 4.0 + p4 * 65536.0
        v1 = (p3 * v1 * v1 / 524288.0 + p2 * v1) / 524288.0
        v1 = (1.0 + v1 / 32768.0) * p1
        pres = None
        if v1:
            pr = 1048576.0 - adc_p
            pr = (pr - v2 / 4096.0) * 6250.0 / v1
            v1 = p9 * pr * pr / 2147483648.0
            v2 = pr * p8 / 32768.0
            pres = (pr + (v1 + v2 + p7) / 16.0) / 100.0
        h1, h2, h3, h4, h5, h6 = self.h
        vh = t_fine - 76800.0
        vh = (adc_h - (h4 * 64.0 + h5 / 16384.0 * vh)) * (
            h2 / 65536.0 * (1.0 + h6 / 67108864.0 * vh * (1.0 + h3 / 67108864.0 * vh)))
        vh = vh * (1.0 - h1 * vh / 524288.0)
        vh = min(100.0, max(0.0, vh))
        out = {"bme_temperature": round(temp, 2), "bme_humidity": round(vh, 2)}
        if pres is not None:
            out["pressure"] = round(pres, 2)
        return out


def probe(i2c):
    """The sensors that answer on this bus."""
    found = []
    try:
        present = set(i2c.scan())
    except OSError:
        return found
    for a in SHT3X_ADDRS:
        if a in present:
            found.append(SHT3x(i2c, a))
            break
    for a in BME280_ADDRS:
        if a in present:
            try:
                if i2c.readfrom_mem(a, 0xD0, 1)[0] == BME280_CHIP_ID:
                    found.append(BME280(i2c, a))
                    break
            except OSError:
                pass
    return found


class Relay:
    def __init__(self, pin_no):
        import machine

        self.pin = machine.Pin(pin_no, machine.Pin.OUT, value=0)
        self.on = False

    def set(self, on):
        self.on = bool(on)
        self.pin.value(1 if self.on else 0)

    @property
    def word(self):
        return "on" if self.on else "off"
