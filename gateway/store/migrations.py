"""Numbered schema migrations. Append only: never edit a migration that has shipped.

``PRAGMA user_version`` holds the number of the last migration applied; each
migration runs in its own transaction together with the bump of that number, so a
crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import sqlite3

from gateway.store.files import transaction

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT,
            kind TEXT NOT NULL DEFAULT 'node',
            profile TEXT,
            state TEXT NOT NULL DEFAULT 'discovered',
            firmware TEXT,
            location TEXT,
            created_at REAL NOT NULL,
            last_seen REAL,
            online INTEGER NOT NULL DEFAULT 0,
            attributes TEXT NOT NULL DEFAULT '{}'
        );

        CREATE TABLE device_credentials (
            device_id TEXT PRIMARY KEY,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            profiles TEXT NOT NULL DEFAULT '["native"]',
            created_at REAL NOT NULL,
            revoked_at REAL
        );

        -- one row per (device, metric): keeps readings rows small (integer series id)
        CREATE TABLE series (
            id INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            unit TEXT NOT NULL DEFAULT '',
            UNIQUE (device_id, metric)
        );

        -- The outbox and the newest history: append-only, id = idempotency key sent to the
        -- cloud. No secondary index and no AUTOINCREMENT, on purpose: each touches pages
        -- all over the file on every commit (one index leaf per series), which measured
        -- 7.4 KB written per reading at 1,000 msg/s (docs/performance.md). Appending by
        -- rowid writes about one page per commit. Ids are never reused because the
        -- newest row is never deleted (gateway.store.readings).
        CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            series_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            value REAL NOT NULL,
            flags INTEGER NOT NULL DEFAULT 0,
            source INTEGER NOT NULL DEFAULT 0
        );

        -- History for queries and charts, clustered by series and time. Filled from
        -- readings by a periodic merge, so each series' leaf page is written once per
        -- merge instead of once per commit.
        CREATE TABLE history (
            series_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            id INTEGER NOT NULL,
            value REAL NOT NULL,
            flags INTEGER NOT NULL DEFAULT 0,
            source INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (series_id, ts, id)
        ) WITHOUT ROWID;

        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            device_id TEXT,
            kind TEXT NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX events_device_ts ON events (device_id, ts);

        CREATE TABLE commands (
            id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            command TEXT NOT NULL,
            args TEXT NOT NULL DEFAULT '{}',
            expect TEXT,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            deadline REAL NOT NULL,
            result TEXT
        );
        CREATE INDEX commands_device ON commands (device_id, created_at);

        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        );

        CREATE TABLE users (
            username TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('admin', 'technician', 'viewer')),
            created_at REAL NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0
        );

        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            username TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used REAL,
            revoked_at REAL
        );

        CREATE TABLE web_sessions (
            id_hash TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            csrf TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );

        -- consumers of the readings outbox (cloud_sync) and the last id each acknowledged
        CREATE TABLE outbox_consumers (
            name TEXT PRIMARY KEY,
            acked_id INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL
        );

        -- persisted counters: drops by policy must survive restarts to be reported upward
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL DEFAULT 0);
        """,
    ),
    (
        2,
        "cloud sync: acknowledged ranges, sync state and status, queued downlink commands",
        """
        -- cloud_sync owns these. Ranges of ids (per lane: 'readings', 'events') the cloud
        -- acknowledged above the contiguous watermark; readings' contiguous watermark is
        -- outbox_consumers('cloud'), so retention keeps working unchanged.
        CREATE TABLE sync_acked (
            lane TEXT NOT NULL,
            first_id INTEGER NOT NULL,
            last_id INTEGER NOT NULL,
            PRIMARY KEY (lane, first_id)
        );

        -- small integers the sync process persists (events watermark, drops reported, ...)
        CREATE TABLE sync_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);

        -- one row, rewritten every few seconds by the sync process, read by the gateway's API
        CREATE TABLE sync_status (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            updated_at REAL NOT NULL,
            data TEXT NOT NULL
        );

        -- commands from the cloud: written by the sync process (queued, or rejected when
        -- invalid), executed by the gateway (taken, with the gateway's command id), results
        -- reported upward while needs_report = 1
        CREATE TABLE command_queue (
            id TEXT PRIMARY KEY,
            device_id TEXT,
            command TEXT,
            args TEXT NOT NULL DEFAULT '{}',
            expect TEXT,
            timeout_s REAL,
            received_at REAL NOT NULL,
            expires_at REAL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'taken', 'rejected')),
            command_id TEXT,
            error TEXT,
            needs_report INTEGER NOT NULL DEFAULT 1,
            updated_at REAL NOT NULL
        );
        CREATE INDEX command_queue_state ON command_queue (state);
        CREATE INDEX command_queue_command ON command_queue (command_id);
        CREATE INDEX command_queue_report ON command_queue (needs_report) WHERE needs_report = 1;
        """,
    ),
    (
        3,
        "ota: firmware registry, rollout campaigns, per-node runs and their history",
        """
        -- gateway/ota owns these. One row per accepted image (file kept under
        -- <data_dir>/firmware/<sha256>.bin); envelope holds a pre-signed manifest when imported.
        CREATE TABLE ota_firmware (
            sha256 TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('app', 'files')),
            project TEXT NOT NULL,
            version TEXT NOT NULL,
            chip TEXT,
            size INTEGER NOT NULL,
            filename TEXT,
            info TEXT NOT NULL DEFAULT '{}',
            envelope TEXT,
            source TEXT NOT NULL,
            uploaded_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            blocked INTEGER NOT NULL DEFAULT 0,
            blocked_reason TEXT,
            UNIQUE (project, version)
        );

        CREATE TABLE ota_campaigns (
            id TEXT PRIMARY KEY,
            firmware TEXT NOT NULL REFERENCES ota_firmware (sha256),
            target TEXT NOT NULL,
            canary INTEGER NOT NULL,
            max_concurrent INTEGER NOT NULL,
            max_failures INTEGER NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            failures_ack INTEGER NOT NULL DEFAULT 0,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX ota_campaigns_state ON ota_campaigns (state);

        CREATE TABLE ota_nodes (
            campaign_id TEXT NOT NULL REFERENCES ota_campaigns (id),
            device_id TEXT NOT NULL,
            state TEXT NOT NULL,
            progress REAL,
            reason TEXT,
            from_version TEXT,
            canary INTEGER NOT NULL DEFAULT 0,
            since REAL NOT NULL,
            deadline REAL,
            PRIMARY KEY (campaign_id, device_id)
        );
        CREATE INDEX ota_nodes_device ON ota_nodes (device_id);

        CREATE TABLE ota_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            campaign_id TEXT NOT NULL,
            device_id TEXT,
            state TEXT NOT NULL,
            progress REAL,
            reason TEXT
        );
        CREATE INDEX ota_history_campaign ON ota_history (campaign_id, id);
        """,
    ),
    (
        4,
        "ble: adopted and ignored sensors (sealed bindkeys), replay counters",
        """
        -- gateway/ble owns these. A sensor is keyed by its Bluetooth address
        -- (AA:BB:CC:DD:EE:FF); its device id is ble-<address without colons>.
        -- bindkey is sealed (AES-GCM) with the key in <data_dir>/ble-bindkeys.key (0600).
        CREATE TABLE ble_sensors (
            address TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('adopted', 'ignored')),
            family TEXT,
            model TEXT,
            bindkey BLOB,
            updated_at REAL NOT NULL
        );

        -- last accepted counter of each encrypted sensor: a packet whose counter goes
        -- backwards is a replay and is refused, across restarts too
        CREATE TABLE ble_replay (
            address TEXT NOT NULL,
            family TEXT NOT NULL,
            counter INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (address, family)
        );
        """,
    ),
    (
        5,
        "rules: alert rules, schedules and groups made through the API; alerts; schedule state; automation runs",
        """
        -- gateway/rules owns these. Rules, schedules and groups of the config file are not
        -- stored: the file stays their one source. spec is the validated JSON.
        CREATE TABLE alert_rules (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            updated_by TEXT NOT NULL
        );

        CREATE TABLE schedules (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            updated_by TEXT NOT NULL
        );

        CREATE TABLE rule_groups (
            name TEXT PRIMARY KEY,
            devices TEXT NOT NULL DEFAULT '[]',
            updated_at REAL NOT NULL,
            updated_by TEXT NOT NULL
        );

        -- raised -> acknowledged -> cleared; device_id is '' for gateway-level alerts
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rule_id TEXT NOT NULL,
            device_id TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'acknowledged', 'cleared')),
            message TEXT NOT NULL,
            value REAL,
            raised_at REAL NOT NULL,
            acked_at REAL,
            acked_by TEXT,
            cleared_at REAL,
            clear_reason TEXT,
            clear_value REAL,
            data TEXT NOT NULL DEFAULT '{}'
        );
        -- one open alert per rule and device: the database itself refuses a duplicate
        CREATE UNIQUE INDEX alerts_open ON alerts (rule_id, device_id) WHERE state != 'cleared';
        CREATE INDEX alerts_device ON alerts (device_id, id);
        CREATE INDEX alerts_rule ON alerts (rule_id, id);

        -- per schedule: the wall time up to which its occurrences have been dealt with
        -- (nothing at or before it runs again) and the override in force, if any
        CREATE TABLE schedule_state (
            schedule_id TEXT PRIMARY KEY,
            high_water REAL NOT NULL,
            override TEXT,
            updated_at REAL NOT NULL
        );

        -- every command an alert rule or a schedule decided to send, and what became of it;
        -- 'pending' rows are the durable to-do list (written together with the decision)
        CREATE TABLE automation_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            origin TEXT NOT NULL CHECK (origin IN ('rule', 'schedule')),
            origin_id TEXT NOT NULL,
            action_key TEXT NOT NULL,
            alert_id INTEGER,
            trigger TEXT NOT NULL,
            device_id TEXT NOT NULL,
            command TEXT NOT NULL,
            args TEXT NOT NULL DEFAULT '{}',
            timeout_s REAL,
            state TEXT NOT NULL,
            command_id TEXT,
            detail TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX automation_runs_open ON automation_runs (state) WHERE state IN ('pending', 'sent');
        CREATE INDEX automation_runs_origin ON automation_runs (origin, origin_id, id);
        CREATE INDEX automation_runs_created ON automation_runs (created_at);
        """,
    ),
    (
        6,
        "history moves to a file of its own (gateway.store.history)",
        """
        -- gateway.store.history.move_legacy_history copied the rows and the merge marker
        -- into <name>-history.db before this runs; the marker now lives there too
        DROP TABLE IF EXISTS history;
        DELETE FROM meta WHERE key = 'history_merged_id';
        """,
    ),
]

# the last schema of the main file that still held the history table
LAST_SINGLE_FILE_VERSION = 5

# The history file's own schema (its own user_version), see gateway.store.history.
HISTORY_MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "history clustered by series and time, and the merge marker",
        """
        -- Filled from the main file's readings by a periodic merge, so each series' leaf
        -- page is written once per merge instead of once per commit.
        CREATE TABLE history (
            series_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            id INTEGER NOT NULL,
            value REAL NOT NULL,
            flags INTEGER NOT NULL DEFAULT 0,
            source INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (series_id, ts, id)
        ) WITHOUT ROWID;

        -- the highest outbox id merged, committed together with the rows it covers
        CREATE TABLE history_merge (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            merged_id INTEGER NOT NULL
        );
        INSERT INTO history_merge (id, merged_id) VALUES (1, 0);
        """,
    ),
]


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def apply_migrations(conn: sqlite3.Connection, *, upto: int | None = None,
                     migrations: list[tuple[int, str, str]] = MIGRATIONS) -> list[int]:
    """Apply every pending migration (up to number ``upto``); returns the numbers applied."""
    applied: list[int] = []
    have = current_version(conn)
    # numeric order, whatever order the list was edited in
    ordered = sorted(migrations, key=lambda m: m[0])
    latest = ordered[-1][0]
    if have > latest:
        raise RuntimeError(
            f"database schema version {have} is newer than this Siteward ({latest}); refusing to run"
        )
    for number, _title, sql in ordered:
        if number <= have or (upto is not None and number > upto):
            continue
        # executescript would COMMIT implicitly; run statement by statement inside one
        # explicit transaction so the version bump is atomic with the schema change.
        with transaction(conn, "IMMEDIATE"):
            for stmt in _split(sql):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {number}")
        applied.append(number)
    return applied


def _split(sql: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
