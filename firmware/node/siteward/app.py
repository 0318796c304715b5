# The node's main loop: connect (Wi-Fi, then MQTT) with backoff, publish telemetry and
# heartbeats, obey commands, take OTA updates. Never reboots because a network is down:
# only the hardware watchdog (the loop stopped running) or a command/OTA restarts it.
import json
import random
import sys
import time

import machine

from siteward import config
from siteward import sensors
from siteward import version

BACKOFF_MIN_MS = 1000
BACKOFF_MAX_MS = 60000
WIFI_TIMEOUT_MS = 20000


class Node:
    def __init__(self, cfg, app_dir=None):
        self.cfg = cfg
        self.id = cfg["id"]
        self.app_dir = app_dir
        self.prefix = "devices/%s/" % self.id
        self.client = None
        self.connected = False
        self.interval_ms = int(cfg["interval_s"] * 1000)
        self.heartbeat_ms = int(cfg["heartbeat_s"] * 1000)
        self.started = time.ticks_ms()
        self.wdt = None
        self.backoff = BACKOFF_MIN_MS
        self.seq = 0
        self.pending_reboot = None
        self.relay = None
        self.led = None
        self.sensors = []
        self._identity = None
        self.confirm_deadline = None
        self.last_ping = time.ticks_ms()
        from siteward import ota

        self.ota = ota.Updater(self)

    # -- hardware -----------------------------------------------------------------------------
    def setup_hardware(self):
        if self.cfg.get("wdt_ms"):
            self.wdt = machine.WDT(timeout=int(self.cfg["wdt_ms"]))
        if self.cfg.get("relay_pin") is not None:
            self.relay = sensors.Relay(self.cfg["relay_pin"])
        if self.cfg.get("led_pin") is not None:
            self.led = machine.Pin(self.cfg["led_pin"], machine.Pin.OUT, value=0)
        i2c_cfg = self.cfg.get("i2c")
        if i2c_cfg:
            try:
                i2c = machine.I2C(0, scl=machine.Pin(i2c_cfg["scl"]), sda=machine.Pin(i2c_cfg["sda"]),
                                  freq=i2c_cfg.get("freq", 100000))
                self.sensors = sensors.probe(i2c)
            except (OSError, ValueError) as e:
                print("i2c:", e)

    def feed_watchdog(self):
        if self.wdt is not None:
            self.wdt.feed()

    def identity(self):
        """(project, version) this node runs: the image's app description, else the app files'."""
        if self._identity is None:
            from siteward import ota

            found = ota.image_identity() if ota.partition_mode() else None
            self._identity = found or (version.PROJECT, version.VERSION)
        return self._identity

    def chip(self):
        """"esp32", "esp32s3", ...: from the config, else from the MicroPython build's machine name."""
        if self.cfg.get("chip"):
            return self.cfg["chip"]
        import os

        uname = getattr(os, "uname", None)  # the ESP32 port has it; not every port does
        machine_name = uname().machine if uname else ""  # e.g. "Generic ESP32S3 module with ESP32S3"
        if "ESP32" in machine_name:
            return machine_name.split()[-1].lower()
        return None

    # -- network ------------------------------------------------------------------------------
    def wifi_up(self):
        try:
            import network
        except ImportError:
            return True  # a port without Wi-Fi (Ethernet boards) is already on its network
        w = network.WLAN(network.STA_IF)
        if w.isconnected():
            return True
        wifi = self.cfg.get("wifi") or {}
        if not wifi.get("ssid"):
            return True
        w.active(True)
        w.connect(wifi["ssid"], wifi.get("password", ""))
        start = time.ticks_ms()
        limit = int(self.cfg.get("wifi_timeout_s", WIFI_TIMEOUT_MS // 1000) * 1000)
        while not w.isconnected():
            self.feed_watchdog()
            self.check_confirm()
            if time.ticks_diff(time.ticks_ms(), start) > limit:
                return False
            time.sleep_ms(200)
        return True

    def rssi(self):
        try:
            import network

            return network.WLAN(network.STA_IF).status("rssi")
        except Exception:
            return None

    def connect(self):
        from siteward.mqtt import MQTTClient

        m = self.cfg["mqtt"]
        c = MQTTClient(self.id, m["host"], m["port"], m["user"], m["password"], m["keepalive"])
        c.set_last_will(self.prefix + "status", "offline", retain=True, qos=1)
        c.on_message = self.on_message
        c.connect()
        c.subscribe(self.prefix + "command", 1)
        c.subscribe(self.prefix + "ota", 1)
        self.client = c
        self.connected = True
        self.backoff = BACKOFF_MIN_MS
        self.pub("status", "online", retain=True)
        self.publish_status()
        self.publish_health()
        self.ota.confirm()

    def drop(self, why):
        print("connection lost:", why)
        if self.client is not None:
            self.client.close()
        self.client = None
        self.connected = False

    def wait_backoff(self):
        # exponential with jitter, so a site's nodes do not all come back at the same instant
        delay = self.backoff + random.getrandbits(10) * self.backoff // 2048
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_MS)
        end = time.ticks_add(time.ticks_ms(), delay)
        while time.ticks_diff(end, time.ticks_ms()) > 0:
            self.feed_watchdog()
            self.check_confirm()
            time.sleep_ms(min(200, max(1, time.ticks_diff(end, time.ticks_ms()))))

    # -- publishing -----------------------------------------------------------------------------
    def pub(self, sub, payload, retain=False):
        if not self.connected:
            return
        if not isinstance(payload, (str, bytes)):
            payload = json.dumps(payload)
        try:
            self.client.publish(self.prefix + sub, payload, retain=retain, qos=1)
        except OSError as e:
            self.drop(e)

    def publish_telemetry(self):
        values = {}
        for s in self.sensors:
            try:
                values.update(s.read())
            except OSError as e:
                print("sensor:", e)
        self.seq += 1
        if values:
            values["seq"] = self.seq
            self.pub("telemetry", values)

    def publish_health(self):
        import gc

        gc.collect()
        project, fw = self.identity()
        h = {"heap": gc.mem_free(), "uptime": time.ticks_diff(time.ticks_ms(), self.started) // 1000,
             "fw": fw, "model": project}
        r = self.rssi()
        if r is not None:
            h["rssi"] = r
        self.pub("health", h)

    def publish_status(self, cmd_id=None, **extra):
        st = {"relay": self.relay.word if self.relay else "off", "interval_s": self.interval_ms / 1000}
        if cmd_id:
            st["cmd_id"] = cmd_id
        st.update(extra)
        self.pub("status", st)

    def ota_report(self, state, **kw):
        body = {"state": state}
        for k, v in kw.items():
            if v is not None and v != "":
                body[k] = v
        print("ota:", body)
        self.pub("ota/status", body)

    # -- what comes in --------------------------------------------------------------------------
    def on_message(self, topic, payload):
        if topic == self.prefix + "command":
            self.on_command(payload)
        elif topic == self.prefix + "ota":
            try:
                self.ota.handle(payload)
            except Exception as e:  # a bug in an update must not take the node down with it
                sys.print_exception(e)
                self.ota_report("FAILED", reason="internal_error", detail=repr(e)[:100])

    def on_command(self, payload):
        try:
            cmd = json.loads(payload)
            cid, name, args = cmd.get("id"), cmd.get("command"), cmd.get("args") or {}
        except (ValueError, AttributeError):
            return
        if name in ("relay", "set_relay", "switch") and args.get("state") in ("on", "off") and self.relay:
            self.relay.set(args["state"] == "on")
        elif name in ("on", "off") and self.relay:
            self.relay.set(name == "on")
        elif name == "toggle" and self.relay:
            self.relay.set(not self.relay.on)
        elif name == "set_interval" and isinstance(args.get("seconds"), (int, float)) and 1 <= args["seconds"] <= 86400:
            self.interval_ms = int(args["seconds"] * 1000)
        elif name == "identify":
            self.identify()
        elif name == "reboot":
            self.publish_status(cid, ok=True)
            self.reboot("command")
            return
        else:
            self.publish_status(cid, error="unknown or invalid command %s" % name)
            return
        self.publish_status(cid, ok=True)

    def identify(self):
        if self.led is None:
            return
        for i in range(6):
            self.led.value(i % 2 == 0)
            time.sleep_ms(150)
        self.led.value(0)

    def reboot(self, why):
        print("rebooting:", why)
        if self.client is not None:
            self.client.disconnect()
        self.connected = False
        time.sleep_ms(100)
        machine.reset()

    # -- the loop -------------------------------------------------------------------------------
    def service(self):
        """Keep the MQTT session alive while something long runs (an OTA download)."""
        if self.connected:
            try:
                now = time.ticks_ms()
                if time.ticks_diff(now, self.last_ping) > self.cfg["mqtt"]["keepalive"] * 500:
                    self.last_ping = now
                    self.client.ping()
                self.client.poll(0)
            except OSError as e:
                self.drop(e)

    def check_confirm(self):
        # a freshly switched firmware that cannot get back to the broker in time is not
        # confirmed: restart, and the bootloader returns to the previous one
        if self.confirm_deadline is not None and time.ticks_diff(time.ticks_ms(), self.confirm_deadline) > 0:
            self.reboot("new firmware not confirmed in time")

    def run(self):
        self.setup_hardware()
        if self.ota.pending():
            self.confirm_deadline = time.ticks_add(time.ticks_ms(), int(self.cfg["confirm_s"] * 1000))
        next_tel = time.ticks_ms()
        next_hb = time.ticks_add(time.ticks_ms(), self.heartbeat_ms)
        next_ping = time.ticks_add(time.ticks_ms(), self.cfg["mqtt"]["keepalive"] * 500)
        while True:
            self.feed_watchdog()
            self.check_confirm()
            if not self.connected:
                try:
                    if not self.wifi_up():
                        raise OSError("wifi not connected")
                    self.connect()
                    self.confirm_deadline = None
                except OSError as e:
                    print("connect failed:", e)
                    self.drop(e)
                    self.wait_backoff()
                    continue
            now = time.ticks_ms()
            try:
                if time.ticks_diff(now, next_tel) >= 0:
                    next_tel = time.ticks_add(now, self.interval_ms)
                    self.publish_telemetry()
                if time.ticks_diff(now, next_hb) >= 0:
                    next_hb = time.ticks_add(now, self.heartbeat_ms)
                    self.publish_health()
                if time.ticks_diff(now, next_ping) >= 0:
                    next_ping = time.ticks_add(now, self.cfg["mqtt"]["keepalive"] * 500)
                    self.last_ping = now
                    self.client.ping()
                if self.connected:
                    self.client.poll(100)
            except OSError as e:
                self.drop(e)


def run(app_dir=None):
    try:
        cfg = config.load()
    except (config.ConfigError, ValueError) as e:
        # nothing to connect with: wait for provisioning over USB without a reboot loop
        print("siteward:", e)
        while True:
            time.sleep(1)
    Node(cfg, app_dir).run()
