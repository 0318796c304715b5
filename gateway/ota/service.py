"""The OTA service: signs manifests, sends them, follows each node to the end.

Composes the firmware registry and the campaigns; is composed once by ``gateway.app``.
It listens to OTA status messages through ingest's ``ota_observers`` (both the native
``devices/{id}/ota/status`` and the seed-style ``OTA/{id}/response`` arrive there) and
watches each node's reported firmware version in the device registry; one supervised
task ticks the campaigns (dispatch, timeouts, confirmation by version).

Download URLs carry a per-node token (HMAC of device, image and expiry under a secret
kept in ``<data_dir>/ota/download.key``), so a node needs nothing but the manifest to
fetch its image; a node may instead authenticate with HTTP Basic and its MQTT
credentials. Either way the image's integrity rests on the signed size and SHA-256.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloud_sync.contract import OTA_ROLLOUT_COMMAND
from firmware.tools import manifest as mf
from gateway.devices.commands import CommandFailed, LocalCommand
from gateway.ota.campaigns import (
    IN_FLIGHT,
    TERMINAL,
    Campaign,
    CampaignError,
    Campaigns,
    CampaignState,
    NodeRun,
    NodeState,
    Timeouts,
)
from gateway.ota.flashing import FlashJobs
from gateway.ota.registry import Firmware, FirmwareRefused, FirmwareRegistry

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from gateway.app import Gateway

log = structlog.get_logger(__name__)

MAX_CONCURRENT_LIMIT = 200
CLOUD_FETCH_TIMEOUT_S = 300.0

# words devices use for OTA states, native and seed-style alike
_STATE_WORDS = {
    "started": "STARTED", "start": "STARTED", "accepted": "STARTED",
    "in_progress": "IN_PROGRESS", "progress": "IN_PROGRESS", "downloading": "IN_PROGRESS",
    "writing": "IN_PROGRESS", "verifying": "IN_PROGRESS", "rebooting": "IN_PROGRESS",
    "success": "SUCCESS", "ok": "SUCCESS", "done": "SUCCESS", "updated": "SUCCESS",
    "failed": "FAILED", "fail": "FAILED", "error": "FAILED", "rolled_back": "FAILED", "rejected": "FAILED",
}


class OtaStatus(BaseModel):
    """An OTA status message, whatever the device's dialect (``state`` or ``status`` key)."""

    model_config = ConfigDict(extra="ignore")

    state: Literal["STARTED", "IN_PROGRESS", "SUCCESS", "FAILED"]
    progress: float | None = Field(default=None, ge=0, le=100)
    reason: str | None = Field(default=None, max_length=200)
    version: str | None = Field(default=None, max_length=32)
    phase: str | None = Field(default=None, max_length=32)
    campaign: str | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _dialects(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        d = dict(v)
        word = d.get("state", d.get("status"))
        if isinstance(word, str):
            d["state"] = _STATE_WORDS.get(word.strip().lower(), word.strip().upper())
            if word.strip().lower() in ("rebooting", "rolled_back") and "phase" not in d:
                d["phase"] = word.strip().lower()
        if "reason" not in d and isinstance(d.get("error"), str):
            d["reason"] = d["error"]
        return d

    @field_validator("progress")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and v != v:
            raise ValueError("progress must be a number")
        return v


class Target(BaseModel):
    """Which nodes a campaign covers: exactly one of device, devices, tag, model."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, max_length=64)
    devices: list[str] | None = Field(default=None, max_length=10_000)
    tag: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _one(self) -> Target:
        given = [k for k in ("device", "devices", "tag", "model") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of device, devices, tag, model")
        return self


class CampaignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    firmware: str = Field(min_length=8, max_length=96)  # sha256 (prefix) or project@version
    target: Target
    canary: int = Field(default=0, ge=0, le=1000)
    max_concurrent: int = Field(default=5, ge=1, le=MAX_CONCURRENT_LIMIT)
    max_failures: int = Field(default=0, ge=0)


class CloudRollout(BaseModel):
    """Args of the cloud's ``ota_rollout`` command (docs/cloud-contract.md): a signed manifest
    envelope, where to fetch the image, and the campaign's shape."""

    model_config = ConfigDict(extra="forbid")

    manifest: dict[str, Any]
    url: str = Field(pattern=r"^https?://", max_length=2048)
    target: Target | None = None
    canary: int = Field(default=0, ge=0, le=1000)
    max_concurrent: int = Field(default=5, ge=1, le=MAX_CONCURRENT_LIMIT)
    max_failures: int = Field(default=0, ge=0)


class OtaError(Exception):
    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def make_download_token(secret: bytes, device: str, sha256: str, expires: int) -> str:
    """The token in a node's download URL: HMAC-SHA256 over device, image and expiry, 144 bits."""
    mac = hmac.new(secret, f"{device}\n{sha256}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


class OtaService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.settings.ota
        data = gw.settings.data_dir
        self.dir = data / "ota"
        self.registry = FirmwareRegistry(gw.db, data / "firmware", max_bytes=int(self.cfg.max_image_mb * 1024 * 1024))
        self.campaigns = Campaigns(gw.db, Timeouts(self.cfg.start_timeout_s, self.cfg.progress_timeout_s,
                                                   self.cfg.confirm_timeout_s))
        self.key_path = self.cfg.signing_key or (self.dir / "signing.key")
        # read (or made) when first needed, see signing_key()
        self._key: Ed25519PrivateKey | None = None
        self._key_lock = asyncio.Lock()
        self._download_secret = b""
        self.trusted: list[Ed25519PublicKey] = [mf.load_public_b64(k) for k in self.cfg.trusted_keys]
        self._lock = asyncio.Lock()
        self.flash_jobs: FlashJobs | None = None
        self.counters = {"status_rejected": 0, "status_unexpected": 0, "downloads": 0, "download_refused": 0}

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # Only the key file's permissions are checked here (a key others can read still stops
        # the start): the key itself is read when first used, because reading it loads
        # cryptography, ~8 MB of RSS that a gateway not rolling out firmware need not hold.
        await asyncio.to_thread(mf.check_key_file, self.key_path)
        self._download_secret = await asyncio.to_thread(self._load_secret, self.dir / "download.key")
        await self.campaigns.load()
        self.flash_jobs = FlashJobs(self.gw)
        self.gw.ingest.ota_observers.append(self.on_status)
        self.gw.supervisor.start("ota.campaigns", self.run)
        self.gw.commander.register_local(self.gw.settings.gateway.id, OTA_ROLLOUT_COMMAND,
                                         LocalCommand(CloudRollout.model_validate, self._cloud_rollout))
        self.gw.health.register("ota", self.health)
        self.gw.metrics.ota_campaigns_open.set(len(self.campaigns.open))
        log.info("ota.ready", key=str(self.key_path), open_campaigns=len(self.campaigns.open))

    @staticmethod
    def _load_secret(path: Path) -> bytes:
        if path.exists():
            return path.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        return secret

    def health(self) -> dict[str, Any]:
        return {"ok": True, "open_campaigns": len(self.campaigns.open), **self.counters}

    async def signing_key(self) -> Ed25519PrivateKey:
        """The gateway's manifest signing key, read (or created, 0600) on first use."""
        if self._key is None:
            async with self._key_lock:  # one reader: two first uses must not create two keys
                if self._key is None:
                    key = await asyncio.to_thread(mf.load_or_create_key, self.key_path)
                    log.info("ota.signing_key", key_id=mf.key_id(key.public_key()))
                    self._key = key
        return self._key

    async def public_key(self) -> str:
        """The signing key's public half, base64 (what nodes are given as ``ota_keys``)."""
        return mf.public_b64((await self.signing_key()).public_key())

    async def public_keys(self) -> list[Ed25519PublicKey]:
        return [(await self.signing_key()).public_key(), *self.trusted]

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.cfg.tick_s)

    # -- firmware ----------------------------------------------------------------------------------
    async def upload(self, data: bytes, *, filename: str | None, actor: str,
                     envelope: str | None = None) -> tuple[Firmware, bool]:
        """Check and register an image; with ``envelope`` (a pre-signed manifest) it must match it."""
        expect = None
        if envelope is not None:
            m = await self._verify_envelope(envelope)
            if m.size != len(data) or m.sha256 != hashlib.sha256(data).hexdigest():
                raise FirmwareRefused("manifest_mismatch", "the image's size or SHA-256 differs from the signed "
                                      "manifest: not the file that was signed")
            expect = (m.project, m.version)
        fw, created = await self.registry.add(data, filename=filename, actor=actor,
                                              source="presigned" if envelope else "upload",
                                              envelope=envelope, expect=expect)
        if created:
            await self.gw.events.record("ota.firmware_added", None, {"sha256": fw.sha256, "project": fw.project,
                                                                     "version": fw.version, "kind": fw.kind})
        return fw, created

    async def _verify_envelope(self, text: str) -> mf.Manifest:
        try:
            env = mf.Envelope.model_validate_json(text)
        except ValidationError:
            raise FirmwareRefused("bad_envelope", "the manifest envelope is not valid JSON of the expected shape") \
                from None
        try:
            keys = await self.public_keys()
            return mf.verify(env, keys)
        except mf.ManifestError as exc:
            raise FirmwareRefused(exc.code, exc.message) from None

    # -- targets and campaigns -------------------------------------------------------------------------
    def _ota_capable(self, dev: Any) -> bool:
        prof = self.gw.profiles.get(dev.profile or "native")
        return prof is not None and prof.ota_topic is not None

    async def resolve(self, target: Target) -> list[str]:
        devices = await self.gw.registry.list_devices()
        by_id = {d.id: d for d in devices}
        if target.device is not None or target.devices is not None:
            wanted = [target.device] if target.device is not None else list(target.devices or [])
            missing = [d for d in wanted if d not in by_id]
            if missing:
                raise OtaError("unknown_device", f"no such device: {', '.join(missing[:10])}", 404)
            unable = [d for d in wanted if not self._ota_capable(by_id[d])]
            if unable:
                raise OtaError("not_ota_capable", f"profile has no OTA topic: {', '.join(unable[:10])}")
            return wanted
        out = []
        for d in devices:
            if not self._ota_capable(d) or d.state.value == "ignored":
                continue
            if target.tag is not None:
                if target.tag in d.tags:
                    out.append(d.id)
            elif target.model is not None and d.attributes.get("model") == target.model:
                out.append(d.id)
        return out

    async def create_campaign(self, req: CampaignRequest, *, actor: str) -> Campaign:
        fw = await self.registry.find(req.firmware)
        if fw is None:
            raise OtaError("unknown_firmware", f"no registered firmware {req.firmware!r}", 404)
        if fw.blocked:
            raise OtaError("firmware_blocked", f"{fw.project} {fw.version} is blocked: {fw.blocked_reason}", 409)
        devices = await self.resolve(req.target)
        async with self._lock:
            try:
                c = await self.campaigns.create(
                    firmware=fw.sha256, project=fw.project, version=fw.version, devices=devices,
                    target=req.target.model_dump(exclude_none=True), canary=req.canary,
                    max_concurrent=req.max_concurrent, max_failures=req.max_failures, actor=actor)
            except CampaignError as exc:
                raise OtaError(exc.code, exc.message, exc.status) from None
        await self.gw.events.record("ota.campaign", None, {"campaign": c.id, "state": "created",
                                                           "version": fw.version, "nodes": len(devices)})
        self._bus(c, None)
        await self.tick()
        return c

    async def control(self, campaign_id: str, action: Literal["pause", "resume", "abort"], *, actor: str) -> Campaign:
        async with self._lock:
            c = self.campaigns.open.get(campaign_id)
            if c is None:
                known = await self.campaigns.get(campaign_id)
                if known is None:
                    raise OtaError("unknown_campaign", "no such campaign", 404)
                raise OtaError("campaign_closed", f"campaign is {known.state.value}", 409)
            if action == "pause":
                if c.state is not CampaignState.RUNNING:
                    raise OtaError("not_running", f"campaign is {c.state.value}", 409)
                await self.campaigns.set_state(c, CampaignState.PAUSED, f"paused by {actor}")
            elif action == "resume":
                if c.state is not CampaignState.PAUSED:
                    raise OtaError("not_paused", f"campaign is {c.state.value}", 409)
                fw = await self.registry.get(c.firmware)
                if fw is not None and fw.blocked:
                    raise OtaError("firmware_blocked", f"{fw.version} is blocked: {fw.blocked_reason}", 409)
                await self.campaigns.set_state(c, CampaignState.RUNNING, None)
            else:
                await self.campaigns.set_state(c, CampaignState.ABORTED, f"aborted by {actor}")
        await self.gw.events.record("ota.campaign", None, {"campaign": c.id, "state": c.state.value,
                                                           "reason": c.reason})
        self._bus(c, None)
        if action == "resume":
            await self.tick()
        return c

    async def block(self, sha256: str, blocked: bool, reason: str | None, *, actor: str) -> Firmware:
        fw = await self.registry.set_blocked(sha256, blocked, reason)
        if fw is None:
            raise OtaError("unknown_firmware", "no such firmware", 404)
        if blocked:
            # a version found bad must not reach one more node
            for c in list(self.campaigns.open.values()):
                if c.firmware == sha256 and c.state is CampaignState.RUNNING:
                    async with self._lock:
                        await self.campaigns.set_state(c, CampaignState.PAUSED, f"firmware blocked: {reason}")
                    self._bus(c, None)
        return fw

    # -- the loop --------------------------------------------------------------------------------------
    async def tick(self) -> None:
        async with self._lock:
            now = time.time()
            for c in list(self.campaigns.open.values()):
                await self._confirm_by_version(c, now)
                for n, reason in await self.campaigns.check(c, now):
                    await self._finished(c, n, reason)
                if c.state is CampaignState.RUNNING:
                    await self._dispatch(c, now)
                    await self.campaigns.evaluate(c)

    async def _dispatch(self, c: Campaign, now: float) -> None:
        online = {d.id for d in await self.gw.registry.list_devices() if d.online}
        blocked = await self.registry.blocked_versions(c.project)
        if c.version in blocked:
            await self.campaigns.set_state(c, CampaignState.PAUSED, "firmware blocked")
            return
        for n in self.campaigns.due(c, online):
            dev = self.gw.registry.get_cached(n.device)
            current = dev.firmware if dev is not None else None
            n.from_version = current
            if current is not None and not mf.is_newer(c.version, current):
                await self.campaigns.transition(c, n, NodeState.SKIPPED,
                                                reason=f"already runs {current} (not older than {c.version})")
                await self._finished(c, n, n.reason)
                continue
            try:
                await self._send(c, n, dev)
            except Exception as exc:  # broker stopping, profile gone: the node stays pending
                log.warning("ota.send_failed", device=n.device, error=f"{type(exc).__name__}: {exc}")
                continue
            await self.campaigns.transition(c, n, NodeState.SENT, progress=0,
                                            deadline=self.campaigns.deadline_for(NodeState.SENT, now))
            self._bus(c, n)

    async def _send(self, c: Campaign, n: NodeRun, dev: Any) -> None:
        fw = await self.registry.get(c.firmware)
        assert fw is not None
        url = self.download_url(n.device, fw.sha256)
        presigned = await self.registry.envelope(fw.sha256)
        env = mf.Envelope.model_validate_json(presigned) if presigned is not None else None
        if env is not None and mf.Manifest.model_validate_json(env.manifest).device in (None, n.device):
            env.url, env.campaign = url, c.id
        else:
            m = mf.Manifest(type=fw.kind, project=fw.project, version=fw.version, size=fw.size, sha256=fw.sha256,
                            chip=fw.chip, device=n.device, issued=int(time.time()))
            env = mf.sign(m, await self.signing_key(), url=url, campaign=c.id)
        prof = self.gw.profiles.get((dev.profile if dev else None) or "native")
        topic = (prof.ota_topic if prof and prof.ota_topic else "devices/{device}/ota").replace("{device}", n.device)
        assert self.gw.broker is not None
        await self.gw.broker.publish(topic, env.model_dump_json(exclude_none=True).encode(), qos=1)
        log.info("ota.sent", device=n.device, campaign=c.id, version=c.version, topic=topic)

    async def _confirm_by_version(self, c: Campaign, now: float) -> None:
        """A node's health reports the firmware it booted: the target means success, the old
        version after a reboot means the bootloader rolled it back."""
        for n in c.nodes.values():
            if n.state not in IN_FLIGHT:
                continue
            dev = self.gw.registry.get_cached(n.device)
            if dev is None or dev.firmware is None:
                continue
            if dev.firmware == c.version and n.state is NodeState.REBOOTING:
                await self.campaigns.transition(c, n, NodeState.SUCCESS, progress=100,
                                                reason="confirmed by reported version")
                await self._finished(c, n, None)
            elif n.state is NodeState.REBOOTING and dev.firmware == n.from_version and self._rebooted_since(n):
                await self.campaigns.transition(c, n, NodeState.FAILED, reason=f"rolled back to {dev.firmware}")
                await self._finished(c, n, n.reason)

    def _rebooted_since(self, n: NodeRun) -> bool:
        up = self.gw.registry.latest(n.device).get("uptime")
        if not up:
            return False
        # uptime reported after the node said it was rebooting, and smaller than the time since
        return bool(up["ts"] > n.since and up["value"] < up["ts"] - n.since)

    async def _finished(self, c: Campaign, n: NodeRun, reason: str | None) -> None:
        self.gw.metrics.ota_node_results.labels(state=n.state.value).inc()
        await self.gw.events.record("ota.result", n.device, {"campaign": c.id, "version": c.version,
                                                             "state": n.state.value, "reason": reason})
        self._bus(c, n)

    def _bus(self, c: Campaign, n: NodeRun | None) -> None:
        self.gw.metrics.ota_campaigns_open.set(len(self.campaigns.open))
        ev: dict[str, Any] = {"type": "ota", "campaign": c.id, "campaign_state": c.state.value,
                              "counts": c.counts()}
        if n is not None:
            ev.update(device=n.device, state=n.state.value, progress=n.progress, reason=n.reason)
        self.gw.bus.publish(ev)

    # -- what nodes say --------------------------------------------------------------------------------
    async def on_status(self, device: str, raw: dict[str, Any]) -> None:
        # runs inside ingest, before the PUBACK: it must never raise
        try:
            await self._on_status(device, raw)
        except Exception:
            log.exception("ota.status_error", device=device)

    async def _on_status(self, device: str, raw: dict[str, Any]) -> None:
        try:
            st = OtaStatus.model_validate(raw)
        except ValidationError as exc:
            self.counters["status_rejected"] += 1
            self.gw.metrics.rejected.labels(reason="ota_status_invalid").inc()
            log.warning("ota.status_invalid", device=device, problem=exc.errors()[0]["msg"])
            return
        async with self._lock:
            hit = self.campaigns.campaign_of(device)
            if hit is None or (st.campaign is not None and st.campaign != hit[0].id):
                self.counters["status_unexpected"] += 1
                self.gw.metrics.rejected.labels(reason="ota_status_unexpected").inc()
                log.info("ota.status_unexpected", device=device, state=st.state)
                return
            c, n = hit
            now = time.time()
            if n.state is NodeState.PENDING:
                # a status for a manifest this campaign never sent (a replay, another tool)
                self.counters["status_unexpected"] += 1
                return
            if st.state == "STARTED":
                await self.campaigns.transition(c, n, NodeState.STARTED, progress=0,
                                                deadline=self.campaigns.deadline_for(NodeState.STARTED, now))
            elif st.state == "IN_PROGRESS":
                rebooting = st.phase == "rebooting" or (st.progress is not None and st.progress >= 100)
                state = NodeState.REBOOTING if rebooting else NodeState.IN_PROGRESS
                if n.state is NodeState.REBOOTING and not rebooting:
                    return  # a late progress message must not undo "rebooting"
                await self.campaigns.transition(c, n, state, progress=st.progress if st.progress is not None
                                                else n.progress, deadline=self.campaigns.deadline_for(state, now))
            elif st.state == "SUCCESS":
                if st.version is not None and st.version != c.version:
                    await self.campaigns.transition(c, n, NodeState.FAILED,
                                                    reason=f"reported success but runs {st.version} (rolled back)")
                else:
                    await self.campaigns.transition(c, n, NodeState.SUCCESS, progress=100)
            else:
                await self.campaigns.transition(c, n, NodeState.FAILED, reason=(st.reason or "failed")[:200])
            if n.state in TERMINAL:
                await self._finished(c, n, n.reason)
                await self.campaigns.evaluate(c)
            else:
                self._bus(c, n)

    # -- downloads ----------------------------------------------------------------------------------------
    def download_token(self, device: str, sha256: str, expires: int) -> str:
        return make_download_token(self._download_secret, device, sha256, expires)

    def download_url(self, device: str, sha256: str) -> str:
        exp = int(time.time() + self.cfg.download_token_ttl_s)
        path = f"/ota/v1/images/{sha256}.bin?device={device}&exp={exp}&token={self.download_token(device, sha256, exp)}"
        return (self.cfg.base_url or "") + path

    def check_download(self, sha256: str, device: str | None, exp: str | None, token: str | None,
                       basic: tuple[str, str] | None) -> str:
        """The device allowed to download, or OtaError(401/403)."""
        if basic is not None:
            login = self.gw.credentials.verify(*basic)
            if login is None:
                raise OtaError("unauthorised", "bad node credentials", 401)
            return login.device_id
        if not (device and exp and token and exp.isdigit()):
            raise OtaError("unauthorised", "a download needs the token from the manifest URL (or node credentials)",
                           401)
        if not hmac.compare_digest(self.download_token(device, sha256, int(exp)), token):
            raise OtaError("forbidden", "download token does not match", 403)
        if int(exp) < time.time():
            raise OtaError("forbidden", "download token expired", 403)
        return device

    # -- cloud-initiated rollout -------------------------------------------------------------------------------
    async def _cloud_rollout(self, req: CloudRollout) -> dict[str, Any]:
        """The ``ota_rollout`` command from the cloud (queued by the sync, run by the commander)."""
        try:
            c = await self.rollout_from_cloud(req.manifest, req.url, target=req.target, canary=req.canary,
                                              max_concurrent=req.max_concurrent, max_failures=req.max_failures)
        except OtaError as exc:
            raise CommandFailed({"error": {"code": exc.code, "message": exc.message}}) from None
        return {"campaign": c.id, "firmware": c.firmware, "project": c.project, "version": c.version,
                "target": c.target, "nodes": len(c.nodes), "state": c.state.value}

    async def rollout_from_cloud(self, envelope: str | dict[str, Any], url: str, *, target: Target | None = None,
                                 canary: int = 0, max_concurrent: int = 5, max_failures: int = 0,
                                 actor: str = "cloud") -> Campaign:
        """Entry point for the cloud downlink: a signed manifest and where to fetch the image.

        The manifest must verify with a trusted release key (or the gateway's own); the image
        is fetched (streamed, bounded by the signed size), checked against the signed size and
        SHA-256 and as an ESP32 image, registered, and rolled out to ``target`` (default: every
        node of the manifest's project, or the one device it names).
        """
        import aiohttp

        text = envelope if isinstance(envelope, str) else mf.Envelope.model_validate(envelope).model_dump_json(
            exclude_none=True)
        try:
            m = await self._verify_envelope(text)
        except FirmwareRefused as exc:
            raise OtaError(exc.code, exc.message) from None
        if not url.startswith(("https://", "http://")):
            raise OtaError("bad_url", "image URL must be http(s)")
        buf = bytearray()
        digest = hashlib.sha256()
        try:
            timeout = aiohttp.ClientTimeout(total=CLOUD_FETCH_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
                if r.status != 200:
                    raise OtaError("fetch_failed", f"image download answered HTTP {r.status}", 502)
                async for chunk in r.content.iter_chunked(64 * 1024):
                    buf += chunk
                    digest.update(chunk)
                    if len(buf) > m.size:
                        raise OtaError("size_mismatch", f"image is larger than the signed {m.size} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OtaError("fetch_failed", f"image download failed: {type(exc).__name__}: {exc}", 502) from None
        if len(buf) != m.size or digest.hexdigest() != m.sha256:
            raise OtaError("sha256_mismatch", "downloaded image does not match the signed size and SHA-256")
        # only a model-wide manifest may be relayed as-is to many nodes; one naming a device
        # is for that device alone
        try:
            fw, _ = await self.upload(bytes(buf), filename=url.rsplit("/", 1)[-1][:128], actor=actor, envelope=text)
        except FirmwareRefused as exc:
            raise OtaError(exc.code, exc.message, exc.status) from None
        if target is None:
            target = Target(device=m.device) if m.device else Target(model=m.project)
        return await self.create_campaign(CampaignRequest(firmware=fw.sha256, target=target, canary=canary,
                                                          max_concurrent=max_concurrent, max_failures=max_failures),
                                          actor=actor)
