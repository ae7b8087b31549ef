"""The one MQTT packet this package builds itself: a QoS 0 PUBLISH, for streamed chunks.

paho builds a PUBLISH through ~100 Python calls (a message-info object, the packet queue, the
written-callback with a fresh ReasonCode and Properties): on a device whose cores are all
decoding, CPU taken from the model on every streamed token. A QoS 0 PUBLISH has no
packet id and no state, so its bytes are a pure function of topic, properties and payload
(MQTT 5.0 §3.3, MQTT 3.1.1 §3.3). ``agent.mqtt.client.MQTTClient`` builds them with
``Qos0Packets`` and ``agent.mqtt.network.NetworkLoop.send_whole`` writes them; everything else
still goes through paho.
"""

from __future__ import annotations

import struct

_PUBLISH_QOS0 = 0x30  # packet type 3, DUP 0, QoS 0, RETAIN 0
_CORRELATION_DATA = 0x09  # MQTT 5 property identifier
_MAX_REMAINING = 268_435_455  # the largest Remaining Length four bytes can say
_U16 = struct.Struct("!H")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def publish_prefix(topic: str, correlation_data: bytes | None, *, v5: bool) -> bytes | None:
    """The variable header of a QoS 0 PUBLISH to ``topic``: the same for every chunk of one
    reply. ``correlation_data`` is an MQTT 5 property (None on 3.1.1). None where paho must
    build the packet (a topic it would refuse: empty, a wildcard, too long), so that its error
    is the one raised."""
    encoded = topic.encode()
    if not encoded or len(encoded) > 0xFFFF or "+" in topic or "#" in topic or "\0" in topic:
        return None
    if correlation_data is not None and len(correlation_data) > 0xFFFF:
        return None
    header = _U16.pack(len(encoded)) + encoded
    if not v5:
        return header
    properties = b""
    if correlation_data is not None:
        properties = (bytes((_CORRELATION_DATA,)) + _U16.pack(len(correlation_data))
                      + correlation_data)
    return header + _varint(len(properties)) + properties


def publish_qos0(prefix: bytes, payload: bytes) -> bytes | None:
    """The whole packet: fixed header, ``prefix`` (from publish_prefix), payload."""
    remaining = len(prefix) + len(payload)
    if remaining > _MAX_REMAINING:
        return None
    return bytes((_PUBLISH_QOS0,)) + _varint(remaining) + prefix + payload


class Qos0Packets:
    """One connection's QoS 0 packets, keeping the variable header of the last topic and
    Correlation Data: every chunk of a streamed reply shares them."""

    def __init__(self, *, v5: bool) -> None:
        self._v5 = v5
        self._last: tuple[tuple[str, bytes | None], bytes | None] | None = None

    def build(self, topic: str, payload: bytes, correlation_data: bytes | None) -> bytes | None:
        """The packet, or None where paho must build it. Correlation Data is left out on
        3.1.1, as paho leaves it out."""
        key = (topic, correlation_data)
        last = self._last
        if last is None or last[0] != key:
            prefix = publish_prefix(topic, correlation_data if self._v5 else None, v5=self._v5)
            last = self._last = (key, prefix)
        return publish_qos0(last[1], payload) if last[1] is not None else None
