"""Devices, readings, commands, health and metrics through the HTTP API."""

from __future__ import annotations

import time
from typing import Any

from tests.web.conftest import Site


async def _tech_script(site: Site) -> Any:
    await site.user("tech", "technician")
    return await site.script("tech")


async def _post_readings(site: Site, device: str, body: dict[str, Any]) -> Any:
    script = await _tech_script(site)
    r = await script.post(f"/api/v1/devices/{device}/telemetry", body)
    assert r.status == 201, r
    return r.json


async def test_healthz_reports_every_component(site: Site) -> None:
    r = await site.client().get("/healthz")
    assert r.status == 200
    body = r.json
    assert body["status"] == "ok" and body["gateway"] == "gw-test" and body["setup_required"] is False
    assert {"store", "broker", "clock", "disk"} <= set(body["components"])
    assert all(c["ok"] is True for c in body["components"].values())
    assert "uptime_s" in body and "version" in body


async def test_healthz_is_503_when_a_component_fails(site: Site) -> None:
    site.gw.health.register("probe", lambda: {"ok": False, "error": "broken on purpose"})
    r = await site.client().get("/healthz")
    assert r.status == 503 and r.json["status"] == "degraded"
    assert r.json["components"]["probe"] == {"ok": False, "error": "broken on purpose"}


async def test_metrics_is_prometheus_text(site: Site) -> None:
    r = await site.client().get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert "siteward_readings_stored_total" in r.text and "siteward_rejected" in r.text


async def test_metrics_can_be_closed_to_all_but_api_tokens(start_site: Any) -> None:
    async with start_site(web={"metrics_public": False}) as site:
        anon = await site.client().get("/metrics")
        assert anon.status == 401 and "Bearer" in anon.headers["WWW-Authenticate"]
        assert (await site.client(token="not-a-token").get("/metrics")).status == 401
        await site.user("watcher", "viewer")
        scraper = await site.script("watcher")  # a viewer's API token, as Prometheus would send it
        r = await scraper.get("/metrics")
        assert r.status == 200 and "siteward_readings_stored_total" in r.text
        assert (await site.client().get("/healthz")).status == 200  # health stays open


async def test_devices_list_detail_and_latest_values(site: Site) -> None:
    await _post_readings(site, "node-1", {"temperature": 21.5, "humidity": 40})
    admin = await site.admin()
    devices = (await admin.get("/api/v1/devices")).json["devices"]
    assert [d["id"] for d in devices] == ["node-1"]
    d = devices[0]
    assert d["online"] is True and d["latest"]["temperature"]["value"] == 21.5
    assert d["latest"]["temperature"]["unit"] == "°C"
    detail = (await admin.get("/api/v1/devices/node-1")).json
    assert detail["metrics"] == ["humidity", "temperature"] and detail["latest"]["humidity"]["value"] == 40
    assert (await admin.get("/api/v1/devices/nope")).status == 404
    assert (await admin.get("/api/v1/devices/bad%20id")).json["error"] == "not_found"


async def test_readings_history_with_validated_parameters(site: Site) -> None:
    now = time.time()
    script = await _tech_script(site)
    for i in range(5):
        r = await script.post("/api/v1/devices/node-1/telemetry", {"temperature": 20 + i, "ts": now - 50 + i * 10})
        assert r.status == 201
    admin = await site.admin()
    base = "/api/v1/devices/node-1/readings"
    all_ = (await admin.get(base)).json
    assert all_["count"] == 5 and all_["truncated"] is False
    assert [x["value"] for x in all_["readings"]] == [24, 23, 22, 21, 20]  # newest first
    some = (await admin.get(f"{base}?metric=temperature&since={now - 35}&until={now - 15}")).json
    assert [x["value"] for x in some["readings"]] == [23, 22]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 35)) + "Z"
    assert (await admin.get(f"{base}?since={iso}")).json["count"] == 3
    limited = (await admin.get(f"{base}?limit=2")).json
    assert limited["count"] == 2 and limited["truncated"] is True
    for bad in (
        "limit=0",
        "limit=100001",
        "limit=x",
        "since=yesterday",
        "metric=no%20spaces",
        f"since={now}&until={now - 10}",
        "bogus=1",
        "limit=1&limit=2",
        "since=nan",
    ):
        r = await admin.get(f"{base}?{bad}")
        assert r.status == 400, (bad, r)
        assert r.json["error"] == "invalid_query" and r.json["detail"], bad
    assert (await admin.get("/api/v1/devices/nope/readings")).status == 404


async def test_tags_set_through_the_api_are_what_rules_and_campaigns_target(site: Site) -> None:
    from gateway.rules.models import Target

    for dev in ("node-1", "node-2"):
        await site.gw.registry.ensure(dev, profile="native")
    await site.user("tech", "technician")
    tech = site.client()
    assert (await tech.login("tech", "another fine password")).status == 200
    r = await tech.call("PATCH", "/api/v1/devices/node-1", json_body={"tags": "boiler, floor-1 ,boiler"})
    assert r.status == 200 and r.json["attributes"]["tags"] == ["boiler", "floor-1"]
    r = await tech.call("PATCH", "/api/v1/devices/node-2", json_body={"tags": ["floor-1"]})
    assert r.status == 200
    assert await site.gw.rules.targets.members(Target(tag="boiler")) == ["node-1"]
    assert sorted(await site.gw.rules.targets.members(Target(tag="floor-1"))) == ["node-1", "node-2"]
    for bad in ({"tags": "has space"}, {"tags": ["x" * 40]}, {"tags": [f"t{i}" for i in range(40)]}):
        assert (await tech.call("PATCH", "/api/v1/devices/node-1", json_body=bad)).status == 400, bad
    # [] clears; the tags survive a restart of the registry (they are stored, not cached)
    assert (await tech.call("PATCH", "/api/v1/devices/node-2", json_body={"tags": []})).json["attributes"] == {}
    stored = await site.gw.db.fetchone("SELECT attributes FROM devices WHERE id = 'node-1'")
    assert stored is not None and '"boiler"' in stored[0]
    assert await site.gw.rules.targets.members(Target(tag="floor-1")) == ["node-1"]
    # tags the node reports itself are kept apart: neither side overwrites the other
    await site.gw.registry.apply_attributes("node-1", {"tags": ["cellar"]})
    dev = await tech.get("/api/v1/devices/node-1")
    assert dev.json["attributes"]["tags"] == ["boiler", "floor-1"]
    assert dev.json["attributes"]["node_tags"] == ["cellar"]
    device = await site.gw.registry.get("node-1")
    assert device is not None and device.tags == {"boiler", "floor-1", "cellar"}
    assert (await tech.call("PATCH", "/api/v1/devices/node-1", json_body={"tags": ["boiler"]})).status == 200
    assert await site.gw.rules.targets.members(Target(tag="cellar")) == ["node-1"]
    assert await site.gw.rules.targets.members(Target(tag="floor-1")) == []
    assert (await tech.get("/api/v1/devices/node-1")).json["attributes"]["node_tags"] == ["cellar"]


async def test_technician_changes_devices_and_each_change_is_audited(site: Site) -> None:
    await _post_readings(site, "node-1", {"temperature": 21.5})
    tech = site.client()
    assert (await tech.login("tech", "another fine password")).status == 200
    r = await tech.call("PATCH", "/api/v1/devices/node-1", json_body={"name": "Boiler room", "location": "B1"})
    assert r.status == 200 and r.json["name"] == "Boiler room" and r.json["location"] == "B1"
    r = await tech.call("PATCH", "/api/v1/devices/node-1", json_body={"name": "x" * 500})
    assert r.status == 400
    r = await tech.call("PATCH", "/api/v1/devices/node-1", json_body={"firmware": "9.9"})
    assert r.status == 400  # not a field technicians set
    assert (await tech.post("/api/v1/devices/node-1/ignore")).json["state"] == "ignored"
    assert (await tech.post("/api/v1/devices/node-1/adopt")).json["state"] == "adopted"
    assert (await tech.call("DELETE", "/api/v1/devices/node-1")).status == 204
    assert (await tech.get("/api/v1/devices/node-1")).status == 404
    assert (await tech.call("DELETE", "/api/v1/devices/node-1")).status == 404
    actions = [(e["action"], e["actor"], e["target"]) for e in reversed(await site.audit("device.*"))]
    assert actions == [
        ("device.update", "tech", "node-1"),
        ("device.ignore", "tech", "node-1"),
        ("device.adopt", "tech", "node-1"),
        ("device.remove", "tech", "node-1"),
    ]


async def test_provisioning_mints_credentials_once_and_revokes(site: Site) -> None:
    admin = await site.admin()
    r = await admin.post("/api/v1/devices", {"id": "esp-7", "profiles": ["native"]})
    assert r.status == 201
    secret = r.json["mqtt"]["password"]
    assert r.json["mqtt"]["username"] == "esp-7" and len(secret) >= 20
    assert r.json["device"]["state"] == "adopted"
    assert site.gw.credentials.verify("esp-7", secret) is not None
    detail = (await admin.get("/api/v1/devices/esp-7")).json
    assert detail["credentials"] is True and secret not in str(detail)
    entries = await site.audit("device.credentials_minted")
    assert len(entries) == 1 and secret not in str(entries)
    for bad in ({"id": "no spaces"}, {"id": "x", "profiles": ["nope"]}, {"id": "x", "profiles": []}, {}):
        assert (await admin.post("/api/v1/devices", bad)).status == 400, bad
    assert (await admin.post("/api/v1/devices/esp-7/credentials/revoke")).status == 204
    assert site.gw.credentials.verify("esp-7", secret) is None
    assert (await admin.post("/api/v1/devices/never/credentials/revoke")).status == 404
    assert len(await site.audit("device.credentials_revoked")) == 1


async def test_commands_send_get_and_list(site: Site) -> None:
    admin = await site.admin()
    await admin.post("/api/v1/devices", {"id": "relay-1"})
    r = await admin.post("/api/v1/devices/relay-1/commands", {"command": "relay", "args": {"state": "on"}})
    assert r.status == 202, r
    cmd = r.json
    assert cmd["state"] == "sent" and cmd["device"] == "relay-1" and r.headers["Location"].endswith(cmd["id"])
    assert (await admin.get(f"/api/v1/commands/{cmd['id']}")).json["id"] == cmd["id"]
    listed = (await admin.get("/api/v1/devices/relay-1/commands")).json["commands"]
    assert [c["id"] for c in listed] == [cmd["id"]]
    assert (await admin.get("/api/v1/commands/nope")).status == 404
    bad = await admin.post("/api/v1/devices/relay-1/commands", {"command": "Relay!"})
    assert bad.status == 400
    assert (await admin.post("/api/v1/devices/nope/commands", {"command": "relay"})).status == 404
    await admin.post("/api/v1/devices/relay-1/ignore")
    refused = await admin.post("/api/v1/devices/relay-1/commands", {"command": "relay"})
    assert refused.status == 409 and refused.json["error"] == "command_refused"
    entries = await site.audit("command.send")
    assert len(entries) == 1 and entries[0]["detail"]["command_id"] == cmd["id"]


async def test_index_page_lists_devices_with_values_escaped(site: Site) -> None:
    await _post_readings(site, "node-1", {"temperature": 21.456789})
    admin = await site.admin()
    await admin.call("PATCH", "/api/v1/devices/node-1", json_body={"name": "<script>alert(1)</script>"})
    page = await admin.get("/devices", headers={"Accept": "text/html"})
    assert page.status == 200
    assert 'data-device="node-1"' in page.text and 'data-metric="temperature"' in page.text
    assert ">21.457<" in page.text and "°C" in page.text
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'name="csrf" value="' in page.text  # the logout form


async def test_api_errors_share_one_shape(site: Site) -> None:
    admin = await site.admin()
    for r in (
        await admin.get("/api/v1/nowhere"),
        await admin.call("PUT", "/api/v1/devices"),
        await admin.call("POST", "/api/v1/users", data=b"[1, 2", headers={"Content-Type": "application/json"}),
        await admin.post("/api/v1/users", [1, 2]),
        await admin.post("/api/v1/users", {"username": "x"}),
    ):
        assert r.status in (400, 404, 405), r
        assert r.headers["Content-Type"].startswith("application/json")
        assert isinstance(r.json["error"], str)
