"""Compatibility profiles: each shipped shape decodes, bad input is refused by reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.ingest.errors import Rejected
from gateway.ingest.profiles import load_profiles


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_native_telemetry_with_units_and_node_timestamp(profiles) -> None:
    p = profiles.parse("devices/n1/telemetry", b'{"temperature": 21.5, "humidity": 40, "ts": 1700000000000}')
    assert p.device == "n1" and p.kind == "telemetry"
    assert ("temperature", 21.5, "°C") in p.values and ("humidity", 40.0, "%") in p.values
    assert p.node_ts == 1700000000.0  # milliseconds understood


def test_sensordata_type_value(profiles) -> None:
    p = profiles.parse("SensorData/hall", b'{"device_id": "s-7", "type": "co2", "value": 412}')
    assert (p.device, p.profile, p.values) == ("s-7", "sensordata", [("co2", 412.0, "ppm")])


def test_blegateway_each_mac_is_its_own_device(profiles) -> None:
    a = profiles.parse("BLEGatewayData/gw1", b'{"gateway_id":"gw1","mac":"A4:C1:38:00:11:22",'
                                             b'"temperature":20.5,"humidity":55,"rssi":-70}')
    b = profiles.parse("BLEGatewayData/gw1", b'{"gateway_id":"gw1","mac":"A4:C1:38:00:11:33","temperature":19}')
    assert a.device == "ble-a4c138001122" and b.device == "ble-a4c138001133"
    assert a.via == "gw1"
    assert ("rssi", -70.0, "dBm") in a.values


def test_smartplug_fields_and_command_topic(profiles) -> None:
    p = profiles.parse("smartplug/plug-3/telemetry", b'{"voltage": 231.2, "current": 0.42, "power": 97, "x": 1}')
    assert sorted(m for m, _, _ in p.values) == ["current", "power", "voltage"]
    assert profiles.command_topic("smartplug", "plug-3") == "smartplug/plug-3/control"
    assert profiles.command_topic("native", "n1") == "devices/n1/command"


def test_health_sets_firmware_attribute(profiles) -> None:
    p = profiles.parse("devices/n1/health", b'{"heap": 123456, "uptime": 99, "fw": "1.2.0", "rssi": -61}')
    assert p.attributes == {"firmware": "1.2.0"}
    assert ("heap", 123456.0, "B") in p.values


def test_status_words_and_objects(profiles) -> None:
    assert profiles.parse("devices/n1/status", b"offline").status == "offline"
    p = profiles.parse("devices/n1/status", b'{"relay": "on", "cmd_id": "abc"}')
    assert p.values == [("relay", 1.0, "")] and p.status["cmd_id"] == "abc"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"temperature": ', "bad_json"),
        (b"\xff\xfe\x00garbage", "bad_encoding"),
        (b'{"temperature": NaN}', "not_finite"),
        (b'{"temperature": Infinity}', "not_finite"),
        (b'{"temperature": 1e999}', "not_finite"),
        (b'{"temperature": "hot"}', "non_numeric"),
        (b'{"temperature": [1, 2]}', "non_numeric"),
        (b"[" * 100_000 + b"]" * 100_000, "too_large"),
        (b"[" * 5000 + b"]" * 5000, "too_deep"),
        (b'{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}', "too_deep"),
        (b"[1, 2, 3]", "not_object"),
        (b"{}", "no_values"),
        (b'{"bad metric!": 1}', "bad_metric"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(profiles, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as exc:
        profiles.parse("devices/n1/telemetry", payload)
    assert exc.value.reason == reason


def test_unknown_topic_and_bad_device_ids(profiles) -> None:
    with pytest.raises(Rejected) as e1:
        profiles.parse("nobody/listens/here", b"{}")
    assert e1.value.reason == "unknown_topic"
    with pytest.raises(Rejected) as e2:
        profiles.parse("SensorData/x", b'{"device_id": "../../etc", "type": "t", "value": 1}')
    assert e2.value.reason == "bad_device_id"


def test_a_site_adds_a_profile_without_code(tmp_path: Path) -> None:
    (tmp_path / "tasmota.toml").write_text(
        'name = "tasmota"\nacl_publish = ["tele/{device}/#"]\n'
        '[[routes]]\ntopic = "tele/{device}/SENSOR"\nvalues = "fields"\n'
        '[routes.fields]\nTemp = { metric = "temperature", unit = "°C" }\n'
    )
    ps = load_profiles([tmp_path])
    p = ps.parse("tele/kitchen/SENSOR", b'{"Temp": 22.5, "Time": "2026-01-01"}')
    assert (p.device, p.profile, p.values) == ("kitchen", "tasmota", [("temperature", 22.5, "°C")])
    assert ps.get("tasmota").acl("kitchen") == (["tele/kitchen/#"], [])


def test_a_bad_profile_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "bad"\n[[routes]]\ntopic = "x/{dev}/y"\n')
    with pytest.raises(ValueError, match=r"routes\.0\.topic"):
        load_profiles([tmp_path])
