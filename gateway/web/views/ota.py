"""Firmware and rollouts: upload/list/block images, campaigns, node downloads, USB flash jobs.

Node downloads (``/ota/v1/images/{sha256}.bin``) are not user requests: they carry the
per-node token from the signed manifest's URL, or HTTP Basic with the node's MQTT
credentials, and support ``Range`` so an interrupted download resumes where it stopped.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Literal

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field

from gateway.ota.campaigns import Campaign
from gateway.ota.flashing import list_ports
from gateway.ota.registry import FirmwareRefused
from gateway.ota.service import CampaignRequest, OtaError
from gateway.web.access import principal_of, public, requires
from gateway.web.bodies import json_ok, parse_body
from gateway.web.errors import ApiError, not_found
from gateway.web.keys import GATEWAY

routes = web.RouteTableDef()

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PORT_RE = re.compile(r"^(/dev/[A-Za-z0-9_./-]{1,64}|socket://[0-9A-Za-z.:-]{1,64}|rfc2217://[0-9A-Za-z.:-]{1,64})$")
MAX_ENVELOPE = 4096


class BlockBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=200)


class FlashBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: str = Field(pattern=_PORT_RE.pattern)
    firmware: str = Field(min_length=8, max_length=96)
    erase: bool = False


def _ota(request: web.Request) -> Any:
    return request.app[GATEWAY].ota


def _err(exc: OtaError | FirmwareRefused) -> ApiError:
    status = getattr(exc, "status", 422)
    return ApiError(status, exc.code, exc.message)


async def _audit(request: web.Request, action: str, target: str | None, detail: dict[str, Any]) -> None:
    p = principal_of(request)
    await request.app[GATEWAY].audit.record(p.username, action, target, {**p.via, **detail})


# -- firmware ---------------------------------------------------------------------------------------

@routes.get("/api/v1/ota/firmware")
@requires("ota.read")
async def list_firmware(request: web.Request) -> web.Response:
    fws = await _ota(request).registry.list()
    return json_ok({"firmware": [f.model_dump(mode="json") for f in fws]})


@routes.get("/api/v1/ota/key")
@requires("ota.read")
async def signing_key(request: web.Request) -> web.Response:
    ota = _ota(request)
    return json_ok({"public_key": await ota.public_key(), "algorithm": "ed25519",
                    "trusted_release_keys": list(request.app[GATEWAY].settings.ota.trusted_keys)})


async def _read_upload(request: web.Request, limit: int) -> tuple[bytes, str | None, str | None]:
    """(image, filename, pre-signed envelope) from a multipart form or a raw body."""
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        data, filename, envelope = None, None, None
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file":
                filename = part.filename
                buf = bytearray()
                while chunk := await part.read_chunk(64 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise ApiError(413, "too_large", f"image is larger than {limit} bytes")
                data = bytes(buf)
            elif part.name == "envelope":
                raw = await part.read(decode=False)
                if len(raw) > MAX_ENVELOPE:
                    raise ApiError(413, "too_large", "envelope too large")
                envelope = raw.decode("utf-8", "replace").strip() or None
        if data is None:
            raise ApiError(400, "invalid_request", "the form needs a 'file' field")
        return data, filename, envelope
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "too_large", f"image is larger than {limit} bytes")
    envelope = request.headers.get("X-Siteward-Manifest")
    return bytes(buf), request.query.get("filename"), envelope


@routes.post("/api/v1/ota/firmware")
@requires("ota.write")
async def upload(request: web.Request) -> web.Response:
    ota = _ota(request)
    data, filename, envelope = await _read_upload(request, ota.registry.max_bytes)
    if not data:
        raise ApiError(400, "empty", "no image in the request")
    try:
        fw, created = await ota.upload(data, filename=filename, actor=principal_of(request).username,
                                       envelope=envelope)
    except FirmwareRefused as exc:
        await _audit(request, "ota.firmware_refused", None, {"reason": exc.code, "filename": filename})
        raise _err(exc) from None
    if created:
        await _audit(request, "ota.firmware_upload", fw.sha256, {"project": fw.project, "version": fw.version,
                                                                 "presigned": fw.presigned})
    return json_ok(fw, status=201 if created else 200)


async def _firmware(request: web.Request) -> Any:
    sha = request.match_info["sha256"]
    fw = await _ota(request).registry.find(sha) if len(sha) <= 96 else None
    if fw is None:
        raise not_found("no such firmware")
    return fw


@routes.get("/api/v1/ota/firmware/{sha256}")
@requires("ota.read")
async def get_firmware(request: web.Request) -> web.Response:
    return json_ok(await _firmware(request))


@routes.post("/api/v1/ota/firmware/{sha256}/block")
@requires("ota.write")
async def block(request: web.Request) -> web.Response:
    body = await parse_body(request, BlockBody)
    fw = await _firmware(request)
    fw = await _ota(request).block(fw.sha256, True, body.reason, actor=principal_of(request).username)
    await _audit(request, "ota.firmware_block", fw.sha256, {"version": fw.version, "reason": body.reason})
    return json_ok(fw)


@routes.post("/api/v1/ota/firmware/{sha256}/unblock")
@requires("ota.write")
async def unblock(request: web.Request) -> web.Response:
    fw = await _firmware(request)
    fw = await _ota(request).block(fw.sha256, False, None, actor=principal_of(request).username)
    await _audit(request, "ota.firmware_unblock", fw.sha256, {"version": fw.version})
    return json_ok(fw)


# -- campaigns ------------------------------------------------------------------------------------------

@routes.get("/api/v1/ota/campaigns")
@requires("ota.read")
async def list_campaigns(request: web.Request) -> web.Response:
    return json_ok({"campaigns": await _ota(request).campaigns.list()})


@routes.post("/api/v1/ota/campaigns")
@requires("ota.write")
async def create_campaign(request: web.Request) -> web.Response:
    req = await parse_body(request, CampaignRequest)
    try:
        c: Campaign = await _ota(request).create_campaign(req, actor=principal_of(request).username)
    except OtaError as exc:
        raise _err(exc) from None
    await _audit(request, "ota.campaign_create", c.id, {"firmware": c.firmware, "version": c.version,
                                                        "target": c.target, "nodes": len(c.nodes),
                                                        "canary": c.canary, "max_concurrent": c.max_concurrent,
                                                        "max_failures": c.max_failures})
    return json_ok(c.detail(), status=201, headers={"Location": f"/api/v1/ota/campaigns/{c.id}"})


@routes.get("/api/v1/ota/campaigns/{campaign_id}")
@requires("ota.read")
async def get_campaign(request: web.Request) -> web.Response:
    cid = request.match_info["campaign_id"]
    c = await _ota(request).campaigns.get(cid) if len(cid) <= 64 else None
    if c is None:
        raise not_found("no such campaign")
    return json_ok(c.detail())


@routes.get("/api/v1/ota/campaigns/{campaign_id}/history")
@requires("ota.read")
async def campaign_history(request: web.Request) -> web.Response:
    cid = request.match_info["campaign_id"]
    if len(cid) > 64 or await _ota(request).campaigns.get(cid) is None:
        raise not_found("no such campaign")
    return json_ok({"campaign": cid, "history": await _ota(request).campaigns.history(cid)})


async def _control(request: web.Request, action: Literal["pause", "resume", "abort"]) -> web.Response:
    cid = request.match_info["campaign_id"]
    try:
        c = await _ota(request).control(cid[:64], action, actor=principal_of(request).username)
    except OtaError as exc:
        raise _err(exc) from None
    await _audit(request, f"ota.campaign_{action}", c.id, {"state": c.state.value})
    return json_ok(c.detail())


@routes.post("/api/v1/ota/campaigns/{campaign_id}/pause")
@requires("ota.write")
async def pause(request: web.Request) -> web.Response:
    return await _control(request, "pause")


@routes.post("/api/v1/ota/campaigns/{campaign_id}/resume")
@requires("ota.write")
async def resume(request: web.Request) -> web.Response:
    return await _control(request, "resume")


@routes.post("/api/v1/ota/campaigns/{campaign_id}/abort")
@requires("ota.write")
async def abort(request: web.Request) -> web.Response:
    return await _control(request, "abort")


# -- node downloads ----------------------------------------------------------------------------------------

def _basic(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(401, "unauthorised", "malformed Basic credentials") from None
    return user, password


@routes.get("/ota/v1/images/{name}")
@public()
async def download(request: web.Request) -> web.StreamResponse:
    ota = _ota(request)
    name = request.match_info["name"]
    sha = name[:-4] if name.endswith(".bin") else name
    if not _SHA_RE.match(sha):
        raise not_found("no such image")
    q = request.query
    try:
        device = ota.check_download(sha, q.get("device"), q.get("exp"), q.get("token"), _basic(request))
    except OtaError as exc:
        ota.counters["download_refused"] += 1
        request.app[GATEWAY].metrics.ota_downloads.labels(outcome="refused").inc()
        raise ApiError(exc.status, exc.code, exc.message,
                       headers={"WWW-Authenticate": 'Basic realm="siteward-ota"'} if exc.status == 401 else None
                       ) from None
    fw = await ota.registry.get(sha)
    path = ota.registry.path(sha)
    if fw is None or not path.exists():
        raise not_found("no such image")
    if fw.blocked:
        request.app[GATEWAY].metrics.ota_downloads.labels(outcome="blocked").inc()
        raise ApiError(410, "firmware_blocked", f"{fw.version} is blocked: {fw.blocked_reason}")
    ota.counters["downloads"] += 1
    request.app[GATEWAY].metrics.ota_downloads.labels(outcome="served").inc()
    # FileResponse answers Range (206) and If-Range itself, and sends with sendfile()
    resp = web.FileResponse(path, chunk_size=64 * 1024)
    resp.headers["Content-Type"] = "application/octet-stream"
    resp.headers["X-Siteward-Device"] = device
    return resp


# -- USB flashing -------------------------------------------------------------------------------------------

@routes.get("/api/v1/ota/ports")
@requires("ota.flash")
async def ports(request: web.Request) -> web.Response:
    import asyncio

    return json_ok({"ports": await asyncio.to_thread(list_ports)})


async def _flash_file_upload(request: web.Request, limit: int) -> tuple[FlashBody, bytes, str]:
    """A multipart flash request: fields port, erase, and the file itself (e.g. a merged
    full-flash image for a new board, which the OTA registry rightly refuses)."""
    reader = await request.multipart()
    fields: dict[str, str] = {}
    data, name = None, "upload.bin"
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "file":
            name = (part.filename or name)[-128:]
            buf = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                buf += chunk
                if len(buf) > limit:
                    raise ApiError(413, "too_large", f"file is larger than {limit} bytes")
            data = bytes(buf)
        elif part.name in ("port", "erase"):
            fields[part.name] = (await part.text())[:200]
    if not data:
        raise ApiError(400, "invalid_request", "the form needs a 'file' field")
    erase = fields.get("erase", "").lower() in ("1", "true", "on", "yes")
    try:
        body = FlashBody(port=fields.get("port", ""), firmware="uploaded-file", erase=erase)
    except ValueError:
        raise ApiError(400, "invalid_request", [{"field": "port", "problem": "not a serial port"}]) from None
    return body, data, name


@routes.post("/api/v1/ota/flash")
@requires("ota.flash")
async def start_flash(request: web.Request) -> web.Response:
    import asyncio
    import hashlib

    ota = _ota(request)
    if request.content_type == "multipart/form-data":
        body, data, name = await _flash_file_upload(request, 16 * 1024 * 1024)
        sha = hashlib.sha256(data).hexdigest()
        path = request.app[GATEWAY].settings.data_dir / "flash-uploads" / f"{sha}.bin"
        await asyncio.to_thread(_save, path, data)
        what: dict[str, Any] = {"file": name, "sha256": sha}
    else:
        body = await parse_body(request, FlashBody)
        fw = await ota.registry.find(body.firmware)
        if fw is None:
            raise not_found("no such firmware")
        path, sha = ota.registry.path(fw.sha256), fw.sha256
        what = {"firmware": fw.sha256, "version": fw.version}
    jobs = ota.flash_jobs
    running = jobs.busy(body.port)
    if running is not None:
        raise ApiError(409, "port_busy", f"{body.port} is being flashed by job {running.id}")
    job = jobs.start(port=body.port, path=path, firmware=sha, erase=body.erase, actor=principal_of(request).username)
    await _audit(request, "ota.flash", body.port, {"job": job.id, **what, "erase": body.erase})
    return json_ok(jobs.as_dict(job), status=202, headers={"Location": f"/api/v1/ota/flash/{job.id}"})


def _save(path: Any, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@routes.get("/api/v1/ota/flash/{job_id}")
@requires("ota.flash")
async def flash_job(request: web.Request) -> web.Response:
    jobs = _ota(request).flash_jobs
    job = jobs.jobs.get(request.match_info["job_id"])
    if job is None:
        raise not_found("no such flash job")
    return json_ok(jobs.as_dict(job))


__all__ = ["routes"]
