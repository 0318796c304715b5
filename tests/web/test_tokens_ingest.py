"""Bearer tokens, and HTTP ingest (bearer only; bad input refused, counted, not stored)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.helpers import count_readings, rejected
from tests.web.conftest import Site

TELEMETRY = "/api/v1/devices/http-node/telemetry"


async def test_token_is_shown_once_stored_hashed_and_acts_as_its_user(site: Site) -> None:
    admin = await site.admin()
    r = await admin.post("/api/v1/tokens", {"name": "grafana"})
    assert r.status == 201
    token = r.json["token"]
    assert token.startswith("swt_") and r.json["name"] == "grafana" and r.json["username"] == "admin"
    rows = await site.gw.db.fetchall("SELECT token_hash FROM api_tokens")
    assert all(token not in row[0] for row in rows)
    listed = (await admin.get("/api/v1/tokens")).json["tokens"]
    assert [t["id"] for t in listed] == [r.json["id"]] and "token" not in listed[0]
    script = site.client(token=token)
    me = (await script.get("/api/v1/me")).json
    assert me["username"] == "admin" and me["auth"] == "token" and me["csrf_token"] is None
    entries = await site.audit("token.create")
    assert len(entries) == 1 and token not in str(entries)


async def test_wrong_and_malformed_tokens_are_401(site: Site) -> None:
    _, token = await site.token()
    for bad in (token[:-1] + ("A" if token[-1] != "A" else "B"), "swt_x", "", "a" * 5000):
        r = await site.client(token=bad or " ").get("/api/v1/devices")
        assert r.status == 401, bad[:20]


async def test_revoked_token_stops_working_at_once(site: Site) -> None:
    token_id, token = await site.token()
    script = site.client(token=token)
    assert (await script.get("/api/v1/devices")).status == 200
    admin = await site.admin()
    assert (await admin.call("DELETE", f"/api/v1/tokens/{token_id}")).status == 204
    r = await script.get("/api/v1/devices")
    assert r.status == 401 and r.json["error"] == "invalid_token"
    assert len(await site.audit("token.revoke")) == 1


async def test_disabling_or_deleting_the_owner_stops_the_token(site: Site) -> None:
    await site.user("tom", "technician")
    script = await site.script("tom")
    admin = await site.admin()
    assert (await script.get("/api/v1/devices")).status == 200
    assert (await admin.call("PATCH", "/api/v1/users/tom", json_body={"disabled": True})).status == 200
    assert (await script.get("/api/v1/devices")).status == 401
    assert (await admin.call("PATCH", "/api/v1/users/tom", json_body={"disabled": False})).status == 200
    assert (await script.get("/api/v1/devices")).status == 200
    assert (await admin.call("DELETE", "/api/v1/users/tom")).status == 204
    assert (await script.get("/api/v1/devices")).status == 401


async def test_users_manage_only_their_own_tokens(site: Site) -> None:
    tech = await site.user("tess", "technician")
    other_id, _ = await site.token("admin", "admins")
    assert (await tech.call("DELETE", f"/api/v1/tokens/{other_id}")).status == 404
    assert (await tech.post("/api/v1/tokens", {"name": "x", "username": "admin"})).status == 403
    assert (await tech.get("/api/v1/tokens?all=1")).status == 403
    r = await tech.post("/api/v1/tokens", {"name": "mine"})
    assert r.status == 201 and r.json["username"] == "tess"
    assert [t["name"] for t in (await tech.get("/api/v1/tokens")).json["tokens"]] == ["mine"]
    assert (await tech.call("DELETE", f"/api/v1/tokens/{r.json['id']}")).status == 204
    admin = await site.admin()
    assert {t["username"] for t in (await admin.get("/api/v1/tokens?all=1")).json["tokens"]} == {"admin"}


async def test_http_ingest_stores_and_answers_after_commit(site: Site) -> None:
    await site.user("tech", "technician")
    script = await site.script("tech")
    r = await script.post(TELEMETRY, {"temperature": 22.5, "humidity": 41, "ts": 1_700_000_000.0})
    assert r.status == 201
    assert r.json["stored"] == 2 and len(r.json["ids"]) == 2
    assert await count_readings(site.gw, "http-node") == 2  # 201 means committed


async def test_http_ingest_refuses_without_or_with_a_wrong_token_and_counts_it(site: Site) -> None:
    before = rejected(site.gw, "http_unauthorised")
    anon = site.client()
    r = await anon.post(TELEMETRY, {"temperature": 1})
    assert r.status == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    r = await site.client(token="swt_AAAAAAAAAAAA_" + "A" * 43).post(TELEMETRY, {"temperature": 1})
    assert r.status == 401
    # a browser session is not enough: this is a machine endpoint
    admin = await site.admin()
    r = await admin.post(TELEMETRY, {"temperature": 1})
    assert r.status == 401
    # a viewer's token may read but not write
    await site.user("vi", "viewer")
    viewer_script = await site.script("vi")
    r = await viewer_script.post(TELEMETRY, {"temperature": 1})
    assert r.status == 403
    assert rejected(site.gw, "http_unauthorised") == before + 4
    assert await count_readings(site.gw) == 0


async def test_http_ingest_bad_input(start_site: Any) -> None:
    async with start_site(broker={"max_payload_bytes": 1024}) as site:
        await site.user("tech", "technician")
        script = await site.script("tech")
        json_type = {"Content-Type": "application/json"}
        cases: list[tuple[bytes, int, str]] = [
            (b"{not json", 400, "bad_json"),
            (b"\xff\xfe\x00garbage\x81", 400, "bad_encoding"),
            (b'{"temperature": NaN}', 422, "not_finite"),
            (b'{"temperature": Infinity}', 422, "not_finite"),
            (b'{"temperature": "warm"}', 422, "non_numeric"),
            (b'{"temperature": {"a": 1}}', 422, "non_numeric"),
            (b"[1, 2, 3]", 400, "not_object"),
            (b'{"a":' * 50 + b"1" + b"}" * 50, 400, "too_deep"),
            (b"{}", 422, "no_values"),
            (b'{"temperature": 1, "ts": "yesterday"}', 422, "bad_timestamp"),
            (b'{"temperature": ' + b"1" * 2000 + b"}", 413, "too_large"),
        ]
        for body, status, reason in cases:
            before = rejected(site.gw, reason)
            r = await script.call("POST", TELEMETRY, data=body, headers=json_type)
            assert r.status == status, (body[:40], r)
            assert r.json["error"] == reason and r.json["detail"], body[:40]
            assert rejected(site.gw, reason) == before + 1, reason
        r = await script.call("POST", "/api/v1/devices/bad%20id/telemetry", data=b'{"t": 1}', headers=json_type)
        assert r.status == 400 and r.json["error"] == "bad_device_id"

        # too large without a Content-Length (chunked): refused while reading, not after
        async def chunks() -> Any:
            for _ in range(64):
                yield b" " * 64

        before = rejected(site.gw, "too_large")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                site.base + TELEMETRY, data=chunks(), headers={**json_type, "Authorization": f"Bearer {script.token}"}
            ) as resp,
        ):
            assert resp.status == 413
        assert rejected(site.gw, "too_large") == before + 1
        assert await count_readings(site.gw) == 0
        # and nothing else was disturbed: a good message still goes through
        r = await script.post(TELEMETRY, {"temperature": 20})
        assert r.status == 201


async def test_http_ingest_from_many_devices_in_parallel(site: Site) -> None:
    await site.user("tech", "technician")
    script = await site.script("tech")
    results = await asyncio.gather(
        *(script.post(f"/api/v1/devices/par-{i % 5}/telemetry", {"temperature": i}) for i in range(50))
    )
    assert [r.status for r in results] == [201] * 50
    assert await count_readings(site.gw) == 50


async def test_an_http_device_posts_with_its_own_secret_for_itself_only(site: Site) -> None:
    secret = await site.gw.credentials.mint("http-node")
    await site.gw.credentials.mint("other-node")
    device = site.client(token=secret)
    r = await device.post(TELEMETRY, {"temperature": 4.5})
    assert r.status == 201 and r.json["stored"] == 1
    # the same secret is worth nothing for another device or for anything else
    before = rejected(site.gw, "http_unauthorised")
    r = await device.post("/api/v1/devices/other-node/telemetry", {"temperature": 1})
    assert r.status == 401
    assert (await device.get("/api/v1/devices")).status == 401
    assert rejected(site.gw, "http_unauthorised") == before + 1
    assert await count_readings(site.gw, "http-node") == 1
    assert await count_readings(site.gw, "other-node") == 0
    # revoked: refused
    await site.gw.credentials.revoke("http-node")
    assert (await device.post(TELEMETRY, {"temperature": 5})).status == 401
