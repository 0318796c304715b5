"""The one validated settings object.

Configuration comes from one TOML file plus ``SITEWARD_*`` environment overrides
(``SITEWARD_BROKER__PORT=1884`` sets ``[broker] port``). Every module receives the
part of :class:`Settings` it needs; nothing else reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.rules.models import RulesConfig

ENV_PREFIX = "SITEWARD_"
CONFIG_ENV = "SITEWARD_CONFIG"
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("siteward_toml", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    id: str = Field(default="gw-dev", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    name: str = "Siteward gateway"
    data_dir: Path = Path("./var")
    timezone: str = "UTC"


class BrokerSection(_Section):
    # "embedded" runs amqtt in-process; "external" subscribes to a mosquitto the site runs
    # (mosquitto then acknowledges before Siteward has stored: see docs/broker.md).
    mode: Literal["embedded", "external"] = "embedded"
    host: str = "0.0.0.0"
    port: int = Field(default=1883, ge=0, le=65535)
    tls_port: int | None = Field(default=None, ge=0, le=65535)
    allow_anonymous: bool = False
    max_payload_bytes: int = Field(default=64 * 1024, ge=64, le=16 * 1024 * 1024)
    max_json_depth: int = Field(default=8, ge=1, le=64)
    keepalive_grace: float = Field(default=1.5, ge=1.0, le=5.0)
    max_keepalive_s: int = Field(default=600, ge=0)
    max_queued_messages: int = Field(default=1000, ge=1)
    max_inflight_messages: int = Field(default=20, ge=1, le=65535)
    max_inbound_inflight: int = Field(default=64, ge=1)
    session_expiry_s: int = Field(default=3600, ge=0)
    rate_limit_per_s: float = Field(default=200.0, gt=0)
    rate_limit_burst: int = Field(default=400, ge=1)
    retry_interval_s: float = Field(default=20.0, gt=0)
    # external mode only
    external_host: str = "127.0.0.1"
    external_port: int = Field(default=1883, ge=1, le=65535)
    external_username: str | None = None
    external_password: SecretStr | None = None


class StoreSection(_Section):
    path: Path | None = None  # default: <data_dir>/siteward.db
    commit_interval_ms: float = Field(default=20.0, ge=0, le=1000)
    max_batch: int = Field(default=5000, ge=1)
    retention_days: float = Field(default=30.0, gt=0)
    quota_mb: float = Field(default=2048.0, gt=0)
    # what to do when the quota is reached: drop the oldest *unsynced* readings (counted) or
    # refuse new readings (counted) so nothing already stored is ever lost.
    quota_policy: Literal["drop_oldest", "refuse_new"] = "drop_oldest"
    maintenance_interval_s: float = Field(default=60.0, gt=0)


class DevicesSection(_Section):
    require_adoption: bool = False
    offline_after_s: float = Field(default=180.0, gt=0)
    command_timeout_s: float = Field(default=30.0, gt=0)
    last_seen_flush_s: float = Field(default=10.0, gt=0)


class TimeSection(_Section):
    max_future_skew_s: float = Field(default=300.0, ge=0)
    max_age_s: float = Field(default=7 * 86400.0, ge=0)
    check_interval_s: float = Field(default=5.0, gt=0)
    # where the gateway learns whether its clock is synchronised: the kernel (adjtimex), or
    # fixed values for development and tests.
    source: Literal["kernel", "assume_synced", "assume_unsynced"] = "kernel"


class WebSection(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    admin_password: SecretStr | None = None
    admin_password_hash: str | None = None
    session_ttl_s: int = Field(default=8 * 3600, ge=60)
    login_attempts_per_minute: int = Field(default=5, ge=1)
    tls: bool = False


class SimulateSection(_Section):
    nodes: int = Field(default=0, ge=0, le=10000)
    interval_s: float = Field(default=2.0, gt=0)


class BleSection(_Section):
    """Bluetooth LE sensors (gateway/ble, docs/ble.md)."""

    # "auto": scan if BlueZ has an adapter, else report BLE unavailable and run without it;
    # "on": the same, but a missing adapter makes /healthz degraded; "off": no BLE at all.
    enabled: Literal["auto", "on", "off"] = "auto"
    adapter: str = Field(default="auto", pattern=r"^(auto|hci[0-9]{1,2})$")
    # "auto": passive (BlueZ AdvertisementMonitor) where offered, else active
    scan_mode: Literal["auto", "passive", "active"] = "auto"
    # "sensors": adopt every sensor that decodes to measurements; "all": beacons too
    auto_adopt: Literal["off", "sensors", "all"] = "off"
    store_interval_s: float = Field(default=60.0, ge=0)
    # change (absolute, per metric) that is stored at once; other metrics: relative_threshold
    thresholds: dict[str, float] = Field(default_factory=dict)
    relative_threshold: float = Field(default=0.05, ge=0)
    nearby_max: int = Field(default=1000, ge=10, le=100_000)
    nearby_expiry_s: float = Field(default=600.0, gt=0)
    watchdog_silence_s: float = Field(default=120.0, ge=5)
    watchdog_check_s: float = Field(default=5.0, gt=0)
    adapter_poll_s: float = Field(default=5.0, gt=0)
    # development run without an adapter: simulated sensors fed to the same decoders
    simulate_beacons: int = Field(default=6, ge=0, le=10_000)
    simulate_interval_s: float = Field(default=2.0, gt=0)


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ProfilesSection(_Section):
    # extra directories of *.toml compatibility profiles, read after the shipped ones
    dirs: list[Path] = Field(default_factory=list)
    enabled: list[str] | None = None  # None: every profile found


class CloudSection(_Section):
    enabled: bool = False
    host: str = "localhost"
    port: int = Field(default=8883, ge=1, le=65535)


class OtaSection(_Section):
    """Firmware updates (docs/firmware.md)."""

    # the gateway's Ed25519 signing key (PKCS#8 PEM, 0600); default <data_dir>/ota/signing.key,
    # created on first start
    signing_key: Path | None = None
    # base64 Ed25519 public keys of release pipelines whose pre-signed manifests are accepted
    trusted_keys: list[str] = Field(default_factory=list)
    # how nodes reach the gateway's HTTP server ("http://192.168.1.2:8080"); unset: download URLs
    # are relative and each node resolves them against the gateway host in its own config
    base_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+$")
    max_image_mb: float = Field(default=8.0, gt=0, le=16)
    start_timeout_s: float = Field(default=120.0, gt=0)
    progress_timeout_s: float = Field(default=180.0, gt=0)
    confirm_timeout_s: float = Field(default=600.0, gt=0)
    download_token_ttl_s: float = Field(default=7 * 86400.0, gt=0)
    tick_s: float = Field(default=1.0, gt=0, le=60)
    # how to run esptool (GPL: always a separate program); unset: this Python's "-m esptool"
    esptool: list[str] | None = None


class RulesSection(RulesConfig):
    """``[rules]``: local alerts, automations and schedules; the format is in docs/rules.md."""


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    gateway: GatewaySection = GatewaySection()
    broker: BrokerSection = BrokerSection()
    store: StoreSection = StoreSection()
    devices: DevicesSection = DevicesSection()
    time: TimeSection = TimeSection()
    web: WebSection = WebSection()
    simulate: SimulateSection = SimulateSection()
    logging: LoggingSection = LoggingSection()
    profiles: ProfilesSection = ProfilesSection()
    cloud: CloudSection = CloudSection()
    ota: OtaSection = OtaSection()
    ble: BleSection = BleSection()
    rules: RulesSection = RulesSection()

    @field_validator("gateway")
    @classmethod
    def _tz_exists(cls, v: GatewaySection) -> GatewaySection:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v.timezone!r}") from exc
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, _toml_data.get() or {}))

    # -- derived paths -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.gateway.data_dir

    @property
    def db_path(self) -> Path:
        return self.store.path or (self.gateway.data_dir / "siteward.db")


class ConfigError(Exception):
    """Raised with one human line per bad key; the CLI prints it and exits 2."""


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: bad value for '{key}': {err['msg']}{shown}")
    return "\n".join(lines)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply ``SITEWARD_*`` overrides, validate.

    ``path`` defaults to ``$SITEWARD_CONFIG``; with neither, defaults apply, so that
    ``siteward run`` works with no file at all.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "environment"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: configuration file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    token = _toml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    finally:
        _toml_data.reset(token)
