"""A fake bluetoothd for the BLE tests: a python-dbusmock template.

Run as ``python -m dbusmock --system --template tests/ble/fake_bluez.py`` on a private
system bus, it offers what bleak and Siteward use of BlueZ 5, with BlueZ's D-Bus types
(the stock template's AddDevice gives ManufacturerData and ServiceData the wrong ones):

* ``/`` ObjectManager; ``/org/bluez`` AgentManager1;
* ``/org/bluez/hciN``: Adapter1 (Powered, Discovering, Roles, ...; StartDiscovery,
  StopDiscovery, SetDiscoveryFilter, RemoveDevice) and, unless left out,
  AdvertisementMonitorManager1 (RegisterMonitor, UnregisterMonitor, SupportedMonitorTypes);
* ``/org/bluez/hciN/dev_XX_..``: Device1 with ``ManufacturerData`` ``a{qv}`` and
  ``ServiceData`` ``a{sv}`` whose variants hold ``ay``, merged per device across
  advertisements the way bluetoothd merges them (a key, once heard, stays).

Adverts are only heard while the adapter is powered and scanning (a discovery session
or a registered monitor), and not while it is "wedged": the silent failure the watchdog
exists for. A wedge of kind "scan" is cleared by a new discovery session, one of kind
"power" only by switching Powered off and on over D-Bus.

Test control goes through ``org.bluez.Mock`` on ``/``.
"""

from __future__ import annotations

import json
from typing import Any

import dbus
import dbus.service
from dbusmock import mockobject

BUS_NAME = "org.bluez"
MAIN_OBJ = "/"
SYSTEM_BUS = True
IS_OBJECT_MANAGER = True

MOCK_IFACE = "org.bluez.Mock"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
MONITOR_MANAGER_IFACE = "org.bluez.AdvertisementMonitorManager1"
PROPS_IFACE = "org.freedesktop.DBus.Properties"

# per adapter path: discovery session, monitors, wedge, power cycles, calls seen
_state: dict[str, dict[str, Any]] = {}


def _error(name: str, text: str) -> dbus.exceptions.DBusException:
    return dbus.exceptions.DBusException(text, name=f"org.bluez.Error.{name}")


def _set_adapter_prop(adapter: Any, name: str, value: Any) -> None:
    adapter.props[ADAPTER_IFACE][name] = value
    adapter.EmitSignal(PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                       [ADAPTER_IFACE, dbus.Dictionary({name: value}, signature="sv"), dbus.Array([], signature="s")])


def _update_discovering(adapter: Any) -> None:
    st = _state[adapter.path]
    on = bool(st["discovery"]) and bool(adapter.props[ADAPTER_IFACE]["Powered"])
    if bool(adapter.props[ADAPTER_IFACE]["Discovering"]) != on:
        _set_adapter_prop(adapter, "Discovering", dbus.Boolean(on))


def _added(manager: Any, path: str) -> None:
    obj = mockobject.objects[path]
    ifaces = {name: dbus.Dictionary(props, signature="sv") for name, props in obj.props.items() if props}
    manager.EmitSignal("org.freedesktop.DBus.ObjectManager", "InterfacesAdded", "oa{sa{sv}}",
                       [dbus.ObjectPath(path), dbus.Dictionary(ifaces, signature="sa{sv}")])


def _remove(manager: Any, path: str) -> None:
    obj = mockobject.objects[path]
    ifaces = [name for name, props in obj.props.items() if props]
    manager.RemoveObject(path)
    manager.EmitSignal("org.freedesktop.DBus.ObjectManager", "InterfacesRemoved", "oas",
                       [dbus.ObjectPath(path), dbus.Array(ifaces, signature="s")])


def _root() -> Any:
    return mockobject.objects["/"]


# -- Adapter1 -----------------------------------------------------------------------------------
def StartDiscovery(self: Any) -> None:
    st = _state[self.path]
    st["calls"].append("StartDiscovery")
    if not self.props[ADAPTER_IFACE]["Powered"]:
        raise _error("NotReady", "Resource Not Ready")
    if st["discovery"]:
        raise _error("InProgress", "Operation already in progress")
    st["discovery"] = True
    if st["wedge"] == "scan":  # a fresh discovery session is what cures this kind
        st["wedge"] = None
    _update_discovering(self)


def StopDiscovery(self: Any) -> None:
    st = _state[self.path]
    st["calls"].append("StopDiscovery")
    if not self.props[ADAPTER_IFACE]["Powered"]:
        raise _error("NotReady", "Resource Not Ready")
    if not st["discovery"]:
        raise _error("Failed", "No discovery started")
    st["discovery"] = False
    _update_discovering(self)


def SetDiscoveryFilter(self: Any, filters: Any) -> None:
    _state[self.path]["calls"].append("SetDiscoveryFilter")
    _state[self.path]["filter"] = {str(k): str(v) for k, v in filters.items()}


def RemoveDevice(self: Any, path: str) -> None:
    if str(path) not in mockobject.objects:
        raise _error("DoesNotExist", "Does Not Exist")
    _remove(_root(), str(path))


# -- AdvertisementMonitorManager1 ----------------------------------------------------------------
def RegisterMonitor(self: Any, path: str) -> None:
    st = _state[self.path]
    st["calls"].append("RegisterMonitor")
    if str(path) in st["monitors"]:
        raise _error("AlreadyExists", "Already Exists")
    st["monitors"].add(str(path))
    if st["wedge"] == "scan":
        st["wedge"] = None


def UnregisterMonitor(self: Any, path: str) -> None:
    st = _state[self.path]
    st["calls"].append("UnregisterMonitor")
    if str(path) not in st["monitors"]:
        raise _error("DoesNotExist", "Does Not Exist")
    st["monitors"].discard(str(path))


class _Adapter(mockobject.DBusMockObject):
    """The adapter's object, so that ``Powered`` written over D-Bus acts like bluetoothd."""

    @dbus.service.method(PROPS_IFACE, in_signature="ssv", out_signature="")
    def Set(self, interface_name: str, property_name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        was = bool(self.props.get(ADAPTER_IFACE, {}).get("Powered", False))
        mockobject.DBusMockObject.Set(self, interface_name, property_name, value)
        if interface_name != ADAPTER_IFACE or property_name != "Powered":
            return
        st = _state[self.path]
        now = bool(value)
        if was and not now:
            st["power_offs"] += 1
            st["discovery"] = False  # powering off ends every discovery session
            _update_discovering(self)
        elif now and not was:
            st["power_ons"] += 1
            if st["wedge"] in ("power", "scan"):
                st["wedge"] = None


# -- test control (org.bluez.Mock on /) -----------------------------------------------------------
@dbus.service.method(MOCK_IFACE, in_signature="ssb", out_signature="s")
def AddAdapter(self: Any, name: str, alias: str, monitor: bool) -> str:
    path = f"/org/bluez/{name}"
    n = int(name[3:]) if name[3:].isdigit() else 0
    props = {
        "Address": dbus.String(f"00:1A:7D:DA:71:{n:02X}"),
        "AddressType": dbus.String("public"),
        "Name": dbus.String(alias),
        "Alias": dbus.String(alias),
        "Class": dbus.UInt32(0x6C010C),
        "Powered": dbus.Boolean(True),
        "Discoverable": dbus.Boolean(False),
        "Pairable": dbus.Boolean(True),
        "DiscoverableTimeout": dbus.UInt32(180),
        "PairableTimeout": dbus.UInt32(0),
        "Discovering": dbus.Boolean(False),
        "UUIDs": dbus.Array(["00001800-0000-1000-8000-00805f9b34fb", "00001801-0000-1000-8000-00805f9b34fb"],
                            signature="s"),
        "Modalias": dbus.String("usb:v1D6Bp0246d0542"),
        "Roles": dbus.Array(["central", "peripheral"], signature="s"),
    }
    _state[path] = {"discovery": False, "monitors": set(), "wedge": None, "power_offs": 0, "power_ons": 0,
                    "calls": [], "filter": {}, "heard": 0, "unheard": 0}
    self.AddObject(path, ADAPTER_IFACE, props, [
        ("StartDiscovery", "", "", StartDiscovery),
        ("StopDiscovery", "", "", StopDiscovery),
        ("SetDiscoveryFilter", "a{sv}", "", SetDiscoveryFilter),
        ("RemoveDevice", "o", "", RemoveDevice),
    ], mock_class=_Adapter)
    adapter = mockobject.objects[path]
    if monitor:
        adapter.AddProperties(MONITOR_MANAGER_IFACE, {
            "SupportedMonitorTypes": dbus.Array(["or_patterns"], signature="s"),
            "SupportedFeatures": dbus.Array([], signature="s"),
        })
        adapter.AddMethods(MONITOR_MANAGER_IFACE, [
            ("RegisterMonitor", "o", "", RegisterMonitor),
            ("UnregisterMonitor", "o", "", UnregisterMonitor),
        ])
    _added(self, path)
    return path


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="")
def RemoveAdapter(self: Any, name: str) -> None:
    """The dongle is pulled: its devices go first, then the adapter itself."""
    path = f"/org/bluez/{name}"
    for p in [p for p in list(mockobject.objects) if p.startswith(path + "/")]:
        _remove(self, p)
    _remove(self, path)
    _state.pop(path, None)


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def Wedge(self: Any, name: str, kind: str) -> None:
    _state[f"/org/bluez/{name}"]["wedge"] = kind or None


@dbus.service.method(MOCK_IFACE, in_signature="s", out_signature="s")
def GetState(self: Any, name: str) -> str:
    st = dict(_state[f"/org/bluez/{name}"])
    st["monitors"] = sorted(st["monitors"])
    return json.dumps(st)


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def ExpireDevice(self: Any, name: str, address: str) -> None:
    """bluetoothd forgets a temporary device it has not heard for a while."""
    path = f"/org/bluez/{name}/dev_{address.replace(':', '_').upper()}"
    if path in mockobject.objects:
        _remove(self, path)


@dbus.service.method(MOCK_IFACE, in_signature="sssna{qay}a{say}as", out_signature="b")
def Advertise(self: Any, name: str, address: str, local_name: str, rssi: int, manufacturer_data: Any,
              service_data: Any, uuids: Any) -> bool:
    """One advertisement in the air. Returns whether the adapter heard it."""
    apath = f"/org/bluez/{name}"
    adapter = mockobject.objects.get(apath)
    st = _state.get(apath)
    if adapter is None or st is None:
        return False
    scanning = st["discovery"] or st["monitors"]
    if not adapter.props[ADAPTER_IFACE]["Powered"] or not scanning or st["wedge"]:
        st["unheard"] += 1
        return False
    st["heard"] += 1
    md = {dbus.UInt16(k): dbus.Array(bytes(v), signature="y", variant_level=1) for k, v in manufacturer_data.items()}
    sd = {dbus.String(k): dbus.Array(bytes(v), signature="y", variant_level=1) for k, v in service_data.items()}
    dpath = f"{apath}/dev_{address.replace(':', '_').upper()}"
    dev = mockobject.objects.get(dpath)
    if dev is None:
        props = {
            "Address": dbus.String(address.upper()),
            "AddressType": dbus.String("public" if int(address[:2], 16) & 0xC0 != 0x40 else "random"),
            "Alias": dbus.String(local_name or address.upper().replace(":", "-")),
            "Adapter": dbus.ObjectPath(apath),
            "Paired": dbus.Boolean(False),
            "Bonded": dbus.Boolean(False),
            "Trusted": dbus.Boolean(False),
            "Blocked": dbus.Boolean(False),
            "LegacyPairing": dbus.Boolean(False),
            "Connected": dbus.Boolean(False),
            "ServicesResolved": dbus.Boolean(False),
            "RSSI": dbus.Int16(rssi),
            "UUIDs": dbus.Array([str(u) for u in uuids], signature="s"),
            "ManufacturerData": dbus.Dictionary(md, signature="qv"),
            "ServiceData": dbus.Dictionary(sd, signature="sv"),
        }
        if local_name:
            props["Name"] = dbus.String(local_name)
        self.AddObject(dpath, DEVICE_IFACE, props, [])
        _added(self, dpath)
        return True
    cur = dev.props[DEVICE_IFACE]
    changed: dict[str, Any] = {"RSSI": dbus.Int16(rssi)}
    if local_name and cur.get("Name") != local_name:
        changed["Name"] = changed["Alias"] = dbus.String(local_name)
    if md:
        merged = dict(cur["ManufacturerData"])
        merged.update(md)
        if merged != dict(cur["ManufacturerData"]):
            changed["ManufacturerData"] = dbus.Dictionary(merged, signature="qv")
    if sd:
        merged_sd = dict(cur["ServiceData"])
        merged_sd.update(sd)
        if merged_sd != dict(cur["ServiceData"]):
            changed["ServiceData"] = dbus.Dictionary(merged_sd, signature="sv")
    new_uuids = list(cur["UUIDs"]) + [str(u) for u in uuids if str(u) not in cur["UUIDs"]]
    if len(new_uuids) != len(cur["UUIDs"]):
        changed["UUIDs"] = dbus.Array(new_uuids, signature="s")
    cur.update(changed)
    dev.EmitSignal(PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                   [DEVICE_IFACE, dbus.Dictionary(changed, signature="sv"), dbus.Array([], signature="s")])
    return True


def load(mock: Any, parameters: dict[str, Any]) -> None:
    mock.AddObject("/org/bluez", "org.bluez.AgentManager1", {}, [
        ("RegisterAgent", "os", "", ""),
        ("UnregisterAgent", "o", "", ""),
        ("RequestDefaultAgent", "o", "", ""),
    ])
    for name in parameters.get("adapters", []):
        AddAdapter(mock, name, f"siteward-test {name}", bool(parameters.get("monitor", True)))
