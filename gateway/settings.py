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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
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
    # /metrics without login, for a Prometheus scraper on the site LAN (the figures carry no
    # readings); false: it needs a bearer API token of any role (Prometheus' `authorization`)
    metrics_public: bool = True


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


_TOPIC_PLACEHOLDERS = frozenset({"prefix", "gateway"})
# "$name" values a payload template may use (cloud_sync.codec fills them in)
READING_PLACEHOLDERS = frozenset({"key", "id", "gateway", "device", "metric", "value", "unit", "ts", "ts_ms",
                                  "ts_iso", "flags", "source"})
ENVELOPE_PLACEHOLDERS = frozenset({"v", "type", "gateway", "seq", "lane", "first_id", "last_id", "count",
                                   "sent_at", "attempt", "readings"})


def _template_names(node: Any) -> set[str]:
    if isinstance(node, str):
        return {node[1:]} if node.startswith("$") else set()
    if isinstance(node, dict):
        return set().union(*(_template_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_template_names(v) for v in node)) if node else set()
    return set()


def _check_template(v: dict[str, Any] | None, allowed: frozenset[str], needs_one_of: set[str],
                    missing: str) -> dict[str, Any] | None:
    """``v`` unchanged if every ``$name`` in it is ``allowed`` and one of ``needs_one_of`` is there."""
    if v is None:
        return v
    names = _template_names(v)
    if names - allowed:
        raise ValueError(f"unknown placeholder(s) {sorted(names - allowed)}; allowed: {sorted(allowed)}")
    if not names & needs_one_of:
        raise ValueError(missing)
    return v


class CloudTemplates(_Section):
    """Topic and payload templates, so an existing cloud backend's format can be met.

    Topics may use ``{prefix}`` and ``{gateway}``; the readings topic also ``{lane}``.
    ``reading`` / ``readings_envelope`` are JSON objects whose string values ``"$name"``
    are replaced by the typed field (see docs/cloud-contract.md, "Templates"); left
    unset, the documented Siteward format is sent.
    """

    readings_topic: str = "{prefix}/{gateway}/up/readings"
    events_topic: str = "{prefix}/{gateway}/up/events"
    health_topic: str = "{prefix}/{gateway}/up/health"
    status_topic: str = "{prefix}/{gateway}/up/status"
    command_result_topic: str = "{prefix}/{gateway}/up/command_result"
    # subscription; the last topic level carries the command id
    command_topic: str = "{prefix}/{gateway}/down/command/+"
    reading: dict[str, Any] | None = None
    readings_envelope: dict[str, Any] | None = None

    @field_validator("readings_topic", "events_topic", "health_topic", "status_topic", "command_result_topic",
                     "command_topic")
    @classmethod
    def _topic(cls, v: str, info: Any) -> str:
        import string

        allowed = _TOPIC_PLACEHOLDERS | ({"lane"} if info.field_name == "readings_topic" else set())
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad template: {exc}") from None
        unknown = names - allowed
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if not v or "#" in v or (info.field_name != "command_topic" and "+" in v):
            raise ValueError("a publish topic may not contain wildcards")
        if info.field_name == "command_topic" and not v.endswith("/+"):
            raise ValueError("the command topic must end with '/+' (the command id level)")
        return v

    @field_validator("reading")
    @classmethod
    def _reading(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_template(v, READING_PLACEHOLDERS, {"key", "id"},
                               "a reading template must carry $key or $id: the cloud de-duplicates by it")

    @field_validator("readings_envelope")
    @classmethod
    def _envelope(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_template(v, ENVELOPE_PLACEHOLDERS, {"readings"},
                               "a readings envelope must place \"$readings\" somewhere")


class CloudSection(_Section):
    """The uplink (``siteward sync``): where the cloud broker is and how to talk to it."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(default=8883, ge=1, le=65535)
    # "tls" (server verified against ca_file or the system store) or plain "tcp" (development only)
    transport: Literal["tls", "tcp"] = "tls"
    ca_file: Path | None = None
    # client certificate and key: mutual TLS, the way AWS IoT Core authenticates things
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_alpn: list[str] = Field(default_factory=list)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")  # default siteward-<id>
    mqtt_version: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = Field(default=30, ge=1, le=1200)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # keep the broker-side session (queued downlink commands) across reconnects
    persistent_session: bool = True
    session_expiry_s: int = Field(default=86400, ge=0)
    topic_prefix: str = Field(default="siteward", pattern=r"^[^#+]{1,128}$")
    encoding: Literal["json", "json+zlib"] = "json"
    batch_max_readings: int = Field(default=1000, ge=1, le=100_000)
    # cap on one message's JSON text; 128 KiB is AWS IoT Core's message limit
    batch_max_bytes: int = Field(default=128 * 1024, ge=2048, le=256 * 1024 * 1024)
    # how long the live lane waits to fill a batch before sending it anyway
    batch_max_wait_ms: float = Field(default=100.0, ge=0, le=10_000)
    events_batch_max: int = Field(default=100, ge=1, le=10_000)
    # messages (and bytes) published and not yet acknowledged-and-recorded
    inflight_window: int = Field(default=16, ge=1, le=1000)
    inflight_max_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    # slots of the window the backlog may not take: events and live readings always find one
    live_reserved_slots: int = Field(default=2, ge=1, le=100)
    # how often the store is looked at for new readings/events
    poll_interval_ms: float = Field(default=50.0, ge=5, le=5000)
    # a PUBACK that does not come within this time means the link is dead (besides keepalive)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=60)
    backoff_max_s: float = Field(default=60.0, gt=0, le=60)
    # while the broker is unreachable, a TCP probe this often lets the drain start within seconds
    probe_interval_s: float = Field(default=1.0, gt=0, le=30)
    health_interval_s: float = Field(default=60.0, gt=0)
    status_interval_s: float = Field(default=2.0, gt=0, le=60)
    downlink: bool = True
    # None: any command name the device profile accepts; else only these
    downlink_commands: list[str] | None = None
    downlink_max_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)
    # the sync process's own Prometheus endpoint on localhost (None: off)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    templates: CloudTemplates = CloudTemplates()

    @model_validator(mode="after")
    def _consistent(self) -> CloudSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.transport == "tcp" and (self.cert_file or self.ca_file):
            raise ValueError("ca_file/cert_file need transport = \"tls\"")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        if self.live_reserved_slots >= self.inflight_window and self.inflight_window > 1:
            raise ValueError("live_reserved_slots must be smaller than inflight_window")
        return self


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
