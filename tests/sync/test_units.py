"""The pure pieces: ledger ranges, backoff, codec and templates, downlink validation, window."""

from __future__ import annotations

import json
import zlib

import pytest

from cloud_sync.backoff import Backoff
from cloud_sync.codec import MAGIC_ZLIB, ReadingsCodec, Series, decode, unpack
from cloud_sync.config import topics_of
from cloud_sync.contract import ReadingsBatch
from cloud_sync.downlink import Rejected, parse_command
from cloud_sync.lanes import Unit
from cloud_sync.ledger import Ledger, RangeSet, first_gap
from cloud_sync.publisher import Window
from gateway.settings import CloudTemplates, ConfigError, load_settings


# -- ranges and the ledger ----------------------------------------------------------------------
def test_rangeset_merges_and_splits() -> None:
    r = RangeSet([(5, 9), (1, 3)])
    r.add(4, 4)
    assert list(r) == [(1, 9)]
    r.add(20, 30)
    r.remove(7, 22)
    assert list(r) == [(1, 6), (23, 30)]
    assert r.contains(6) and not r.contains(7) and r.contains(23)
    assert r.covered(5, 25) == 2 + 3
    assert r.max() == 30


def test_first_gap_over_several_sets() -> None:
    a, b = RangeSet([(1, 10)]), RangeSet([(11, 15), (20, 25)])
    assert first_gap([a, b], 1, 100) == (16, 19)
    assert first_gap([a, b], 1, 17) == (16, 17)
    assert first_gap([a, b], 1, 15) is None
    assert first_gap([a, b], 21, None) == (26, -1)


def test_ledger_watermark_advances_only_over_contiguous_acks() -> None:
    led = Ledger(0)
    for lo, hi in ((1, 100), (101, 200), (201, 300)):
        led.claim(lo, hi)
    # acknowledged out of order: the watermark waits for the first range
    led.broker_acked(201, 300)
    led.recorded(201, 300)
    led.broker_acked(101, 200)
    led.recorded(101, 200)
    assert led.base == 0 and list(led.acked) == [(101, 300)]
    assert led.next_unclaimed(1, 1000) == (301, 1000)
    led.broker_acked(1, 100)
    assert led.base == 0  # acknowledged, but not yet recorded in the store
    led.recorded(1, 100)
    assert led.base == 300 and not led.acked


def test_ledger_releases_what_was_in_flight() -> None:
    led = Ledger(10, acked=[(51, 60)])
    led.claim(11, 30)
    led.claim(31, 50)
    led.broker_acked(31, 50)
    assert led.next_unclaimed(1, 100) == (61, 100)
    assert led.release_inflight() == [(11, 30)]
    assert led.next_unclaimed(1, 100) == (11, 30)


def test_ledger_restored_from_the_store_normalises() -> None:
    led = Ledger(100, acked=[(50, 90), (101, 150), (200, 210)])
    assert led.base == 150 and list(led.acked) == [(200, 210)]


# -- backoff ------------------------------------------------------------------------------------
def test_backoff_grows_with_jitter_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 60.0, rng=lambda: 1.0)
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    low = Backoff(1.0, 60.0, rng=lambda: 0.0)
    assert [low.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]  # never less than half
    b.reset()
    assert b.next_delay() == 1


# -- codec --------------------------------------------------------------------------------------
SERIES = {1: Series.of("node-1", "temperature", "°C"), 2: Series.of('we"ird', "humidity", "%")}
ROWS = [(i, 1 + i % 2, 1_700_000_000.5 + i, 20.25 + i, i % 3, i % 4) for i in range(1, 1001)]


@pytest.mark.parametrize("encoding", ["json", "json+zlib"])
def test_readings_batch_round_trip_and_schema(encoding: str) -> None:
    c = ReadingsCodec("gw-1", encoding=encoding, max_count=1000, max_bytes=1024 * 1024)
    b = c.encode(ROWS[:10], SERIES, seq=7, lane="backlog", first_id=1, last_id=12, attempt=1,
                 sent_at=1.5)
    assert b.payload.startswith(MAGIC_ZLIB) == (encoding == "json+zlib")
    body = decode(b.payload)
    ReadingsBatch.model_validate(body)
    assert (body["first_id"], body["last_id"], body["count"]) == (1, 12, 10)  # the range covers ids 11-12 too
    assert body["readings"][0] == {"id": 1, "device": 'we"ird', "metric": "humidity", "unit": "%", "value": 21.25,
                                   "ts": 1_700_000_001.5, "flags": 1, "source": "http"}
    if encoding == "json+zlib":
        assert json.loads(zlib.decompress(b.payload[4:])) == body


def test_batches_respect_count_and_bytes() -> None:
    by_count = ReadingsCodec("gw-1", encoding="json", max_count=100, max_bytes=10**6)
    b = by_count.encode(ROWS, SERIES, seq=1, lane="live", first_id=1, last_id=1000, attempt=1,
                        sent_at=0.0)
    assert b.used == 100 and decode(b.payload)["last_id"] == 100  # the range ends where the batch ends
    by_bytes = ReadingsCodec("gw-1", encoding="json", max_count=10_000, max_bytes=8192)
    b = by_bytes.encode(ROWS, SERIES, seq=1, lane="live", first_id=1, last_id=1000, attempt=1,
                        sent_at=0.0)
    assert b.text_bytes <= 8192 and 10 < b.used < 1000
    assert len(unpack(b.payload)) == b.text_bytes


def test_payload_templates_meet_another_backend_format() -> None:
    tpl = CloudTemplates(reading={"k": "$key", "dev": "$device", "m": "$metric", "v": "$value", "t": "$ts_ms",
                                  "when": "$ts_iso", "tags": ["$unit"]},
                         readings_envelope={"gatewayId": "$gateway", "batch": "$seq", "items": "$readings"})
    c = ReadingsCodec("gw-1", encoding="json", max_count=10, max_bytes=10**6, templates=tpl)
    body = decode(c.encode(ROWS[:2], SERIES, seq=3, lane="live", first_id=1, last_id=2, attempt=1,
                           sent_at=0.0).payload)
    assert body["gatewayId"] == "gw-1" and body["batch"] == 3
    assert body["items"][0] == {"k": "gw-1:1", "dev": 'we"ird', "m": "humidity", "v": 21.25, "t": 1_700_000_001_500,
                                "when": "2023-11-14T22:13:21.500000Z", "tags": ["%"]}


def test_templates_and_topics_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="unknown placeholder"):
        load_settings(None, cloud={"templates": {"reading": {"x": "$nope", "k": "$key"}}})
    with pytest.raises(ConfigError, match="de-duplicates"):
        load_settings(None, cloud={"templates": {"reading": {"v": "$value"}}})
    with pytest.raises(ConfigError, match="wildcards"):
        load_settings(None, cloud={"templates": {"events_topic": "a/+/b"}})
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_settings(None, cloud={"cert_file": "/x.pem"})
    s = load_settings(None, gateway={"id": "site-9"}, cloud={"topic_prefix": "acme",
                                                              "templates": {"readings_topic": "t/{gateway}/{lane}"}})
    t = topics_of(s)
    assert t.readings_for("live") == "t/site-9/live" and t.events == "acme/site-9/up/events"
    assert t.command_id_of("acme/site-9/down/command/c-1") == "c-1"
    assert t.command_id_of("acme/site-9/down/command/a/b") is None
    assert t.command_id_of("acme/other/down/command/c-1") is None


# -- downlink validation ------------------------------------------------------------------------
def test_downlink_parse_accepts_the_contract() -> None:
    cmd = parse_command("c-1", json.dumps({"id": "c-1", "device": "relay-1", "command": "relay",
                                           "args": {"state": "on"}, "timeout_s": 5}).encode(), max_bytes=4096)
    assert (cmd.device, cmd.command, cmd.args, cmd.timeout_s) == ("relay-1", "relay", {"state": "on"}, 5)


@pytest.mark.parametrize("payload", [
    b"", b"[]", b"nul", b'{"device": "d", "command": "x", "args": {"v": NaN}}', b"\xff\xfe",
    b'{"device": "d"}', b'{"device": "bad id", "command": "x"}', b'{"device": "d", "command": "x", "z": 1}',
    b'{"device": "d", "command": "x", "timeout_s": -1}', b'{"id": "other", "device": "d", "command": "x"}',
    b"{" + b'"a":{' * 20 + b"}" * 21, b'{"device": "d", "command": "x", "args": "' + b"x" * 5000 + b'"}',
])
def test_downlink_parse_rejects(payload: bytes) -> None:
    with pytest.raises(Rejected) as err:
        parse_command("c-1", payload, max_bytes=4096)
    assert err.value.code == "invalid"


# -- the window ---------------------------------------------------------------------------------
def test_window_keeps_slots_for_live_and_events() -> None:
    w = Window(4, 10**6, reserved=1)
    units = [Unit("readings", "backlog", nbytes=10) for _ in range(4)]
    for u in units[:3]:
        assert w.backlog_room()
        w.take(u)
    assert not w.backlog_room() and w.has_room()  # the last slot is for live readings and events
    w.take(units[3])
    assert not w.has_room()
    w.release(units[0])
    w.release(units[0])  # releasing twice changes nothing
    assert w.count == 3 and w.has_room()


# -- asyncio guards -----------------------------------------------------------------------------
async def test_checkpoint_honours_a_cancellation_that_was_swallowed() -> None:
    import asyncio
    import contextlib

    from cloud_sync.aio import checkpoint, wait_event

    async def loop_that_eats_one_cancel() -> None:
        # what Python 3.11's wait_for does when its future completes at that instant
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        checkpoint()

    t = asyncio.create_task(loop_that_eats_one_cancel())
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 1.0) is True


def test_schema_check_wants_the_tables_not_only_the_version(tmp_path) -> None:
    import sqlite3

    from cloud_sync.outbox import schema_version

    path = tmp_path / "s.db"
    assert schema_version(path) is None
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 5")  # migrated past 2 without 2's tables (out-of-order history)
    conn.commit()
    conn.close()
    assert schema_version(path) == (5, False)
