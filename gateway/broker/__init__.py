"""Embedded MQTT broker: amqtt, hardened (see docs/broker.md)."""
