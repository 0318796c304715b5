"""Embedded MQTT broker: amqtt, hardened (see docs/broker.md).

The rest of the gateway uses :class:`EmbeddedBroker` and implements :class:`BrokerHooks`;
the amqtt fixes are in :mod:`gateway.broker.amqtt_fixes`.
"""

from gateway.broker.embedded import EmbeddedBroker
from gateway.broker.hooks import AuthRefused, BrokerHooks, Principal

__all__ = ["AuthRefused", "BrokerHooks", "EmbeddedBroker", "Principal"]
