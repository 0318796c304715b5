# Test shim: the ESP32 `network` module. Wi-Fi is "up" unless hw.json says otherwise
# ({"wifi": false}); the gateway is reached over loopback either way.
import json

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_GOT_IP = 1010


def _wifi_ok():
    try:
        with open("hw.json") as f:
            return json.load(f).get("wifi", True)
    except OSError:
        return True


class WLAN:
    def __init__(self, iface=STA_IF):
        self.iface = iface
        self._active = False
        self._ssid = None

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)

    def connect(self, ssid=None, key=None):
        if not self._active:
            raise OSError("Wifi Not Started")
        self._ssid = ssid

    def disconnect(self):
        self._ssid = None

    def isconnected(self):
        return self._active and self._ssid is not None and _wifi_ok()

    def status(self, param=None):
        if param == "rssi":
            return -58
        return STAT_GOT_IP if self.isconnected() else STAT_CONNECTING

    def ifconfig(self, *a):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, param=None, **kw):
        if param == "mac":
            return b"\x24\x6f\x28\xa1\xb2\xc3"
        return None
