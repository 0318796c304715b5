# Node configuration, written at provisioning: config.json on the filesystem (raw-REPL
# provisioning) or one JSON blob under NVS namespace "siteward", key "config" (an NVS
# partition made by the gateway and written with esptool). The file wins when both exist.
import json

CONFIG_FILE = "config.json"
NVS_NAMESPACE = "siteward"
NVS_KEY = "config"
MAX_BLOB = 4000

DEFAULTS = {
    "interval_s": 30,
    "heartbeat_s": 60,
    "http_port": 8080,
    "wdt_ms": 60000,
    "confirm_s": 120,
    "i2c": {"scl": 22, "sda": 21, "freq": 100000},
    "relay_pin": 26,
    "led_pin": 2,
    "ota_keys": [],
}


class ConfigError(Exception):
    pass


def _from_nvs():
    try:
        import esp32
    except ImportError:
        return None
    try:
        nvs = esp32.NVS(NVS_NAMESPACE)
        buf = bytearray(MAX_BLOB)
        n = nvs.get_blob(NVS_KEY, buf)
    except OSError:
        return None
    return json.loads(bytes(buf[:n]))


def _from_file():
    try:
        with open(CONFIG_FILE) as f:
            return json.load(f)
    except OSError:
        return None


def load():
    raw = _from_file()
    source = "file"
    if raw is None:
        raw = _from_nvs()
        source = "nvs"
    if raw is None:
        raise ConfigError("no configuration: provision this node (siteward node provision)")
    if not isinstance(raw, dict):
        raise ConfigError("configuration is not a JSON object")
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    for key in ("id", "mqtt"):
        if key not in cfg:
            raise ConfigError("configuration lacks '%s'" % key)
    m = cfg["mqtt"]
    for key in ("host", "user", "password"):
        if key not in m:
            raise ConfigError("configuration lacks 'mqtt.%s'" % key)
    m.setdefault("port", 1883)
    m.setdefault("keepalive", 60)
    cfg["source"] = source
    return cfg
