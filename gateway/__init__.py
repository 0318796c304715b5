"""Siteward gateway daemon: broker, ingest, store, devices, web, simulator.

Data flows one way: source (broker / HTTP / BLE / simulator) → ingest (validate) →
store (durable) → live bus → web and rules. ``gateway.app`` composes the rooms.
"""

__version__ = "0.1.0"
