"""Siteward uplink: store-and-forward from the readings outbox to a cloud MQTT broker (see issue 3)."""
