"""Every limit and timing of the broker layer, in one place.

The configurable ones come from :class:`gateway.settings.BrokerSection`; the rest are named
constants here so that a reader looking for "why did the broker drop that connection after
10 s" finds the answer in one module.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import BrokerSection

# A TCP connection must deliver its CONNECT within this time, or it is closed: amqtt waits
# forever, so half-open connections from port scanners would pile up.
CONNECT_TIMEOUT_S = 10.0
# Transport write-buffer level above which a connection's writer waits for the socket to
# drain (and its reader stops reading, so a client that does not read cannot make us buffer
# PUBACKs without bound either).
WRITE_HIGH_WATER = 64 * 1024
# SUBSCRIBE/UNSUBSCRIBE/CONNECT bodies larger than this are a protocol error (a real client's
# are a few hundred bytes; CONNECT is bounded separately by the will payload).
MAX_CONTROL_PACKET = 64 * 1024
# Room for the topic and packet id of a PUBLISH on top of max_payload_bytes: the limit is on
# the payload, the topic has its own 16-bit length.
PUBLISH_HEADER_ALLOWANCE = 2 + 65535 + 2
# How often offline persistent sessions are checked for expiry.
SESSION_SWEEP_INTERVAL_S = 1.0
# Upper bound for every wait during a connection's teardown (pending commits, the will, the
# on_disconnect hook) so one stuck hook cannot wedge shutdown.
TEARDOWN_TIMEOUT_S = 5.0
# A problem that repeats (a full queue, a failing store, a flooding client) is logged once per
# this interval per kind and client, with the count of what happened in between.
BURST_LOG_INTERVAL_S = 10.0
# Topics per connection whose publish-ACL decision is cached (a node uses a handful).
ACL_CACHE_SIZE = 256
# Highest QoS granted to a subscription: outbound QoS 2 is not implemented; granting less
# than asked is allowed by MQTT 3.1.1 section 3.9.3, and inbound QoS 2 is fully supported.
MAX_GRANTED_QOS = 1


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    max_payload_bytes: int = 64 * 1024
    keepalive_grace: float = 1.5
    max_keepalive_s: int = 600
    max_queued_messages: int = 1000
    max_inflight_messages: int = 20
    max_inbound_inflight: int = 64
    session_expiry_s: int = 3600
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    retry_interval_s: float = 20.0

    @classmethod
    def from_settings(cls, s: BrokerSection) -> BrokerLimits:
        return cls(
            max_payload_bytes=s.max_payload_bytes,
            keepalive_grace=s.keepalive_grace,
            max_keepalive_s=s.max_keepalive_s,
            max_queued_messages=s.max_queued_messages,
            max_inflight_messages=s.max_inflight_messages,
            max_inbound_inflight=s.max_inbound_inflight,
            session_expiry_s=s.session_expiry_s,
            rate_limit_per_s=s.rate_limit_per_s,
            rate_limit_burst=s.rate_limit_burst,
            retry_interval_s=s.retry_interval_s,
        )

    def effective_keepalive(self, requested: int) -> int:
        """The keepalive the broker enforces for a client that asked for ``requested`` seconds.

        0 ("no keepalive") and anything above ``max_keepalive_s`` become ``max_keepalive_s``,
        so that a node that loses power is noticed even if it asked never to be checked.
        MQTT 3.1.1 cannot tell the client; mosquitto refuses such clients instead, which
        would strand deployed firmware.
        """
        cap = self.max_keepalive_s
        if cap > 0 and (requested == 0 or requested > cap):
            return cap
        return requested
