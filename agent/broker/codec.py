"""MQTT 3.1.1/5.0 wire format: packet types, reason codes, properties, and the reader and
encoders of packet bodies. A packet that breaks the format raises ``Reject`` with the reason
code to send; nothing here knows about sessions or sockets."""

from __future__ import annotations

from typing import Any

from agent.broker.topics import valid_topic_name

MQTT_311 = 4
MQTT_5 = 5
NEVER_EXPIRES = 0xFFFFFFFF

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = range(1, 8)
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

RC_SUCCESS = 0x00
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_UNSPECIFIED = 0x80
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_VERSION = 0x84
RC_CLIENT_ID_INVALID = 0x85
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_BAD_AUTH_METHOD = 0x8C
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_ID_NOT_FOUND = 0x92
RC_TOPIC_ALIAS_INVALID = 0x94
RC_PACKET_TOO_LARGE = 0x95
RC_QUOTA_EXCEEDED = 0x97
RC_QOS_NOT_SUPPORTED = 0x9B
RC_SUBSCRIPTION_IDS_NOT_SUPPORTED = 0xA1

# v5 property identifiers (MQTT 5.0 section 2.2.2.2) and their wire types.
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION_DATA = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_AUTH_METHOD = 0x15
P_AUTH_DATA = 0x16
P_REQUEST_PROBLEM_INFO = 0x17
P_WILL_DELAY = 0x18
P_REQUEST_RESPONSE_INFO = 0x19
P_SERVER_REFERENCE = 0x1C
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_RETAIN_AVAILABLE = 0x25
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27
P_WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
P_SUBSCRIPTION_IDS_AVAILABLE = 0x29
P_SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    P_PAYLOAD_FORMAT: _BYTE, P_MESSAGE_EXPIRY: _U32, P_CONTENT_TYPE: _UTF8,
    P_RESPONSE_TOPIC: _UTF8, P_CORRELATION_DATA: _BINARY, P_SUBSCRIPTION_ID: _VARINT,
    P_SESSION_EXPIRY: _U32, P_ASSIGNED_CLIENT_ID: _UTF8, 0x13: _U16, P_AUTH_METHOD: _UTF8,
    P_AUTH_DATA: _BINARY, P_REQUEST_PROBLEM_INFO: _BYTE, P_WILL_DELAY: _U32,
    P_REQUEST_RESPONSE_INFO: _BYTE, 0x1A: _UTF8, P_SERVER_REFERENCE: _UTF8,
    P_REASON_STRING: _UTF8, P_RECEIVE_MAXIMUM: _U16, P_TOPIC_ALIAS_MAXIMUM: _U16,
    P_TOPIC_ALIAS: _U16, P_MAXIMUM_QOS: _BYTE, P_RETAIN_AVAILABLE: _BYTE,
    P_USER_PROPERTY: _PAIR, P_MAXIMUM_PACKET_SIZE: _U32,
    P_WILDCARD_SUBSCRIPTION_AVAILABLE: _BYTE, P_SUBSCRIPTION_IDS_AVAILABLE: _BYTE,
    P_SHARED_SUBSCRIPTION_AVAILABLE: _BYTE,
}
_REPEATABLE = {P_USER_PROPERTY, P_SUBSCRIPTION_ID}
_ZERO_OR_ONE = {P_PAYLOAD_FORMAT, P_REQUEST_PROBLEM_INFO, P_REQUEST_RESPONSE_INFO}
_NONZERO = {P_RECEIVE_MAXIMUM, P_MAXIMUM_PACKET_SIZE}
# Which properties a client may put in each packet; anything else is a protocol error.
CONNECT_PROPERTIES = frozenset({
    P_SESSION_EXPIRY, P_RECEIVE_MAXIMUM, P_MAXIMUM_PACKET_SIZE, P_TOPIC_ALIAS_MAXIMUM,
    P_REQUEST_RESPONSE_INFO, P_REQUEST_PROBLEM_INFO, P_USER_PROPERTY, P_AUTH_METHOD,
    P_AUTH_DATA,
})
WILL_PROPERTIES = frozenset({
    P_WILL_DELAY, P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_CONTENT_TYPE, P_RESPONSE_TOPIC,
    P_CORRELATION_DATA, P_USER_PROPERTY,
})
PUBLISH_PROPERTIES = frozenset({
    P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_TOPIC_ALIAS, P_RESPONSE_TOPIC, P_CORRELATION_DATA,
    P_USER_PROPERTY, P_CONTENT_TYPE,
})
ACK_PROPERTIES = frozenset({P_REASON_STRING, P_USER_PROPERTY})
SUBSCRIBE_PROPERTIES = frozenset({P_SUBSCRIPTION_ID, P_USER_PROPERTY})
UNSUBSCRIBE_PROPERTIES = frozenset({P_USER_PROPERTY})
DISCONNECT_PROPERTIES = frozenset({
    P_SESSION_EXPIRY, P_REASON_STRING, P_USER_PROPERTY, P_SERVER_REFERENCE,
})
# Forwarded to subscribers as published; Message Expiry is re-sent as the time left.
FORWARDED_PROPERTIES = frozenset({
    P_PAYLOAD_FORMAT, P_CONTENT_TYPE, P_RESPONSE_TOPIC, P_CORRELATION_DATA, P_USER_PROPERTY,
})
# Fixed-header flags that packets other than PUBLISH must carry (MQTT 5.0 section 2.1.3).
REQUIRED_FLAGS = {PUBREL: 0b0010, SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010}

Properties = list[tuple[int, Any]]


class Reject(Exception):
    """Ends one connection: ``reason`` is the v5 reason code sent before closing it.
    ``reply``, when given, is written first: a CONNACK with a 3.1.1 return code."""

    def __init__(self, reason: int, detail: str, *, reply: bytes = b"") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.reply = reply




class Reader:
    """Cursor over one packet's body; running off its end means the packet is malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Reject(RC_MALFORMED, "packet shorter than its fields")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            digit = self.byte()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
        raise Reject(RC_MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self) -> str:
        try:
            text = self.binary().decode("utf-8")  # strict: also refuses UTF-16 surrogates
        except UnicodeDecodeError:
            raise Reject(RC_MALFORMED, "string is not valid UTF-8") from None
        if "\x00" in text:
            raise Reject(RC_MALFORMED, "string contains U+0000")
        return text

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def properties(self, allowed: frozenset[int]) -> Properties:
        end = self.varint() + self.pos
        if end > len(self.data):
            raise Reject(RC_MALFORMED, "property length runs past the packet")
        found: Properties = []
        seen: set[int] = set()
        while self.pos < end:
            pid = self.varint()
            kind = _PROPERTY_TYPES.get(pid)
            if kind is None:
                raise Reject(RC_MALFORMED, f"unknown property 0x{pid:02x}")
            if pid not in allowed:
                raise Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} not allowed here")
            if pid in seen and pid not in _REPEATABLE:
                raise Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} repeated")
            seen.add(pid)
            value = self._property_value(kind)
            if (pid in _ZERO_OR_ONE and value > 1) or (pid in _NONZERO and value == 0):
                raise Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} has value {value}")
            if pid == P_RESPONSE_TOPIC and not valid_topic_name(value):
                raise Reject(RC_PROTOCOL_ERROR, "response topic is not a valid topic name")
            found.append((pid, value))
        if self.pos != end:
            raise Reject(RC_MALFORMED, "property overruns its length")
        return found

    def _property_value(self, kind: int) -> Any:
        if kind == _BYTE:
            return self.byte()
        if kind == _U16:
            return self.u16()
        if kind == _U32:
            return self.u32()
        if kind == _VARINT:
            return self.varint()
        if kind == _UTF8:
            return self.utf8()
        if kind == _BINARY:
            return self.binary()
        return (self.utf8(), self.utf8())


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        digit, value = value & 0x7F, value >> 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_properties(properties: Properties) -> bytes:
    body = bytearray()
    for pid, value in properties:
        body.append(pid)  # every identifier is below 128: a one-byte varint
        kind = _PROPERTY_TYPES[pid]
        if kind == _BYTE:
            body.append(value)
        elif kind == _U16:
            body += value.to_bytes(2, "big")
        elif kind == _U32:
            body += value.to_bytes(4, "big")
        elif kind == _VARINT:
            body += encode_varint(value)
        elif kind == _UTF8:
            body += encode_string(value)
        elif kind == _BINARY:
            body += len(value).to_bytes(2, "big") + value
        else:
            body += encode_string(value[0]) + encode_string(value[1])
    return encode_varint(len(body)) + body


def encode_packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def remaining_length(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(remaining length, offset of the body), or None while the header is incomplete."""
    value = 0
    for index in range(4):
        if start + index >= len(buffer):
            return None
        digit = buffer[start + index]
        value |= (digit & 0x7F) << (7 * index)
        if not digit & 0x80:
            return value, start + index + 1
    raise Reject(RC_MALFORMED, "remaining length longer than 4 bytes")
