"""``siteward`` command line: run the gateway, manage device credentials, check the store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from gateway.logs import configure_logging
from gateway.models import DEVICE_ID_PATTERN
from gateway.settings import ConfigError, Settings, load_settings

log = structlog.get_logger("siteward")


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    try:
        s = load_settings(args.config)
    except ConfigError as exc:
        print(f"siteward: configuration error:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if overrides:
        data = s.model_dump()
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            data[section][key] = value
        try:
            s = Settings.model_validate(data)
        except Exception as exc:
            print(f"siteward: bad command-line value: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return s


def _install_loop() -> None:
    # uvloop measured +25% on the in-process ingest pipeline; optional
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(settings: Settings, simulate: int, production: bool = False,
                 sync_child: tuple[list[str], dict[str, str]] | None = None) -> None:
    from gateway import systemd_notify
    from gateway.app import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    notifier = systemd_notify.Notifier()
    async with Gateway(settings) as gw:
        assert gw.broker is not None
        if production:
            _attach_boot_status(gw)
        if gw.setup_code:
            banner = "=" * 64
            problem = f"\n  Boot configuration problem:\n    {gw.setup_error}\n" if gw.setup_error else ""
            # stdout: the unit sends it to the console too, where an installer can read the code
            print(f"\n{banner}\n  Siteward first start: no admin yet.\n  Open http://<this-host>:"
                  f"{gw.web_port}/setup and enter the setup code:\n\n      {gw.setup_code}\n{problem}{banner}\n",
                  file=sys.stdout, flush=True)
        if simulate:
            from gateway.simulator.nodes import Simulator

            sim = Simulator(simulate, port=gw.broker.port, interval_s=settings.simulate.interval_s)
            gw.supervisor.start("simulator", lambda: sim.run(gw.credentials.mint))
            # no Bluetooth adapter here: simulated beacons through the same BLE decoders
            gw.ble.simulate(settings.ble.simulate_beacons, settings.ble.simulate_interval_s)
        if sync_child is not None:
            # development runs the uplink as a child process, as production runs two units:
            # a sync that crashes or hangs cannot stall the gateway's event loop
            from cloud_sync.main import run_sync_subprocess

            gw.supervisor.start("cloud_sync.process", lambda: run_sync_subprocess(*sync_child))
        log.info("siteward.ready", web=f"http://localhost:{gw.web_port}/", mqtt_port=gw.broker.port,
                 simulated_nodes=simulate)
        # READY only now: broker and web server are listening
        systemd_notify.announce_ready(gw.supervisor, "setup required (code on the console)" if gw.setup_code
                                      else f"serving: web {gw.web_port}, mqtt {gw.broker.port}", notifier)
        await stop.wait()
        log.info("siteward.stopping")
        notifier.stopping()


def _attach_boot_status(gw: Any) -> None:
    """Show what first boot found wrong with the boot partition's config (web UI, /healthz)."""
    from gateway import firstboot

    status = firstboot.read_status()
    if status is None:
        return
    gw.setup_error = status.get("error") or None
    gw.health.register("boot_config", lambda: {"ok": not status.get("error"), **status})


def cmd_run(args: argparse.Namespace, production: bool = False) -> int:
    overrides: dict[str, Any] = {}
    if args.web_port is not None:
        overrides["web.port"] = args.web_port
    if args.mqtt_port is not None:
        overrides["broker.port"] = args.mqtt_port
    if args.data_dir is not None:
        overrides["gateway.data_dir"] = args.data_dir
    settings = _settings(args, **overrides)
    configure_logging(settings.logging)
    simulate = 0 if production else (args.simulate if args.simulate is not None else settings.simulate.nodes)
    sync_child = None
    if settings.cloud.enabled and not production:
        argv = (["--config", str(args.config)] if args.config else []) + ["sync"]
        sync_child = (argv, {"SITEWARD_GATEWAY__DATA_DIR": str(Path(settings.data_dir).resolve())})
    _install_loop()
    from gateway.auth.errors import SetupError

    try:
        asyncio.run(_serve(settings, simulate, production, sync_child))
    except SetupError as exc:
        print(f"siteward: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        hint = " (another broker or gateway on that port? try --mqtt-port/--web-port)" if exc.errno == 98 else ""
        print(f"siteward: cannot start: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


async def _with_store(settings: Settings, fn: Any) -> Any:
    from gateway.metrics import Metrics
    from gateway.store.database import Database

    db = Database(settings.db_path, Metrics())
    await db.open()
    try:
        return await fn(db)
    finally:
        await db.close()


def cmd_device(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.logging)
    from gateway.devices.credentials import Credentials
    from gateway.ingest.profiles import load_profiles

    known = load_profiles(settings.profiles.dirs).profiles

    async def go(db: Any) -> int:
        creds = Credentials(db)
        await creds.load()
        if args.action == "add":
            bad = [p for p in args.profile if p not in known]
            if bad:
                print(f"siteward: unknown profile(s) {', '.join(bad)}; known: {', '.join(sorted(known))}",
                      file=sys.stderr)
                return 2
            if not re.match(DEVICE_ID_PATTERN, args.id):
                print(f"siteward: device id {args.id!r} is not allowed (letters, digits, _ . : -; max 64)",
                      file=sys.stderr)
                return 2
            secret = await creds.mint(args.id, tuple(args.profile))
            from gateway.audit import Audit
            from gateway.bus import LiveBus
            from gateway.devices.registry import DeviceRegistry
            from gateway.metrics import Metrics
            from gateway.store.events import EventLog

            bus = LiveBus()
            registry = DeviceRegistry(db, EventLog(db, bus), bus, Metrics(),
                                      require_adoption=settings.devices.require_adoption,
                                      offline_after_s=settings.devices.offline_after_s)
            await registry.load()
            await registry.ensure(args.id, profile=args.profile[0])
            await Audit(db).record("cli", "device.credentials_minted", args.id, {"profiles": args.profile})
            print(f"device:   {args.id}\nusername: {args.id}\npassword: {secret}\n"
                  f"(shown once; store it in the node's configuration)")
            return 0
        if args.action == "revoke":
            if not await creds.revoke(args.id):
                print(f"siteward: no credentials for device {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked: {args.id}")
            return 0
        for entry in creds.list():
            state = "revoked" if entry["revoked"] else "active"
            print(f"{entry['device']}\t{state}\t{','.join(entry['profiles'])}")  # type: ignore[arg-type]
        return 0

    return int(asyncio.run(_with_store(settings, go)))


def cmd_db_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.logging)

    async def go(db: Any) -> int:
        result = await db.integrity_check()
        print(result)
        return 0 if result == "ok" else 1

    return int(asyncio.run(_with_store(settings, go)))


def cmd_sync(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["gateway.data_dir"] = args.data_dir
    settings = _settings(args, **overrides)
    configure_logging(settings.logging)
    if not settings.cloud.enabled:
        print("siteward: cloud sync is off; set [cloud] enabled = true (and host, port, TLS, auth)", file=sys.stderr)
        return 2
    from cloud_sync.config import SyncConfigError
    from cloud_sync.main import run_sync

    _install_loop()
    try:
        asyncio.run(run_sync(settings))
    except SyncConfigError as exc:
        print(f"siteward: configuration error:\n{exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siteward", description="Siteward on-site IoT gateway")
    p.add_argument("--config", type=Path, default=None, help="TOML configuration file (or $SITEWARD_CONFIG)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def serve_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--web-port", type=int, default=None)
        sp.add_argument("--mqtt-port", type=int, default=None)
        sp.add_argument("--data-dir", type=Path, default=None)

    run = sub.add_parser("run", help="development: the whole gateway in one process, with simulated nodes")
    serve_args(run)
    run.add_argument("--simulate", type=int, default=None, metavar="N", help="simulated ESP32 nodes (default 3)")
    gw = sub.add_parser("gateway", help="production: the gateway daemon (systemd unit siteward-gateway)")
    serve_args(gw)

    sync = sub.add_parser("sync", help="production: the cloud uplink (systemd unit siteward-sync)")
    sync.add_argument("--data-dir", type=Path, default=None)

    dev = sub.add_parser("device", help="device credentials")
    dsub = dev.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="mint MQTT credentials for a device (password shown once)")
    add.add_argument("id")
    add.add_argument("--profile", action="append", default=None,
                     help="compatibility profile(s) granting topics (default: native)")
    rv = dsub.add_parser("revoke", help="revoke a device's credentials (disconnects it)")
    rv.add_argument("id")
    dsub.add_parser("list", help="list device credentials")

    db = sub.add_parser("db", help="store maintenance")
    dbsub = db.add_subparsers(dest="action", required=True)
    dbsub.add_parser("check", help="SQLite integrity check")
    from gateway.ota.nodecli import add_parser as add_node_parser

    add_node_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        if args.simulate is None:
            args.simulate = 3
        return cmd_run(args)
    if args.cmd == "gateway":
        return cmd_run(args, production=True)
    if args.cmd == "device":
        if args.action == "add" and not args.profile:
            args.profile = ["native"]
        return cmd_device(args)
    if args.cmd == "db":
        return cmd_db_check(args)
    if args.cmd == "sync":
        return cmd_sync(args)
    if args.cmd == "node":
        from gateway.ota import nodecli

        settings = _settings(args)
        configure_logging(settings.logging)
        return nodecli.cmd_flash(args, settings) if args.action == "flash" else nodecli.cmd_provision(args, settings)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
