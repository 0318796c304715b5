"""The rules API through a real aiohttp server: roles, validation errors, config read-only, audit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app import Gateway
from tests.web.conftest import Site

CONFIG_RULES = {
    "groups": {"freezers": ["fr-1"]},
    "threshold": [{"id": "freezer-warm", "target": {"tag": "freezers"}, "metric": "temperature", "above": -15}],
    "schedule": [{"id": "lights", "target": {"device": "relay-1"}, "events": [{"at": "07:00", "state": "on"}]}],
}


@pytest.fixture
async def site(make_settings) -> AsyncIterator[Site]:
    async with Gateway(make_settings(rules=CONFIG_RULES)) as gw:
        s = Site(gw)
        try:
            yield s
        finally:
            await s.close()


def fields(resp: Any) -> dict[str, str]:
    assert resp.status == 400, resp
    return {d["field"]: d["problem"] for d in resp.json["detail"]}


RULE = {"kind": "threshold", "id": "cellar-damp", "target": {"device": "c-1"}, "metric": "humidity", "above": 80,
        "hysteresis": 5, "for_s": "10m"}


async def test_viewer_reads_technician_changes(site: Site) -> None:
    viewer = await site.user("vic", "viewer")
    tech = await site.user("tess", "technician")
    assert (await viewer.get("/api/v1/rules")).status == 200
    assert (await viewer.get("/api/v1/alerts")).status == 200
    assert (await viewer.get("/api/v1/schedules")).status == 200
    for method, path, body in [("POST", "/api/v1/rules", RULE), ("DELETE", "/api/v1/rules/freezer-warm", None),
                               ("POST", "/api/v1/schedules/lights/override", {"state": "on"}),
                               ("PUT", "/api/v1/rule-groups/cellar", {"devices": ["c-1"]}),
                               ("POST", "/api/v1/alerts/1/ack", None)]:
        r = await viewer.call(method, path, json_body=body)
        assert r.status == 403 and r.json["error"] == "forbidden", (method, path, r)
    r = await tech.post("/api/v1/rules", RULE)
    assert r.status == 201 and r.json["for_s"] == 600 and r.headers["Location"] == "/api/v1/rules/cellar-damp"
    # the same machinery as every other change: no CSRF token, no change
    r = await tech.post("/api/v1/rules", {**RULE, "id": "other"}, csrf=False)
    assert r.status == 403 and r.json["error"] == "csrf"


async def test_bad_rules_are_refused_with_the_field_named_and_seen_metrics_accepted(site: Site) -> None:
    tech = await site.user("tess", "technician")
    r = await tech.post("/api/v1/rules", {**RULE, "metric": "humdity"})
    assert "unknown metric 'humdity'" in fields(r)["metric"]
    assert "never above 100" in fields(await tech.post("/api/v1/rules", {**RULE, "above": 120}))["above"]
    assert "kind must be one of" in fields(await tech.post("/api/v1/rules", {**RULE, "kind": "vibes"}))["kind"]
    r = await tech.call("PUT", "/api/v1/rules/other-id", json_body=RULE)
    assert fields(r)["id"] == "must match the id in the path"
    bad_sched = {"id": "pump", "target": {"device": "p-1"}, "events": [{"cron": "0 7 * * 8", "state": "on"}]}
    assert "day-of-week: 8 is out of range 0-7" in fields(await tech.post("/api/v1/schedules", bad_sched))[
        "events.0.cron"]
    # a metric outside the catalogue is fine once a device has sent it
    await site.gw.ingest.ingest_http("tank-1", b'{"brine_temp": -4}')
    r = await tech.post("/api/v1/rules", {**RULE, "id": "brine", "metric": "brine_temp", "above": -2, "hysteresis": 0})
    assert r.status == 201, r


async def test_rule_lifecycle_config_rules_are_read_only_and_changes_are_audited(site: Site) -> None:
    tech = await site.user("tess", "technician")
    listed = {r["id"]: r for r in (await tech.get("/api/v1/rules")).json["rules"]}
    assert listed["freezer-warm"]["source"] == "config"
    r = await tech.call("PUT", "/api/v1/rules/freezer-warm", json_body={**RULE, "id": "freezer-warm"})
    assert r.status == 409 and "config file" in r.json["detail"]
    assert (await tech.call("DELETE", "/api/v1/rules/freezer-warm")).status == 409
    assert (await tech.post("/api/v1/rules", {**RULE, "id": "freezer-warm"})).status == 409
    assert (await tech.post("/api/v1/rules", RULE)).status == 201
    assert (await tech.post("/api/v1/rules", RULE)).status == 409
    r = await tech.call("PUT", "/api/v1/rules/cellar-damp", json_body={**RULE, "above": 85})
    assert r.status == 200 and r.json["above"] == 85
    got = (await tech.get("/api/v1/rules/cellar-damp")).json
    assert got["source"] == "api" and got["updated_by"] == "tess"
    assert (await tech.call("DELETE", "/api/v1/rules/cellar-damp")).status == 204
    assert (await tech.get("/api/v1/rules/cellar-damp")).status == 404
    trail = [(e["actor"], e["action"], e["target"]) for e in reversed(await site.audit("rule.*"))]
    assert trail == [("tess", "rule.create", "cellar-damp"), ("tess", "rule.update", "cellar-damp"),
                     ("tess", "rule.delete", "cellar-damp")]


async def test_alerts_are_listed_and_acknowledged_by_name(site: Site) -> None:
    tech = await site.user("tess", "technician")
    await site.gw.ingest.ingest_http("fr-1", b'{"temperature": -5}')
    await site.gw.rules.settle()
    alerts = (await tech.get("/api/v1/alerts?state=open")).json["alerts"]
    assert [(a["rule_id"], a["device"], a["state"]) for a in alerts] == [("freezer-warm", "fr-1", "active")]
    aid = alerts[0]["id"]
    r = await tech.post(f"/api/v1/alerts/{aid}/ack")
    assert r.status == 200 and r.json["state"] == "acknowledged" and r.json["acked_by"] == "tess"
    r = await tech.post(f"/api/v1/alerts/{aid}/ack")
    assert r.status == 409 and "already acknowledged by tess" in r.json["detail"]
    assert (await tech.post("/api/v1/alerts/999/ack")).status == 404
    detail = (await tech.get(f"/api/v1/alerts/{aid}")).json
    assert detail["acked_by"] == "tess" and detail["automation_runs"] == []
    ev = (await site.gw.events.query(kind="alert.acknowledged"))[0]
    assert ev.data["by"] == "tess"
    assert [e["action"] for e in await site.audit("alert.acknowledge")] == ["alert.acknowledge"]
    await site.gw.ingest.ingest_http("fr-1", b'{"temperature": -20}')
    await site.gw.rules.settle()
    assert (await tech.get("/api/v1/alerts?state=cleared")).json["alerts"][0]["id"] == aid
    r = await tech.post(f"/api/v1/alerts/{aid}/ack")
    assert r.status == 409 and "cleared" in r.json["detail"]


async def test_schedules_groups_and_override(site: Site) -> None:
    tech = await site.user("tess", "technician")
    body = {"id": "pump", "target": {"tag": "pumps"}, "events": [{"at": "06:00", "days": "mon-fri", "state": "on"},
                                                                 {"at": "18:30", "state": "off"}]}
    r = await tech.post("/api/v1/schedules", body)
    assert r.status == 201 and r.json["status"]["next"], r
    assert (await tech.call("PUT", "/api/v1/rule-groups/pumps", json_body={"devices": ["p-1", "p-2"]})).status == 200
    r = await tech.call("PUT", "/api/v1/rule-groups/freezers", json_body={"devices": []})
    assert r.status == 409
    groups = {g["name"]: g for g in (await tech.get("/api/v1/rule-groups")).json["groups"]}
    assert groups["pumps"]["devices"] == ["p-1", "p-2"] and groups["freezers"]["source"] == "config"
    r = await tech.post("/api/v1/schedules/pump/override", {"state": "off", "for_s": "2h"})
    assert r.status == 200 and r.json["override"]["state"] == "off" and r.json["override"]["by"] == "tess"
    await site.gw.rules.settle()
    runs = (await tech.get("/api/v1/automation-runs?origin=schedule&origin_id=pump")).json["runs"]
    # the group's devices have never been seen: the commands are refused, and say so
    assert sorted((r["device"], r["state"]) for r in runs) == [("p-1", "refused"), ("p-2", "refused")]
    r = await tech.call("DELETE", "/api/v1/schedules/pump/override")
    assert r.status == 200 and r.json["override"] is None
    assert (await tech.call("DELETE", "/api/v1/schedules/pump/override")).status == 404
    r = await tech.post("/api/v1/schedules/pump/override", {"until": "2001-01-01T00:00:00Z"})
    assert r.status == 409 and "future" in r.json["detail"]
    assert (await tech.call("DELETE", "/api/v1/schedules/lights")).status == 409
    assert (await tech.call("DELETE", "/api/v1/schedules/pump")).status == 204
    actions = [e["action"] for e in reversed(await site.audit())]
    for expected in ("schedule.create", "rule_group.put", "schedule.override", "schedule.override_cancel",
                     "schedule.delete"):
        assert expected in actions
