"""Our own decoders, for the formats no maintained, permissively licensed library covers.

Written from the published format descriptions, not from anyone's code:

* Eddystone (Google, https://github.com/google/eddystone/blob/master/protocol-specification.md):
  service data on UUID 0xFEAA, frame types UID 0x00, URL 0x10, TLM 0x20 (plain, version 0)
  and EID 0x30. Integers are big-endian; TLM temperature is signed 8.8 fixed point, 0x8000
  meaning "not supported"; the uptime counter has 0.1 s resolution.
* LYWSD03MMC custom firmware on service data 0x181A: the ATC1441 format (13 bytes, MAC and
  integers big-endian, temperature in 0.1 °C) and the pvvx format (15 bytes, MAC and
  integers little-endian, temperature and humidity in 0.01 units), as documented in the
  atc1441/ATC_MiThermometer and pvvx/ATC_MiThermometer READMEs.
"""

from __future__ import annotations

from gateway.ble.const import UUID_EDDYSTONE, UUID_ENVIRONMENTAL_SENSING
from gateway.ble.decoders.base import Advert, Decoded, KeyStatus

_URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
_URL_EXPANSIONS = (".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
                   ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov")
_TLM_NO_TEMPERATURE = 0x8000


def _mac_bytes(address: str) -> bytes | None:
    try:
        raw = bytes.fromhex(address.replace(":", ""))
    except ValueError:
        return None
    return raw if len(raw) == 6 else None


class EddystoneDecoder:
    family = "eddystone"

    def set_bindkey(self, key: bytes | None) -> None:  # Eddystone has no bindkey
        return None

    def update(self, adv: Advert) -> Decoded | None:
        data = adv.service_data.get(UUID_EDDYSTONE)
        if not data:
            return None
        frame = data[0]
        if frame == 0x00 and len(data) >= 18:
            return Decoded(self.family, "Eddystone UID", presence={
                "namespace": data[2:12].hex(), "instance": data[12:18].hex(),
                "tx_power_0m": int.from_bytes(data[1:2], "big", signed=True)})
        if frame == 0x10 and 3 <= len(data) <= 20 and data[2] < len(_URL_SCHEMES):
            url = _URL_SCHEMES[data[2]]
            for b in data[3:]:
                if b < len(_URL_EXPANSIONS):
                    url += _URL_EXPANSIONS[b]
                elif 0x20 < b < 0x7F:
                    url += chr(b)
                else:  # not a URL byte: this is not an Eddystone-URL frame after all
                    return None
            return Decoded(self.family, "Eddystone URL", presence={"url": url})
        if frame == 0x20 and len(data) >= 2:
            if data[1] != 0x00:  # encrypted TLM (version 1): only its presence is ours to know
                return Decoded(self.family, "Eddystone eTLM", presence={"tlm": "encrypted"})
            if len(data) < 14:
                return None
            values: list[tuple[str, float, str]] = []
            mv = int.from_bytes(data[2:4], "big")
            if mv:  # 0 means "not supported" by this beacon
                values.append(("voltage", mv / 1000.0, "V"))
            raw_t = int.from_bytes(data[4:6], "big")
            if raw_t != _TLM_NO_TEMPERATURE:
                values.append(("temperature", round(int.from_bytes(data[4:6], "big", signed=True) / 256.0, 2),
                               "°C"))
            values.append(("advertisement_count", float(int.from_bytes(data[6:10], "big")), ""))
            values.append(("uptime", int.from_bytes(data[10:14], "big") / 10.0, "s"))
            return Decoded(self.family, "Eddystone TLM", values=values)
        if frame == 0x30 and len(data) >= 10:
            return Decoded(self.family, "Eddystone EID", presence={"eid": data[2:10].hex()})
        return None


class CustomThermometerDecoder:
    """ATC1441 and pvvx custom firmware (LYWSD03MMC, MHO-C401, CGG1 ...) on 0x181A."""

    family = "atc"

    def __init__(self) -> None:
        self.last_counter: int | None = None

    def set_bindkey(self, key: bytes | None) -> None:
        # the custom firmwares' own encrypted formats are not decoded; a sensor that needs
        # encryption should be switched to BTHome (encrypted), which is.
        return None

    def update(self, adv: Advert) -> Decoded | None:
        data = adv.service_data.get(UUID_ENVIRONMENTAL_SENSING)
        if data is None:
            return None
        mac = _mac_bytes(adv.address)
        if len(data) == 13:
            # the embedded MAC must be the sender's: 0x181A is a generic SIG UUID others use too
            if mac is not None and data[0:6] != mac:
                return None
            temp = int.from_bytes(data[6:8], "big", signed=True) / 10.0
            hum, batt = data[8], data[9]
            mv = int.from_bytes(data[10:12], "big")
            if hum > 100 or batt > 100:
                return None
            self.last_counter = data[12]
            return Decoded(self.family, "ATC1441 custom firmware", key_status=KeyStatus.PLAIN, values=[
                ("temperature", temp, "°C"), ("humidity", float(hum), "%"), ("battery", float(batt), "%"),
                ("voltage", mv / 1000.0, "V")])
        if len(data) == 15:
            if mac is not None and data[0:6] != mac[::-1]:
                return None
            temp = int.from_bytes(data[6:8], "little", signed=True) / 100.0
            hum = int.from_bytes(data[8:10], "little") / 100.0
            mv = int.from_bytes(data[10:12], "little")
            batt = data[12]
            if hum > 100.0 or batt > 100:
                return None
            self.last_counter = data[13]
            return Decoded(self.family, "pvvx custom firmware", key_status=KeyStatus.PLAIN, values=[
                ("temperature", temp, "°C"), ("humidity", hum, "%"), ("battery", float(batt), "%"),
                ("voltage", mv / 1000.0, "V")])
        return None
