"""First boot of the appliance: configure the gateway from ``siteward.toml`` on the FAT boot partition.

The installer's whole job is to flash the card, drop one file on its boot partition and
power on. ``siteward-firstboot.service`` runs ``python -m gateway.firstboot`` as root on
every boot, before the gateway; it is quick when there is nothing to do.

* No boot config and the gateway already configured: nothing to do.
* A boot config that validates: apply it (host name, time zone, NTP, Wi-Fi, cloud, admin
  hash) into ``/etc/siteward/siteward.toml`` and the system's files, move every secret off
  the FAT partition (the file is replaced by ``siteward.toml.applied`` with the secrets
  blanked), enable the services.
* Missing (on a never-configured card), empty or invalid: never a boot loop and never a
  half-applied config. The gateway still starts, in setup mode, and the error is written to
  the console and to :data:`STATUS_PATH`, which the gateway shows on its web UI and in
  /healthz. The file stays on the card so the installer can correct it and reboot.

On every boot, whatever the config, the gateway's CA, server certificate and OTA signing
key are made if missing. Paths are all relative to :class:`Paths`, so tests run this on a
directory that stands in for the card and the root file system.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import grp
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BOOT_CONFIG_NAME = "siteward.toml"
APPLIED_SUFFIX = ".applied"
STATUS_PATH = Path("/run/siteward-boot/status.json")
SERVICE_USER = "siteward"
BLANKED = "(moved to the gateway)"
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$"  # also the host name: no dots, no underscores
WIFI_INTERFACE = "wlan0"
MAX_CERT_BYTES = 64 * 1024


# -- the boot-partition file ------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Strict):
    name: str = Field(min_length=1, max_length=120, description="the site, shown in the web UI")
    gateway: str = Field(pattern=GATEWAY_ID_PATTERN, description="gateway id and host name")
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Berlin)") from None
        return v


class WifiConfig(_Strict):
    ssid: str = Field(min_length=1)
    psk: str
    country: str = Field(pattern=r"^[A-Z]{2}$", description="regulatory domain, e.g. DE")
    hidden: bool = False

    @field_validator("ssid")
    @classmethod
    def _ssid(cls, v: str) -> str:
        if len(v.encode()) > 32:
            raise ValueError("an SSID is at most 32 bytes")
        if any(ord(c) < 32 for c in v):
            raise ValueError("the SSID contains a control character")
        return v

    @field_validator("psk")
    @classmethod
    def _psk(cls, v: str) -> str:
        if re.fullmatch(r"[0-9a-fA-F]{64}", v):
            return v
        if not 8 <= len(v) <= 63 or any(not 32 <= ord(c) <= 126 for c in v):
            raise ValueError("a WPA passphrase is 8 to 63 printable ASCII characters (or 64 hex digits)")
        return v


class TimeConfig(_Strict):
    ntp: list[str] = Field(default_factory=list, max_length=8)

    @field_validator("ntp")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host):
                raise ValueError(f"{host!r} is not a host name or address")
        return v


class CloudConfig(_Strict):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=8883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    # file names on the boot partition (PEM), moved to /etc/siteward/cloud/
    client_cert: str | None = None
    client_key: str | None = None
    ca_cert: str | None = None

    @model_validator(mode="after")
    def _credentials(self) -> CloudConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.client_cert is None and self.username is None:
            raise ValueError("give username/password or client_cert/client_key")
        if self.password is not None and self.username is None:
            raise ValueError("password without username")
        return self


class AdminConfig(_Strict):
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        from gateway.auth.passwords import is_argon2_hash

        if not is_argon2_hash(v):
            raise ValueError("not an argon2 hash (make one with: python -m gateway.auth.passwords)")
        return v


class BootConfig(_Strict):
    site: SiteConfig
    wifi: WifiConfig | None = None
    time: TimeConfig = TimeConfig()
    cloud: CloudConfig | None = None
    admin: AdminConfig | None = None

    def secret_paths(self) -> list[tuple[str, str]]:
        out = []
        if self.wifi is not None:
            out.append(("wifi", "psk"))
        if self.cloud is not None and self.cloud.password is not None:
            out.append(("cloud", "password"))
        return out


class BootConfigError(Exception):
    """The boot config cannot be used; ``str()`` is what the installer reads."""


def parse_boot_config(text: str, source: str = BOOT_CONFIG_NAME) -> BootConfig:
    if not text.strip():
        raise BootConfigError(f"{source} is empty")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BootConfigError(f"{source} is not valid TOML: {exc}") from None
    try:
        return BootConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(file)"
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key '{key}'")
            elif err["type"] == "missing":
                lines.append(f"{source}: missing key '{key}'")
            else:
                msg = str(err["msg"]).removeprefix("Value error, ")
                lines.append(f"{source}: '{key}': {msg}")
        raise BootConfigError("\n".join(lines)) from None


# -- where things are ------------------------------------------------------------------------

@dataclass(frozen=True)
class Paths:
    """Every location first boot touches; ``Paths.under(tmp)`` for tests."""

    boot: Path = Path("/boot/firmware")
    etc: Path = Path("/etc")
    data: Path = Path("/var/lib/siteward")
    status: Path = STATUS_PATH
    zoneinfo: Path = Path("/usr/share/zoneinfo")

    @classmethod
    def under(cls, root: Path) -> Paths:
        return cls(boot=root / "boot/firmware", etc=root / "etc", data=root / "var/lib/siteward",
                   status=root / "run/siteward-boot/status.json", zoneinfo=Path("/usr/share/zoneinfo"))

    @property
    def boot_config(self) -> Path:
        return self.boot / BOOT_CONFIG_NAME

    @property
    def siteward_etc(self) -> Path:
        return self.etc / "siteward"

    @property
    def gateway_config(self) -> Path:
        return self.siteward_etc / "siteward.toml"


Runner = Callable[[Sequence[str]], None]


def run_command(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, timeout=120)


@dataclass
class Outcome:
    state: Literal["configured", "unchanged", "setup", "error"]
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    gateway_id: str | None = None
    applied_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "warnings": self.warnings,
                "gateway_id": self.gateway_id, "applied_at": self.applied_at}


# -- small file helpers ----------------------------------------------------------------------

def _owner_ids(user: str) -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None  # tests on a development machine: no such account, files stay ours
    return pw.pw_uid, pw.pw_gid


def _write(path: Path, data: str | bytes, mode: int, *, group_readable_by: str | None = None,
           owner: str | None = None) -> None:
    """Atomically write ``path`` (temp file + rename, fsynced) with ``mode`` from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    if os.geteuid() == 0:
        ids = _owner_ids(owner) if owner else None
        uid = ids[0] if ids else 0
        gid = 0
        if group_readable_by:
            with contextlib.suppress(KeyError):
                gid = grp.getgrnam(group_readable_by).gr_gid
        elif ids:
            gid = ids[1]
        os.chown(tmp, uid, gid)
    os.replace(tmp, path)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dump_toml(sections: dict[str, dict[str, Any]], header: str = "") -> str:
    out = [header] if header else []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)


# -- the work --------------------------------------------------------------------------------

GATEWAY_CONFIG_HEADER = (
    "# Written by siteward-firstboot from the boot partition's siteward.toml.\n"
    "# Local changes are kept until a new siteward.toml is placed on the boot partition.\n"
)


class FirstBoot:
    def __init__(self, paths: Paths | None = None, *, run: Runner = run_command, live: bool = True,
                 out: Callable[[str], None] | None = None) -> None:
        self.paths = paths or Paths()
        self.run = run
        # live: also act on the running system (set the host name, start units); off in tests
        self.live = live
        self.say = out or (lambda line: print(line, flush=True))

    # entry point
    def execute(self) -> Outcome:
        p = self.paths
        configured = p.gateway_config.exists() and not _is_default_config(p.gateway_config)
        outcome: Outcome
        if p.boot_config.exists():
            try:
                text = p.boot_config.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                text = None
                outcome = self._refuse(f"{BOOT_CONFIG_NAME} cannot be read: {exc}", configured)
            if text is not None:
                try:
                    cfg = parse_boot_config(text)
                    self._check_files(cfg)
                    outcome = self.apply(cfg)
                except BootConfigError as exc:
                    outcome = self._refuse(str(exc), configured)
        elif configured:
            outcome = Outcome("unchanged", gateway_id=_configured_id(p.gateway_config))
        else:
            outcome = self._refuse(
                f"no {BOOT_CONFIG_NAME} on the boot partition: the gateway runs in setup mode "
                "(see docs/appliance.md for the file, or use the setup code on this console)",
                configured=False, state="setup")
        self.ensure_keys(_configured_id(p.gateway_config) or "siteward")
        self.write_status(outcome)
        self.tell_console(outcome)
        return outcome

    def _refuse(self, error: str, configured: bool, state: Literal["setup", "error"] = "error") -> Outcome:
        """Keep (or create) a config the gateway can start with; never a half-applied one."""
        if not configured and not self.paths.gateway_config.exists():
            self.write_default_config()
        if configured:
            error += "\n(the gateway keeps its previous configuration)"
        self._enable(["siteward-gateway.service"], [])
        return Outcome(state, error=error, gateway_id=_configured_id(self.paths.gateway_config))

    def _check_files(self, cfg: BootConfig) -> None:
        """Referenced certificate files must be on the card and look like PEM."""
        if cfg.cloud is None:
            return
        errors = []
        for key in ("client_cert", "client_key", "ca_cert"):
            name = getattr(cfg.cloud, key)
            if name is None:
                continue
            src = self.paths.boot / name
            if "/" in name or name.startswith(".") or not src.is_file():
                errors.append(f"{BOOT_CONFIG_NAME}: 'cloud.{key}': no file {name!r} next to {BOOT_CONFIG_NAME}")
                continue
            head = src.read_bytes()[:MAX_CERT_BYTES + 1]
            if len(head) > MAX_CERT_BYTES or b"-----BEGIN " not in head:
                errors.append(f"{BOOT_CONFIG_NAME}: 'cloud.{key}': {name!r} is not a PEM file")
        if errors:
            raise BootConfigError("\n".join(errors))

    def write_default_config(self) -> None:
        """Setup mode: a config the gateway can start with, identity from the machine id."""
        gw_id = _default_gateway_id(self.paths.etc)
        text = dump_toml({"gateway": {"id": gw_id, "name": "Siteward gateway (not configured)",
                                      "data_dir": str(self.paths.data)}},
                         header="# setup mode: written by siteward-firstboot, replaced when a valid "
                                "siteward.toml is applied\n" + DEFAULT_MARKER + "\n")
        _write(self.paths.gateway_config, text, 0o640, group_readable_by=SERVICE_USER)

    def apply(self, cfg: BootConfig) -> Outcome:
        p = self.paths
        warnings: list[str] = []
        etc = p.siteward_etc
        etc.mkdir(parents=True, exist_ok=True)
        os.chmod(etc, 0o750)
        sections: dict[str, dict[str, Any]] = {
            "gateway": {"id": cfg.site.gateway, "name": cfg.site.name, "data_dir": str(p.data),
                        "timezone": cfg.site.timezone},
        }
        if cfg.admin is not None:
            sections["web"] = {"admin_password_hash": cfg.admin.password_hash}
        cloud_files: list[tuple[Path, Path]] = []
        if cfg.cloud is not None:
            sections["cloud"], cloud_files, note = self._cloud_section(cfg.cloud)
            if note:
                warnings.append(note)

        # The new config must be one the installed gateway accepts, or nothing is applied.
        text = dump_toml(sections, header=GATEWAY_CONFIG_HEADER)
        _validate_gateway_config(text, etc)

        for src, dst in cloud_files:
            _write(dst, src.read_bytes(), 0o640, group_readable_by=SERVICE_USER)
        if cfg.cloud is not None and cfg.cloud.password is not None:
            _write(etc / "cloud" / "password", cfg.cloud.password + "\n", 0o640, group_readable_by=SERVICE_USER)
        _write(p.gateway_config, text, 0o640, group_readable_by=SERVICE_USER)

        self._hostname(cfg.site.gateway)
        self._timezone(cfg.site.timezone)
        self._ntp(cfg.time.ntp)
        wifi_units = self._wifi(cfg.wifi)
        enable = ["siteward-gateway.service", *wifi_units[0]]
        disable = list(wifi_units[1])
        if cfg.cloud is not None:
            enable.append("siteward-sync.service")
        else:
            disable.append("siteward-sync.service")
        self._enable(enable, disable)
        self._scrub(cfg, [src for src, _ in cloud_files])
        return Outcome("configured", warnings=warnings, gateway_id=cfg.site.gateway,
                       applied_at=dt.datetime.now(dt.UTC).timestamp())

    def _cloud_section(self, c: CloudConfig) -> tuple[dict[str, Any], list[tuple[Path, Path]], str | None]:
        """Map the boot file's cloud keys onto what this build's ``[cloud]`` settings know.

        Files and the password always move off the card (to /etc/siteward/, 0640 root:siteward);
        a key the installed Siteward does not read is reported, not written (an unknown key
        would stop the gateway from starting).
        """
        from gateway.settings import CloudSection

        known = set(CloudSection.model_fields)
        dest = self.paths.siteward_etc / "cloud"
        section: dict[str, Any] = {"enabled": True, "host": c.host, "port": c.port}
        files: list[tuple[Path, Path]] = []
        unread: list[str] = []

        def put(boot_key: str, value: Any, *names: str) -> None:
            for name in names:
                if name in known:
                    section[name] = value
                    return
            unread.append(boot_key)

        for key, target, names in (("client_cert", "client.pem", ("cert_file", "client_cert")),
                                   ("client_key", "client.key", ("key_file", "client_key")),
                                   ("ca_cert", "ca.pem", ("ca_file", "ca_cert"))):
            name = getattr(c, key)
            if name is not None:
                files.append((self.paths.boot / name, dest / target))
                put(key, str(dest / target), *names)
        if c.username is not None:
            put("username", c.username, "username")
        if c.password is not None:
            if "password_file" in known:
                section["password_file"] = str(dest / "password")
            else:
                put("password", c.password, "password")
        note = (f"this Siteward build does not read cloud.{', cloud.'.join(unread)} yet: the values are kept in "
                f"{dest} for the cloud sync") if unread else None
        return section, files, note

    def _hostname(self, name: str) -> None:
        etc = self.paths.etc
        _write(etc / "hostname", name + "\n", 0o644)
        hosts = etc / "hosts"
        lines = hosts.read_text().splitlines() if hosts.exists() else ["127.0.0.1\tlocalhost"]
        lines = [ln for ln in lines if not ln.startswith("127.0.1.1")]
        lines.insert(1, f"127.0.1.1\t{name}")
        _write(hosts, "\n".join(lines) + "\n", 0o644)
        if self.live:
            with contextlib.suppress(OSError):
                socket.sethostname(name)

    def _timezone(self, tz: str) -> None:
        etc = self.paths.etc
        target = self.paths.zoneinfo / tz
        link = etc / "localtime"
        tmp = etc / ".localtime.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)
        _write(etc / "timezone", tz + "\n", 0o644)

    def _ntp(self, servers: list[str]) -> None:
        conf = self.paths.etc / "systemd/timesyncd.conf.d/siteward.conf"
        if not servers:
            with contextlib.suppress(FileNotFoundError):
                conf.unlink()
            return
        _write(conf, "# from siteward.toml [time] ntp\n[Time]\nNTP=" + " ".join(servers) + "\n", 0o644)

    def _wifi(self, wifi: WifiConfig | None) -> tuple[list[str], list[str]]:
        unit = f"wpa_supplicant@{WIFI_INTERFACE}.service"
        conf = self.paths.etc / f"wpa_supplicant/wpa_supplicant-{WIFI_INTERFACE}.conf"
        if wifi is None:
            with contextlib.suppress(FileNotFoundError):
                conf.unlink()
            return [], [unit]
        psk = wifi.psk if len(wifi.psk) == 64 else json.dumps(wifi.psk)
        text = (
            "# from siteward.toml [wifi]\n"
            "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
            f"country={wifi.country}\n"
            "network={\n"
            f"    ssid={json.dumps(wifi.ssid, ensure_ascii=False)}\n"
            f"    psk={psk}\n"
            f"    scan_ssid={1 if wifi.hidden else 0}\n"
            "    key_mgmt=WPA-PSK WPA-PSK-SHA256 SAE\n"
            "    ieee80211w=1\n"
            "}\n"
        )
        _write(conf, text, 0o600)
        return [unit], []

    def _enable(self, enable: list[str], disable: list[str]) -> None:
        """Enable (and, on the live system, start without waiting) the units; never fatal."""
        for argv in (["systemctl", "enable", *enable] if enable else None,
                     ["systemctl", "disable", *disable] if disable else None,
                     ["systemctl", "start", "--no-block", *enable] if enable and self.live else None):
            if argv is None:
                continue
            try:
                self.run(argv)
            except (OSError, subprocess.SubprocessError) as exc:
                self.say(f"siteward-firstboot: warning: {' '.join(argv[:2])} failed: {exc}")

    def _scrub(self, cfg: BootConfig, moved: list[Path]) -> None:
        """Take the secrets off the FAT partition; leave a redacted record of what was applied."""
        p = self.paths
        data = tomllib.loads(p.boot_config.read_text(encoding="utf-8"))
        for section, key in cfg.secret_paths():
            data[section][key] = BLANKED
        note = (f"# Applied by siteward-firstboot at {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}.\n"
                "# Secrets were moved to the gateway. To change the configuration, edit this\n"
                f"# file, rename it back to {BOOT_CONFIG_NAME} with the secrets filled in, and reboot.\n")
        sections = {k: v for k, v in data.items() if isinstance(v, dict)}
        applied = p.boot / (BOOT_CONFIG_NAME + APPLIED_SUFFIX)
        _write(applied, dump_toml(sections, header=note), 0o644)
        for path in [p.boot_config, *moved]:
            _overwrite_and_remove(path)

    def ensure_keys(self, gateway_id: str) -> list[str]:
        """Make what the gateway signs and serves with, once; owned by the service user."""
        made: list[str] = []
        data = self.paths.data
        try:
            data.mkdir(parents=True, exist_ok=True)
            from gateway.tls import GatewayCA

            ca = GatewayCA(data / "tls", gateway_id)
            if not (ca.ca_cert.exists() and ca.server_cert.exists()):
                ca.ensure()
                made.append("tls")
            ota = data / "ota"
            key_path = ota / "signing-ed25519.key"
            if not key_path.exists():
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                key = Ed25519PrivateKey.generate()
                _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
                _write(ota / "signing-ed25519.pub", key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
                made.append("ota")
            if made and os.geteuid() == 0:
                _chown_tree(data / "tls", SERVICE_USER)
                _chown_tree(ota, SERVICE_USER)
        except OSError as exc:
            # a full or read-only data partition must not stop the boot; the gateway reports it
            self.say(f"siteward-firstboot: warning: cannot make keys in {data}: {exc}")
        return made

    def write_status(self, outcome: Outcome) -> None:
        try:
            _write(self.paths.status, json.dumps(outcome.as_dict(), indent=1) + "\n", 0o644)
        except OSError as exc:
            self.say(f"siteward-firstboot: warning: cannot write {self.paths.status}: {exc}")

    def tell_console(self, outcome: Outcome) -> None:
        """Print the result (the unit sends stdout to the console) and leave it for the login prompt."""
        lines = [f"Siteward: boot configuration {outcome.state}"
                 + (f" (gateway {outcome.gateway_id})" if outcome.gateway_id else "")]
        if outcome.error:
            lines += ["Siteward: BOOT CONFIG PROBLEM:", *("  " + ln for ln in outcome.error.splitlines())]
        lines += [f"Siteward: warning: {w}" for w in outcome.warnings]
        for line in lines:
            self.say(line)
        # agetty prints /etc/issue.d/*.issue above the login prompt (\4 is the IPv4 address)
        issue = ["Siteward gateway: web UI at http://\\4:8080/", *lines[1:], ""]
        with contextlib.suppress(OSError):
            _write(self.paths.etc / "issue.d" / "siteward.issue", "\n".join(issue) + "\n", 0o644)


DEFAULT_MARKER = "# siteward-default-config"


def _is_default_config(path: Path) -> bool:
    try:
        return DEFAULT_MARKER in path.read_text(encoding="utf-8")
    except OSError:
        return False


def _configured_id(path: Path) -> str | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    value = data.get("gateway", {}).get("id")
    return value if isinstance(value, str) else None


def _default_gateway_id(etc: Path) -> str:
    try:
        mid = (etc / "machine-id").read_text().strip()
    except OSError:
        mid = ""
    suffix = mid[:8] if re.fullmatch(r"[0-9a-f]{32}", mid) else os.urandom(4).hex()
    return f"siteward-{suffix}"


def _validate_gateway_config(text: str, etc: Path) -> None:
    from gateway.settings import ConfigError, load_settings

    probe = etc / ".siteward.toml.check"
    probe.write_text(text, encoding="utf-8")
    try:
        # the environment's SITEWARD_* overrides are the unit's business, not the file's
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SITEWARD_")}
        try:
            load_settings(probe)
        finally:
            os.environ.update(saved)
    except ConfigError as exc:
        raise BootConfigError(f"the resulting gateway configuration is refused:\n{exc}") from None
    finally:
        probe.unlink()


def _overwrite_and_remove(path: Path) -> None:
    """Overwrite before unlinking: FAT keeps deleted clusters readable. (Flash wear levelling
    may still keep old blocks; docs/appliance.md says to rotate credentials if a card is lost.)"""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except FileNotFoundError:
        pass


def _chown_tree(path: Path, user: str) -> None:
    ids = _owner_ids(user)
    if ids is None or not path.exists():
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, *ids)


def read_status(path: Path = STATUS_PATH) -> dict[str, Any] | None:
    """What the last first-boot run decided, for the gateway's web UI and /healthz."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def setup_error(path: Path = STATUS_PATH) -> str | None:
    status = read_status(path)
    if status is None or not status.get("error"):
        return None
    return str(status["error"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.firstboot", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="act on a directory tree instead of / (testing)")
    ap.add_argument("--check", type=Path, metavar="FILE", help="only validate a siteward.toml and exit")
    args = ap.parse_args(argv)
    if args.check is not None:
        try:
            parse_boot_config(args.check.read_text(encoding="utf-8"), str(args.check))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{args.check}: {exc}", file=sys.stderr)
            return 1
        except BootConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.check}: ok")
        return 0
    paths = Paths.under(args.root) if args.root else Paths()
    run: Runner = run_command
    if args.root is not None:
        root = args.root.resolve()

        def run(argv: Sequence[str]) -> None:  # enable/disable inside the tree, never on this host
            run_command([argv[0], f"--root={root}", *argv[1:]])

    try:
        outcome = FirstBoot(paths, run=run, live=args.root is None).execute()
    except Exception as exc:  # the gateway still starts (it only Wants this unit); say why here
        print(f"siteward-firstboot: FAILED: {type(exc).__name__}: {exc}", flush=True)
        raise
    # a refused boot config is handled (setup mode), not a failure of this unit
    print(f"siteward-firstboot: {outcome.state}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
