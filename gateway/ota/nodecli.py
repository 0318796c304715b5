"""``siteward node flash`` and ``siteward node provision``: what an installer runs at a laptop or
on the gateway itself with a board on USB.

``flash`` runs esptool (a separate program) with a progress bar; ``provision`` mints the node's
MQTT credentials in the gateway's store, writes its configuration (NVS partition via esptool, or
config.json over the MicroPython raw REPL via mpremote), then waits for the node to come online.
Every failure ends with one sentence saying what to do, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

# firmware.tools (flash, provision, manifest) is imported by the commands that run it, not
# here: build_parser() imports this module for every `siteward` subcommand, including the
# long-running `gateway` and `sync`, which must not carry the flashing tools in memory.

WAIT_ONLINE_S = 120.0


def add_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="flash and provision ESP32 nodes over USB serial")
    nsub = node.add_subparsers(dest="action", required=True)
    f = nsub.add_parser("flash", help="write firmware to a board with esptool")
    f.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0 (or socket://host:port)")
    f.add_argument("--firmware", required=True, type=Path, help="app image (.bin) or merged full-flash image")
    f.add_argument("--erase", action="store_true", help="erase the whole flash first (also wipes NVS and files)")
    f.add_argument("--offset", type=lambda s: int(s, 0), default=None, help="override where the file goes")
    f.add_argument("--baud", type=int, default=None)
    f.add_argument("--before", default="default-reset", choices=["default-reset", "no-reset", "usb-reset"])
    p = nsub.add_parser("provision", help="mint credentials, write the node's configuration, wait for it online")
    p.add_argument("--port", required=True)
    p.add_argument("--id", required=True, help="the node's device id")
    p.add_argument("--method", choices=["nvs", "repl"], default="nvs",
                   help="nvs: NVS partition via esptool (default); repl: config.json via the MicroPython REPL")
    p.add_argument("--wifi-ssid", default=None)
    p.add_argument("--wifi-password", default=None)
    p.add_argument("--gateway-host", default=None, help="address nodes use to reach this gateway")
    p.add_argument("--mqtt-port", type=int, default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--install-app", action="store_true", help="repl: also copy the Siteward node application")
    p.add_argument("--chip", default="esp32")
    p.add_argument("--before", default="default-reset", choices=["default-reset", "no-reset", "usb-reset"])
    p.add_argument("--wait", type=float, default=WAIT_ONLINE_S, help="seconds to wait for the node (0: don't)")


def _bar(stage: str, pct: float | None) -> None:
    if pct is None:
        print(f"\r{stage:<12}", end="", file=sys.stderr, flush=True)
        return
    filled = int(pct / 100 * 30)
    print(f"\r{stage:<12}[{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}%", end="", file=sys.stderr, flush=True)


def cmd_flash(args: argparse.Namespace, settings: Any) -> int:
    from firmware.tools import flash as fl

    try:
        fp = asyncio.run(fl.flash(args.port, args.firmware, erase=args.erase, offset=args.offset, baud=args.baud,
                                  esptool=settings.ota.esptool, before=args.before, on_progress=_bar))
    except fl.FlashError as exc:
        print(f"\nsiteward: flashing failed ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    what = f"{fp.project} {fp.version}" if fp.version else args.firmware.name
    print(f"\nflashed {what} to {args.port} at 0x{fp.offset:x} ({fp.chip}), verified")
    return 0


def _default_host(settings: Any) -> str:
    if settings.ota.base_url:
        return re.sub(r"^https?://", "", settings.ota.base_url).rsplit(":", 1)[0]
    if settings.broker.host not in ("0.0.0.0", "::", ""):
        return str(settings.broker.host)
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def cmd_provision(args: argparse.Namespace, settings: Any) -> int:
    from firmware.tools import provision as pv
    from gateway.models import DEVICE_ID_PATTERN

    if not re.match(DEVICE_ID_PATTERN, args.id):
        print(f"siteward: device id {args.id!r} is not allowed (letters, digits, _ . : -; max 64)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_provision(args, settings))
    except pv.ProvisionError as exc:
        print(f"\nsiteward: provisioning failed ({exc.code}): {exc.message}", file=sys.stderr)
        return 1


async def _provision(args: argparse.Namespace, settings: Any) -> int:
    from firmware.tools import manifest as mf
    from firmware.tools import provision as pv
    from gateway.audit import Audit
    from gateway.bus import LiveBus
    from gateway.devices.credentials import Credentials
    from gateway.devices.registry import DeviceRegistry
    from gateway.metrics import Metrics
    from gateway.store.database import Database
    from gateway.store.events import EventLog

    key_path = settings.ota.signing_key or (settings.data_dir / "ota" / "signing.key")
    key = await asyncio.to_thread(mf.load_or_create_key, key_path)
    ota_keys = [mf.public_b64(key.public_key()), *settings.ota.trusted_keys]

    db = Database(settings.db_path, Metrics())
    await db.open()
    try:
        creds = Credentials(db)
        await creds.load()
        password = await creds.mint(args.id, ("native",))
        bus = LiveBus()
        registry = DeviceRegistry(db, EventLog(db, bus), bus, Metrics(),
                                  require_adoption=settings.devices.require_adoption,
                                  offline_after_s=settings.devices.offline_after_s)
        await registry.load()
        await registry.ensure(args.id, profile="native")
        await Audit(db).record("cli", "node.provision", args.id, {"method": args.method, "port": args.port})
        started = time.time()
        cfg = pv.node_config(device_id=args.id, password=password,
                             gateway_host=args.gateway_host or _default_host(settings),
                             mqtt_port=args.mqtt_port or settings.broker.port,
                             http_port=args.http_port or settings.web.port, ota_keys=ota_keys,
                             wifi_ssid=args.wifi_ssid, wifi_password=args.wifi_password)
        print(f"credentials minted for {args.id}; writing configuration ({args.method}) to {args.port}",
              file=sys.stderr)
        if args.method == "nvs":
            await pv.provision_nvs(args.port, cfg, chip=args.chip, esptool=settings.ota.esptool, before=args.before,
                                   on_progress=_bar)
        else:
            await pv.provision_repl(args.port, cfg, install_app=args.install_app)
        print(f"\nconfiguration written to {args.port}", file=sys.stderr)
        if args.wait <= 0:
            return 0
        print(f"waiting up to {args.wait:.0f} s for {args.id} to come online…", file=sys.stderr)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            # the gateway process records when it last heard the node in the shared store (at once
            # on a state change, within devices.last_seen_flush_s otherwise): heard since we began
            # provisioning means it runs with the new configuration
            row = await db.fetchone("SELECT last_seen FROM devices WHERE id = ?", (args.id,))
            if row is not None and (row[0] or 0) >= started - 1:
                print(f"{args.id} is online")
                return 0
            await asyncio.sleep(0.5)
        print(f"siteward: {args.id} did not come online within {args.wait:.0f} s: check the Wi-Fi name and "
              f"password, that the node reaches {cfg['mqtt']['host']}:{cfg['mqtt']['port']}, and the node's "
              f"serial console", file=sys.stderr)
        return 3
    finally:
        await db.close()
