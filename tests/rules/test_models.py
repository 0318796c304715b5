"""Rule and schedule formats: what is refused, and that every refusal names its field."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from gateway.ingest.profiles import load_profiles
from gateway.rules.cron import CronError, daily, parse_cron
from gateway.rules.models import METRIC_LIMITS, RulesConfig, Schedule, UnknownKind, parse_rule
from gateway.settings import ConfigError, load_settings


def errors(fn) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as exc:
        fn()
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.value.errors()]


def rule(**kw):
    return {"kind": "threshold", "id": "r1", "target": {"device": "fr-1"}, "metric": "temperature", **kw}


@pytest.mark.parametrize(("body", "field", "words"), [
    (rule(metric="tempp", above=5), "metric", "unknown metric 'tempp'"),
    (rule(metric="humidity", above=100), "above", "humidity is never above 100"),
    (rule(metric="humidity", below=0), "below", "humidity is never below 0"),
    (rule(metric="battery", below=150), "below", "always be below"),
    (rule(metric="temperature", below=-300), "below", "never below -273.15"),
    (rule(metric="battery", above=5, hysteresis=10), "hysteresis", "could never clear"),
    (rule(above=5, hysteresis=-1), "hysteresis", "greater than or equal to 0"),
    (rule(above=5, for_s="soon"), "for_s", "not a duration"),
    (rule(above=5, for_s=-3), "for_s", "greater than or equal to 0"),
    (rule(above="NaN"), "above", "finite"),
    (rule(above=5, target={"device": "a", "tag": "b"}), "target", "exactly one"),
    (rule(above=5, target={}), "target", "exactly one"),
    (rule(above=5, severity="panic"), "severity", "'info', 'warning' or 'critical'"),
    (rule(above=5, colour="red"), "colour", "Extra inputs"),
    (rule(above=5, actions=[{"command": "Relay Off"}]), "actions.0.command", "pattern"),
    ({"kind": "disk", "id": "d", "actions": [{"command": "relay"}]}, "actions", "actions.0.device is required"),
    ({"kind": "disk", "id": "d", "free_below_percent": 99, "hysteresis": 5}, "hysteresis", "never clear"),
    ({"kind": "battery", "id": "b", "target": {"all": True}, "below": 0}, "below", "never below 0"),
])
def test_bad_rules_are_refused_naming_the_field(body, field, words) -> None:
    errs = errors(lambda: parse_rule(body, metrics=set()))
    assert any(f == field and words in msg for f, msg in errs), errs


def test_both_or_neither_level_is_refused() -> None:
    assert errors(lambda: parse_rule(rule(above=1, below=2), metrics=set()))[0][1].endswith(
        "give exactly one of 'above' or 'below'")
    assert errors(lambda: parse_rule(rule(), metrics=set()))


def test_unknown_kind() -> None:
    with pytest.raises(UnknownKind, match="kind must be one of threshold"):
        parse_rule({"kind": "whatever"}, metrics=set())


def test_metrics_seen_or_declared_are_accepted_and_stored_rules_skip_the_check() -> None:
    assert parse_rule(rule(metric="brine_temp", above=1), metrics={"brine_temp"}).metric == "brine_temp"
    assert parse_rule(rule(metric="brine_temp", above=1), metrics=None).metric == "brine_temp"


def test_durations_read_like_a_person_writes_them() -> None:
    assert parse_rule(rule(above=1, for_s="1h30m"), metrics=set()).for_s == 5400
    assert parse_rule(rule(above=1, for_s="90s"), metrics=set()).for_s == 90
    assert parse_rule(rule(above=1, for_s=12.5), metrics=set()).for_s == 12.5


@pytest.mark.parametrize(("event", "field", "words"), [
    ({"at": "24:00", "state": "on"}, "events.0.at", "hour 24 is out of range 0-23"),
    ({"at": "07:60", "state": "on"}, "events.0.at", "minute 60 is out of range 0-59"),
    ({"at": "7h", "state": "on"}, "events.0.at", "not a time of day"),
    ({"at": "07:00", "days": "mon-fri,9", "state": "on"}, "events.0.days", "day-of-week: 9 is out of range 0-7"),
    ({"at": "07:00", "days": "fri-mon", "state": "on"}, "events.0.days", "runs backwards"),
    ({"cron": "61 * * * *", "state": "on"}, "events.0.cron", "minute: 61 is out of range 0-59"),
    ({"cron": "0 7 32 * *", "state": "on"}, "events.0.cron", "day-of-month: 32 is out of range 1-31"),
    ({"cron": "0 7 * 13 *", "state": "on"}, "events.0.cron", "month: 13 is out of range 1-12"),
    ({"cron": "0 7 * *", "state": "on"}, "events.0.cron", "cron needs 5 fields"),
    ({"cron": "0 0 30 feb *", "state": "on"}, "events.0.cron", "never happens"),
    ({"at": "07:00"}, "events.0", "give 'state'"),
    ({"at": "07:00", "cron": "0 7 * * *", "state": "on"}, "events.0", "exactly one of 'at'"),
])
def test_bad_schedules_are_refused_naming_the_field(event, field, words) -> None:
    errs = errors(lambda: Schedule.model_validate({"id": "s", "target": {"device": "r"}, "events": [event]}))
    assert any(f == field and words in msg for f, msg in errs), errs


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "siteward.toml"
    cfg.write_text("""
[rules]
known_metrics = ["brine_temp"]
[[rules.threshold]]
id = "brine"
target = { all = true }
metric = "brine_temp"
below = -3
[[rules.threshold]]
id = "typo"
target = { all = true }
metric = "tempertaure"
above = 5
[[rules.schedule]]
id = "lights"
target = { device = "relay-1" }
events = [{ at = "07:00", state = "on" }, { cron = "0 25 * * *", state = "off" }]
""")
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    text = str(exc.value)
    assert "'rules.threshold.1.metric'" in text and "unknown metric 'tempertaure'" in text
    assert "'rules.schedule.0.events.1.cron'" in text and "hour: 25 is out of range 0-23" in text
    assert "brine" not in text  # the rule with a declared metric is fine


def test_config_rule_ids_are_unique_across_kinds() -> None:
    with pytest.raises(ValidationError, match=r"offline\.0\.id: rule id 'x' is already used by threshold\.0"):
        RulesConfig.model_validate({
            "threshold": [{"id": "x", "target": {"all": True}, "metric": "temperature", "above": 1}],
            "offline": [{"id": "x", "target": {"all": True}}]})


def test_every_metric_a_shipped_profile_declares_is_in_the_catalogue() -> None:
    declared = set()
    for p in load_profiles().profiles.values():
        for r in p.routes:
            declared |= set(r.units) | {f.metric for f in r.fields.values()}
    assert declared <= set(METRIC_LIMITS)


# -- cron ------------------------------------------------------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_next_and_previous_across_both_dst_changes() -> None:
    spec = daily("02:30")
    # spring forward: 02:30 does not exist; it comes at 03:30 CEST = 01:30 UTC
    assert spec.next_after(utc("2024-03-30T12:00"), BERLIN) == utc("2024-03-31T01:30")
    # fall back: 02:30 happens twice; the first (CEST) is the one
    assert spec.next_after(utc("2024-10-26T12:00"), BERLIN) == utc("2024-10-27T00:30")
    assert spec.next_after(utc("2024-10-27T00:30"), BERLIN) == utc("2024-10-28T01:30")
    assert spec.last_at_or_before(utc("2024-10-27T01:45"), BERLIN) == utc("2024-10-27T00:30")


def test_cron_fields() -> None:
    spec = parse_cron("*/15 6-8 * * 1-5")
    assert spec.minutes == (0, 15, 30, 45) and spec.hours == (6, 7, 8)
    assert spec.dows == frozenset({1, 2, 3, 4, 5})
    assert parse_cron("0 0 * * 7").dows == frozenset({0})  # 7 is Sunday too
    # day of month and day of week both given: either matches, as in cron
    either = parse_cron("0 12 1 * mon")
    assert either.day_matches(datetime(2024, 6, 1).date()) and either.day_matches(datetime(2024, 6, 3).date())
    with pytest.raises(CronError, match="step"):
        parse_cron("*/0 * * * *")
