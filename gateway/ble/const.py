"""Every BLE timing, limit and assigned number in one place.

Named here rather than inline so that the watchdog's escalation, the memory bounds and
the router's tables can be read (and tuned) side by side, as habluetooth does.
"""

from __future__ import annotations

# -- advertisement data types and assigned numbers (Bluetooth SIG) ---------------------------
# AD type "Flags"; every connectable or general-discoverable advertiser sends it, which is
# why the passive-scan monitor matches on it: BlueZ requires at least one or-pattern and we
# want every advertisement, the router does the sorting.
AD_TYPE_FLAGS = 0x01
PASSIVE_FLAG_PATTERNS = (b"\x02", b"\x06", b"\x1a", b"\x05", b"\x04", b"\x00")


def uuid16(short: int) -> str:
    """The 128-bit string form bleak and BlueZ use for a 16-bit SIG UUID."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


UUID_BTHOME_V2 = uuid16(0xFCD2)
UUID_BTHOME_V1 = uuid16(0x181C)
UUID_BTHOME_V1_ENCRYPTED = uuid16(0x181E)
UUID_XIAOMI_MIBEACON = uuid16(0xFE95)
UUID_ENVIRONMENTAL_SENSING = uuid16(0x181A)  # ATC1441 / pvvx custom firmware formats
UUID_QINGPING = uuid16(0xFDCD)
UUID_EDDYSTONE = uuid16(0xFEAA)
UUID_GOVEE = uuid16(0xEC88)
UUID_SENSORPUSH_V2 = "ef090000-11d6-42ba-93b8-9dd7ec090ab0"
UUID_SENSORPUSH_HT1 = "ef090080-11d6-42ba-93b8-9dd7ec090aa9"

COMPANY_APPLE = 0x004C  # iBeacon lives here, next to every iPhone's "nearby" chatter
COMPANY_RUUVI = 0x0499
COMPANY_GOVEE = 0xEC88  # H5072/H5075/H5101... family
IBEACON_PREFIX = b"\x02\x15"

# -- bounds (memory must stay flat under a flood of random addresses) ------------------------
MAX_ADVERT_BYTES = 254  # one AD structure's payload at most; anything larger is refused
MAX_AD_KEYS = 1024  # keys BlueZ may have merged for one device
MAX_NAME_CHARS = 64
MAX_METRICS_PER_SENSOR = 32
MAX_PENDING_WRITES = 5000  # readings waiting for the store; beyond it the oldest are dropped and counted
ENCRYPTED_BINDKEY_BYTES = (16, 12)  # AES-128 keys; 12 bytes for legacy MiBeacon v2/v3

# -- watchdog escalation -------------------------------------------------------------------------
WATCHDOG_CHECK_INTERVAL_S = 5.0
ADAPTER_POLL_INTERVAL_S = 5.0
POWER_CYCLE_OFF_S = 1.0  # BlueZ needs a moment between Powered=false and Powered=true
SCAN_STOP_TIMEOUT_S = 5.0
SCAN_START_TIMEOUT_S = 10.0

# -- persistence --------------------------------------------------------------------------------
REPLAY_FLUSH_INTERVAL_S = 30.0  # counters are written in batches: one row per advert would wear the card
BINDKEY_FILE = "ble-bindkeys.key"  # 0600 key that seals bindkeys in SQLite

# libraries that log per advertisement (decryption failures, unknown objects); their news
# reaches the technician on the sensor itself, so their loggers are quietened.
NOISY_LIBRARY_LOGGERS = (
    "bthome_ble",
    "xiaomi_ble",
    "govee_ble",
    "inkbird_ble",
    "thermopro_ble",
    "qingping_ble",
    "sensorpush_ble",
    "ruuvitag_ble",
    "ibeacon_ble",
    "bluetooth_sensor_state_data",
)
