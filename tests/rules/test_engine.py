"""Alert rules decided by the engine, through the real ingest path and a real SQLite file."""

from __future__ import annotations

import pytest

from gateway.models import Source
from gateway.rules.engine import GatewayFacts
from tests.rules.conftest import threshold


async def test_flapping_input_raises_one_alert_and_hysteresis_decides_the_clear(open_site) -> None:
    async with open_site(threshold=[threshold(above=5, hysteresis=1)]) as site:
        # around the limit, never below the clear level (4): one alert, however often it flaps
        for v in (3, 6, 4.5, 7, 4.2, 5.5, 4.9, 6):
            await site.send("fr-1", temperature=v)
        alerts = await site.alerts()
        assert [(a.state, a.value) for a in alerts] == [("active", 6.0)]
        await site.send("fr-1", temperature=4.0)
        alerts = await site.alerts()
        assert [(a.state, a.clear_value) for a in alerts] == [("cleared", 4.0)]
        assert alerts[0].clear_reason == "temperature back to 4"
        assert len(await site.events_of("alert.raised")) == 1
        assert len(await site.events_of("alert.cleared")) == 1
        # and a new excursion is a new alert
        await site.send("fr-1", temperature=8)
        assert [a.state for a in await site.alerts()] == ["active", "cleared"]


async def test_threshold_must_hold_for_its_duration_measured_by_the_readings(open_site, clock) -> None:
    async with open_site(threshold=[threshold(above=5, for_s=300)]) as site:
        await site.send("fr-1", temperature=6)
        clock.advance(200)
        await site.send("fr-1", temperature=7)
        assert await site.alerts() == []
        clock.advance(50)
        await site.send("fr-1", temperature=4)  # back inside: the count starts again
        clock.advance(100)
        await site.send("fr-1", temperature=6)
        clock.advance(299)
        await site.send("fr-1", temperature=6.5)
        assert await site.alerts() == []
        clock.advance(1)
        await site.send("fr-1", temperature=6.6)
        alerts = await site.alerts()
        assert len(alerts) == 1 and alerts[0].value == 6.6
        assert "for 300 s" in alerts[0].message


async def test_threshold_held_with_no_further_reading_raises_on_the_tick(open_site, clock) -> None:
    async with open_site(threshold=[threshold(above=5, for_s=60)]) as site:
        await site.send("fr-1", temperature=9)
        await site.tick(clock.wall() + 59)
        assert await site.alerts() == []
        await site.tick(clock.wall() + 60)
        alerts = await site.alerts()
        assert [(a.state, a.value) for a in alerts] == [("active", 9.0)]


async def test_below_threshold_and_battery_rule(open_site) -> None:
    async with open_site(threshold=[threshold("cold", below=2, hysteresis=0.5)],
                         battery=[{"id": "batt", "target": {"all": True}, "below": 20}]) as site:
        await site.send("fr-1", temperature=1.9, battery=19)
        assert {a.rule_id for a in await site.alerts(state="open")} == {"cold", "batt"}
        await site.send("fr-1", temperature=2.4, battery=24)  # inside both hysteresis bands
        assert len(await site.alerts(state="open")) == 2
        await site.send("fr-1", temperature=2.5, battery=25)
        assert await site.alerts(state="open") == []


async def test_targets_tag_group_kind_and_only_matching_rules_are_evaluated(open_site) -> None:
    rules = [
        {"id": "by-group", "target": {"tag": "freezers"}, "metric": "temperature", "above": -15},
        {"id": "by-kind", "target": {"kind": "ble"}, "metric": "temperature", "above": 30},
        {"id": "by-device", "target": {"device": "other"}, "metric": "temperature", "above": 0},
        {"id": "humidity", "target": {"all": True}, "metric": "humidity", "above": 90},
    ]
    async with open_site(threshold=rules, groups={"freezers": ["fr-1", "fr-2"]}) as site:
        engine = site.rules.engine
        await site.send("ble-a", kind="ble", temperature=20)
        assert [engine.matching(d, "temperature") for d in ("fr-1", "fr-3", "ble-a", "other")] == [1, 0, 1, 1]
        assert engine.matching("fr-3", "humidity") == 1
        before = engine.evaluations
        await site.send("fr-1", temperature=-10)
        await site.send("fr-3", temperature=-10)
        await site.send("ble-a", kind="ble", temperature=31)
        # four rules exist; two of the three readings match one rule each, the third none
        assert engine.evaluations - before == 2
        open_ = {(a.rule_id, a.device) for a in await site.alerts(state="open")}
        assert open_ == {("by-group", "fr-1"), ("by-kind", "ble-a")}


async def test_tag_reported_by_the_device_itself_counts(open_site) -> None:
    rule = {"id": "t", "target": {"tag": "cellar"}, "metric": "humidity", "above": 80}
    async with open_site(threshold=[rule]) as site:
        await site.send("n-1", humidity=50)
        await site.registry.apply_attributes("n-1", {"tags": ["cellar"]})
        site.rules.engine.refresh_targets()
        await site.send("n-1", humidity=85)
        assert [a.device for a in await site.alerts()] == ["n-1"]


async def test_offline_by_heartbeat_timeout_for_longer_than_x(open_site, clock) -> None:
    async with open_site(offline=[{"id": "off", "target": {"all": True}, "for_s": 120}]) as site:
        await site.send("n-1", temperature=20)
        dev = site.registry.get_cached("n-1")
        dev.__dict__["last_seen"] = dev.last_seen - 1000  # it has been silent longer than offline_after_s
        await site.registry.check_timeouts()
        assert not site.registry.get_cached("n-1").online
        offline_at = (await site.events_of("device.offline"))[0].ts
        await site.tick(offline_at + 119)
        assert await site.alerts() == []
        await site.tick(offline_at + 121)
        alerts = await site.alerts()
        assert len(alerts) == 1 and "heartbeat timeout" in alerts[0].message
        # the next message brings it back: cleared at once, without waiting for a tick
        await site.send("n-1", temperature=20)
        alerts = await site.alerts()
        assert alerts[0].state == "cleared" and alerts[0].clear_reason == "back online"


async def test_silent_sensor(open_site) -> None:
    async with open_site(silent=[{"id": "quiet", "target": {"kind": "ble"}, "for_s": 600}]) as site:
        await site.send("ble-1", kind="ble", temperature=4)
        await site.send("n-1", temperature=4)  # not a BLE sensor: not covered
        seen = site.registry.get_cached("ble-1").last_seen
        await site.tick(seen + 599)
        assert await site.alerts() == []
        await site.tick(seen + 601)
        assert [(a.device, a.state) for a in await site.alerts()] == [("ble-1", "active")]
        await site.send("ble-1", kind="ble", temperature=4)
        await site.tick()
        assert [(a.state, a.clear_reason) for a in await site.alerts()] == [("cleared", "heard again")]


async def test_gateway_disk_and_cloud_backlog(open_site) -> None:
    facts = GatewayFacts(disk_free_percent=30.0, backlog_age_s=None)
    async with open_site(facts=facts, disk=[{"id": "disk", "free_below_percent": 10, "hysteresis": 2}],
                         backlog=[{"id": "cloud", "older_than_s": 3600, "severity": "critical"}]) as site:
        await site.rules.engine.check_gateway()
        assert await site.alerts() == []
        facts.disk_free_percent, facts.backlog_age_s = 9.5, 3700.0
        await site.rules.engine.check_gateway()
        await site.rules.settle()
        open_ = {a.rule_id: a for a in await site.alerts(state="open")}
        assert set(open_) == {"disk", "cloud"} and open_["cloud"].device is None
        facts.disk_free_percent, facts.backlog_age_s = 11.0, 10.0  # disk still within the hysteresis band
        await site.rules.engine.check_gateway()
        await site.rules.settle()
        assert {a.rule_id for a in await site.alerts(state="open")} == {"disk"}


async def test_backlog_is_read_from_the_outbox_watermark(open_site, clock) -> None:
    async with open_site() as site:
        await site.send("n-1", temperature=1)
        assert (await site.rules.gateway_facts()).backlog_age_s is None  # nobody consumes the outbox
        await site.outbox.register("cloud")
        clock.advance(100)
        await site.send("n-1", temperature=2)
        facts = await site.rules.gateway_facts()
        assert facts.backlog_age_s == pytest.approx(100.0)


async def test_restart_keeps_the_active_alert_and_raises_no_duplicate(open_site) -> None:
    async with open_site(threshold=[threshold(above=5)]) as site:
        await site.send("fr-1", temperature=9)
        first = await site.alerts()
    async with open_site(threshold=[threshold(above=5)]) as site:
        assert [a.id for a in await site.alerts(state="open")] == [first[0].id]
        await site.send("fr-1", temperature=10)
        assert [a.id for a in await site.alerts()] == [first[0].id]
        assert len(await site.events_of("alert.raised")) == 1
        await site.send("fr-1", temperature=1)
        assert (await site.alerts())[0].state == "cleared"


async def test_the_database_refuses_a_second_open_alert_for_the_same_rule_and_device(open_site) -> None:
    async with open_site() as site:
        kw = {"rule_id": "r", "device": "d", "kind": "threshold", "severity": "warning", "message": "m", "value": 1.0}
        a, created = await site.rules.alerts.raise_(**kw)
        b, again = await site.rules.alerts.raise_(**kw)
        assert created and not again and a.id == b.id


async def test_removing_a_rule_clears_its_open_alerts(open_site) -> None:
    async with open_site() as site:
        rule = await site.rules.parse_rule({"kind": "threshold", **threshold(above=5)})
        await site.rules.put_rule(rule, by="tech", via={}, create=True)
        await site.send("fr-1", temperature=9)
        await site.rules.delete_rule("warm", by="tech", via={})
        await site.rules.settle()
        assert [(a.state, a.clear_reason) for a in await site.alerts()] == [("cleared", "rule removed or disabled")]


async def test_acknowledge_records_who_and_is_an_event(open_site) -> None:
    async with open_site(threshold=[threshold(above=5)]) as site:
        await site.send("fr-1", temperature=9)
        alert = (await site.alerts())[0]
        acked = await site.rules.acknowledge(alert.id, by="maria", via={"via": "session"})
        assert acked.state == "acknowledged" and acked.acked_by == "maria"
        ev = (await site.events_of("alert.acknowledged"))[0]
        assert ev.data["by"] == "maria" and ev.data["alert_id"] == alert.id and ev.device == "fr-1"
        await site.send("fr-1", temperature=1)
        cleared = (await site.alerts())[0]
        assert cleared.state == "cleared" and cleared.acked_by == "maria"


async def test_an_alert_and_its_event_commit_together(open_site) -> None:
    async with open_site(threshold=[threshold(above=5)]) as site:
        await site.send("fr-1", temperature=1)
        # a store in which the events table refuses writes: the alert must not appear alone
        await site.db.write(lambda c: c.execute(
            "CREATE TRIGGER no_events BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'events full'); END"))
        await site.ingest.ingest_values("fr-1", [("temperature", 9.0, "")], source=Source.SIMULATOR,
                                        profile="native")
        with pytest.raises(Exception, match="events full"):
            await site.rules.engine.flush()
        assert await site.alerts() == []
        await site.db.write(lambda c: c.execute("DROP TRIGGER no_events"))
        await site.rules.engine.flush()  # the decision was kept: persisted now, with its event
        alerts, raised = await site.alerts(), await site.events_of("alert.raised")
        assert len(alerts) == 1 and [e.data["alert_id"] for e in raised] == [alerts[0].id]


async def test_a_failing_observer_does_not_disturb_ingest(open_site) -> None:
    def broken(ids, readings) -> None:
        raise RuntimeError("bug")

    async with open_site(threshold=[threshold(above=5)]) as site:
        site.ingest.add_observer(broken)
        await site.send("fr-1", temperature=9)
        assert len(await site.alerts()) == 1
        rows = await site.db.fetchall("SELECT count(*) FROM readings")
        assert rows[0][0] == 1


async def test_a_store_failure_keeps_the_transition_for_the_next_attempt(open_site) -> None:
    async with open_site(threshold=[threshold(above=5)]) as site:
        real = site.rules.alerts.raise_

        async def failing(**kw):
            raise OSError("disk full")

        site.rules.alerts.raise_ = failing  # type: ignore[method-assign]
        await site.ingest.ingest_values("fr-1", [("temperature", 9.0, "")], source=Source.SIMULATOR,
                                        profile="native")
        with pytest.raises(OSError):
            await site.rules.engine.flush()
        site.rules.alerts.raise_ = real  # type: ignore[method-assign]
        await site.rules.engine.flush()
        assert len(await site.alerts()) == 1


async def test_values_inside_the_quiet_band_skip_rule_by_rule_evaluation(open_site) -> None:
    rules = [threshold("hot", above=30, hysteresis=2), threshold("cold", below=0, hysteresis=1)]
    async with open_site(threshold=rules) as site:
        engine = site.rules.engine
        await site.send("fr-1", temperature=10)
        before = engine.evaluations
        for v in (11, 29.9, 0.1, 15):
            await site.send("fr-1", temperature=v)
        assert engine.evaluations == before  # 0 < v < 30: neither rule can change state
        await site.send("fr-1", temperature=30)  # on the limit: decided in full, and not a breach
        assert engine.evaluations == before + 2 and await site.alerts() == []
        await site.send("fr-1", temperature=31)
        assert [a.rule_id for a in await site.alerts()] == ["hot"]
        # hot is open: now only a value at or below its clear level (28) or below 0 is evaluated
        before = engine.evaluations
        await site.send("fr-1", temperature=35)
        await site.send("fr-1", temperature=28.5)
        assert engine.evaluations == before
        await site.send("fr-1", temperature=28)
        assert (await site.alerts())[0].state == "cleared"


async def test_a_removed_device_has_its_alerts_cleared_and_raises_no_more(open_site) -> None:
    async with open_site(offline=[{"id": "off", "target": {"all": True}, "for_s": 0}]) as site:
        await site.send("n-1", temperature=20)
        await site.registry.set_online("n-1", False, "status offline (last will)")
        await site.rules.settle()
        assert [a.state for a in await site.alerts()] == ["active"]
        await site.registry.remove("n-1")
        await site.rules.engine.check_gateway()
        await site.tick()
        await site.rules.engine.check_gateway()
        await site.rules.settle()
        assert [(a.state, a.clear_reason) for a in await site.alerts()] == [("cleared", "device removed")]
