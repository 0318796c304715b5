"""Every Prometheus metric the gateway exports, declared in one place.

One :class:`Metrics` per gateway process (its own registry, so tests can run several
gateways in one interpreter). Modules receive it and update the named metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages_in = Counter(
            "siteward_messages_in", "Messages received, by source", ["source"], registry=r
        )
        self.readings_stored = Counter(
            "siteward_readings_stored", "Readings committed to the store", registry=r
        )
        self.rejected = Counter(
            "siteward_rejected", "Messages or readings refused, by reason", ["reason"], registry=r
        )
        self.dropped = Counter(
            "siteward_dropped", "Stored data dropped by policy, by policy", ["policy"], registry=r
        )
        self.commit_seconds = Histogram(
            "siteward_commit_seconds", "Store group-commit latency", buckets=COMMIT_BUCKETS, registry=r
        )
        self.commit_batch = Histogram(
            "siteward_commit_batch_ops",
            "Operations per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.history_merged = Counter(
            "siteward_history_merged", "Readings merged from the outbox into the history file", registry=r
        )
        self.history_merge_seconds = Histogram(
            "siteward_history_merge_seconds", "Duration of one history merge (its own writer: ingest goes on)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r
        )
        self.queue_depth = Gauge("siteward_store_queue_depth", "Writes waiting for commit", registry=r)
        self.db_bytes = Gauge("siteward_db_bytes", "Store size on disk (both files and WALs)", registry=r)
        self.connected_clients = Gauge(
            "siteward_mqtt_connected_clients", "MQTT clients connected to the broker", registry=r
        )
        self.devices = Gauge("siteward_devices", "Known devices, by online state", ["state"], registry=r)
        self.commands = Counter("siteward_commands", "Commands, by final state", ["state"], registry=r)
        self.live_dropped = Counter(
            "siteward_live_dropped", "Live-feed updates dropped for slow viewers", registry=r
        )
        self.task_restarts = Counter(
            "siteward_task_restarts", "Supervised task restarts", ["task"], registry=r
        )
        self.clock_synced = Gauge("siteward_clock_synchronised", "1 when the wall clock is synced", registry=r)
        self.broker_stat = Gauge("siteward_broker", "Embedded broker statistics", ["stat"], registry=r)
        # OTA (gateway/ota)
        self.ota_node_results = Counter("siteward_ota_node_results", "OTA campaign node outcomes, by state",
                                        ["state"], registry=r)
        self.ota_downloads = Counter("siteward_ota_downloads", "Firmware image requests, by outcome (served, "
                                     "refused, blocked)", ["outcome"], registry=r)
        self.ota_campaigns_open = Gauge("siteward_ota_campaigns_open", "Rollout campaigns running or paused",
                                        registry=r)
        # rules (gateway/rules)
        self.rules_loaded = Gauge("siteward_rules", "Alert rules in force, by kind", ["kind"], registry=r)
        self.alerts_open = Gauge("siteward_alerts_open", "Open (active or acknowledged) alerts, by severity",
                                 ["severity"], registry=r)
        self.alert_transitions = Counter("siteward_alert_transitions", "Alert transitions, by transition and severity",
                                         ["transition", "severity"], registry=r)
        self.automation_runs = Counter("siteward_automation_runs", "Automation and schedule commands, by outcome",
                                       ["origin", "state"], registry=r)
        self.schedule_occurrences = Counter("siteward_schedule_occurrences",
                                            "Schedule occurrences, by outcome (run, superseded, overridden)",
                                            ["outcome"], registry=r)
        self.webhook_deliveries = Counter("siteward_webhook_deliveries", "Local webhook deliveries, by result",
                                          ["result"], registry=r)
        self.rules_errors = Counter("siteward_rules_errors", "Failures inside the rules engine, by where",
                                    ["where"], registry=r)

        # BLE (gateway/ble)
        self.ble_adverts = Counter("siteward_ble_adverts", "BLE advertisements, by outcome (received, rejected, "
                                   "decoded, replay, ...)", ["outcome"], registry=r)
        self.ble_seconds_since_advert = Gauge("siteward_ble_seconds_since_advert",
                                              "Seconds since the last BLE advertisement (-1: none yet)", registry=r)
        self.ble_nearby = Gauge("siteward_ble_nearby", "BLE sensors in the nearby list", registry=r)
        self.ble_watchdog_stage = Gauge("siteward_ble_watchdog_stage",
                                        "BLE watchdog stage: 0 ok, 1 scan restarted, 2 adapter power-cycled, "
                                        "3 unhealthy", registry=r)
        self.ble_watchdog_escalations = Counter("siteward_ble_watchdog_escalations", "BLE watchdog escalations, "
                                                "by stage", ["stage"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
