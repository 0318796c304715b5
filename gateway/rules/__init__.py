"""Local alerts, automations and schedules: what the gateway does on its own, internet or not.

    committed readings ─┐
    online / offline ───┼─▶ engine (index (device, metric) → rules) ─▶ alerts (SQLite + events)
    gateway facts ──────┘                                       └──▶ automations ─▶ commands
    site clock (zoneinfo) ─▶ schedules ───────────────────────────────▶ automations ─▶ commands
                                                     alert transitions ─▶ local webhook (optional)

``models`` holds the validated rule and schedule formats (config file and API share
them); ``service.Rules`` composes the rest and is what the gateway and the web views use.
This package is imported by :mod:`gateway.settings` for the formats, so it imports
nothing itself.
"""
