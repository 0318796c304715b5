"""From the validated settings to what the sync process needs: topics, TLS, client options.

File checks (CA, client certificate) happen here, when ``siteward sync`` starts, not
in the settings model: a missing cloud certificate must stop the uplink with a clear
line, never the gateway that shares the configuration file.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import CloudSection, Settings


class SyncConfigError(Exception):
    """One human line naming the key; ``siteward sync`` prints it and exits 2."""


@dataclass(frozen=True)
class Topics:
    readings: str  # may still hold "{lane}"
    events: str
    health: str
    status: str
    command_result: str
    command_filter: str  # ends with "/+"

    def readings_for(self, lane: str) -> str:
        return self.readings.replace("{lane}", lane)

    def command_id_of(self, topic: str) -> str | None:
        """The command id a downlink topic carries (its last level), if the topic is ours."""
        prefix = self.command_filter[:-1]
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix):]
        return rest if rest and "/" not in rest else None


def topics_of(settings: Settings) -> Topics:
    t = settings.cloud.templates
    values = {"prefix": settings.cloud.topic_prefix, "gateway": settings.gateway.id, "lane": "{lane}"}
    return Topics(
        readings=t.readings_topic.format(**values),
        events=t.events_topic.format(**values),
        health=t.health_topic.format(**values),
        status=t.status_topic.format(**values),
        command_result=t.command_result_topic.format(**values),
        command_filter=t.command_topic.format(**values),
    )


def _readable(key: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SyncConfigError(f"cloud.{key}: cannot read {path}: {exc.strerror or exc}") from None


def tls_context(cloud: CloudSection) -> ssl.SSLContext | None:
    if cloud.transport != "tls":
        return None
    if cloud.ca_file is not None:
        _readable("ca_file", cloud.ca_file)
    try:
        ctx = ssl.create_default_context(cafile=str(cloud.ca_file) if cloud.ca_file else None)
    except ssl.SSLError as exc:
        raise SyncConfigError(f"cloud.ca_file: not a usable CA certificate: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cloud.cert_file is not None and cloud.key_file is not None:
        _readable("cert_file", cloud.cert_file)
        _readable("key_file", cloud.key_file)
        try:
            ctx.load_cert_chain(str(cloud.cert_file), str(cloud.key_file))
        except (ssl.SSLError, ValueError) as exc:
            raise SyncConfigError(f"cloud.cert_file/key_file: not a matching certificate and key: {exc}") from None
    if cloud.tls_alpn:
        ctx.set_alpn_protocols(cloud.tls_alpn)
    return ctx


@dataclass(frozen=True)
class SyncConfig:
    gateway: str
    db_path: Path
    cloud: CloudSection
    topics: Topics
    client_id: str
    tls: ssl.SSLContext | None

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncConfig:
        c = settings.cloud
        return cls(
            gateway=settings.gateway.id,
            db_path=settings.db_path,
            cloud=c,
            topics=topics_of(settings),
            client_id=c.client_id or f"siteward-{settings.gateway.id}",
            tls=tls_context(c),
        )
