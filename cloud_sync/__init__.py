"""Siteward's uplink: store-and-forward from the gateway's store to a cloud MQTT broker.

``siteward sync`` runs it as a process of its own beside the gateway, sharing the SQLite
file (docs/cloud-contract.md). One job per module, in the order data flows:

* ``config``: settings → topics, TLS context, client identity;
* ``outbox``: read-only view of the store (readings, events, devices, commands);
* ``ledger``: which id ranges the cloud has acknowledged, which are in flight;
* ``lanes``: what to send next (results, events, drops, live, backlog);
* ``codec``: batches on the wire (JSON, zlib, templates); ``contract``: the message models;
* ``publisher``: the in-flight window; ``link``: the connection, backoff, will;
* ``state``: the sync's few writes into the store; ``downlink``: commands from the cloud;
* ``status``: figures for the sync's own metrics and for the gateway's API;
* ``service``: composes all of it; ``main``: the process (signals, systemd, dev child);
  ``aio``: guards every loop needs on Python 3.11 (cancellation, timeouts).
"""

# first, so that structlog is imported the gateway's way (without rich: see gateway/__init__.py)
# even when a cloud_sync module is the first thing a process imports
import gateway  # noqa: F401
