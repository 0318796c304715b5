"""The OpenAPI document: every API route described, the schemas the handlers validate with,
and a schemathesis run against the running gateway that finds no server error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from gateway.web.openapi import undescribed
from tests.ui.conftest import UiSite


def test_document_describes_every_api_route_from_the_handlers_models(ui: UiSite) -> None:
    r = ui.call("GET", "/api/v1/openapi.json")
    assert r.status == 200
    doc = r.json
    assert doc["openapi"].startswith("3.1") and doc["info"]["license"]["identifier"] == "Apache-2.0"
    assert undescribed(ui.gw._runner.app) == []
    paths = doc["paths"]
    # the same pydantic models the handlers parse with
    series = paths["/api/v1/devices/{device_id}/series"]["get"]
    names = {p["name"] for p in series["parameters"]}
    assert {"device_id", "metric", "since", "until", "points"} <= names
    points = next(p for p in series["parameters"] if p["name"] == "points")
    assert points["schema"]["maximum"] == 2000 and points["schema"]["minimum"] == 10
    ok = series["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert set(doc["components"]["schemas"][ok.rsplit("/", 1)[1]]["properties"]) >= {"t", "min", "max", "avg"}
    change = paths["/api/v1/devices/{device_id}"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"][change["$ref"].rsplit("/", 1)[1]]["additionalProperties"] is False
    # who may call what is part of the description
    assert paths["/api/v1/users"]["post"]["x-siteward-action"] == "users.admin"
    assert paths["/api/v1/devices/{device_id}/telemetry"]["post"]["security"] == [{"bearer": []}]
    assert paths["/healthz"]["get"]["security"] == []
    # pages are not API operations
    assert "/devices/{device_id}" not in paths and "/" not in paths


def test_schemathesis_finds_no_server_error(ui: UiSite, tmp_path: Any) -> None:
    # an admin token reaches every operation (a technician's would stop at 403 before any handler ran)
    token = ui.call("POST", "/api/v1/tokens", {"name": "schemathesis"}).json["token"]
    report = tmp_path / "st.json"
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{ui.base}/api/v1/openapi.json",
         "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {token}",
         "--max-examples", "4", "--phases", "examples,coverage,fuzzing", "--seed", "5",
         "--request-timeout", "20", "--generation-database", "none",
         # the live feed is a WebSocket; logout would end nothing for a token, but keep the run about data
         "--exclude-path", "/api/v1/live",
         "--report", "ndjson", "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert "Failures:" not in proc.stdout, tail
    tested = re.search(r"Tested: (\d+)", proc.stdout)
    assert tested and int(tested.group(1)) > 60, tail
    # it did call the API: operations were tested, not skipped for a broken document
    assert report.exists() and report.stat().st_size > 0
    assert any(json.loads(line).get("ScenarioFinished") or "ScenarioFinished" in line
               for line in report.read_text().splitlines() if line.strip())
