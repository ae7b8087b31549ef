"""Embedded MQTT 3.1.1 + 5.0 broker, for the quickstart and tests where Mosquitto is missing.

What it is for: a new user can try edge-agent without root and without installing a broker.
``EmbeddedBroker`` speaks MQTT 3.1.1 (protocol level 4) and MQTT 5.0 (level 5) on one
listener: QoS 0 and 1, retained messages, ``+``/``#`` wildcards (``$``-topics are not matched
by a leading wildcard), ``$share/<group>/<filter>`` shared subscriptions balanced round-robin,
the v5 subscription options (No Local, Retain As Published, Retain Handling), v5 message
properties forwarded unchanged (Message Expiry counts down), persistent sessions with a
bounded QoS 1 queue, redelivery with DUP, wills with the v5 Will Delay Interval, keepalive
enforcement (1.5 x) and session takeover.

What it must not do: face a network. There is NO AUTHENTICATION (every client is anonymous;
a username or password is accepted and ignored), no TLS and no ACLs, so it binds to loopback
by default and warns when told otherwise. All state lives in memory: sessions, queued and
retained messages survive ``stop()``/``start()`` of the same object (wills still waiting for
their delay do not) but not the process. For a real fleet use Mosquitto or any MQTT 5
broker; the agent speaks plain MQTT to either.

Deliberate limits, each answered the way the spec asks:
- QoS 2. MQTT 5 clients are told Maximum QoS 1 in CONNACK, so a QoS 2 PUBLISH from them is a
  protocol violation answered with DISCONNECT 0x9B (QoS not supported), and a QoS 2 Will with
  CONNACK 0x9B. MQTT 3.1.1 has no such signal, so a 3.1.1 QoS 2 PUBLISH gets the full
  PUBREC/PUBREL/PUBCOMP exchange and is forwarded exactly once, at most at QoS 1.
  Subscriptions asking for QoS 2 are granted QoS 1.
- No topic aliases (Topic Alias Maximum 0), no subscription identifiers, no enhanced
  authentication (AUTH), no $SYS topics.
- A malformed packet closes only its own connection (after DISCONNECT 0x81 / 0x82 / 0x95 to
  a v5 client); packets larger than ``max_packet_size`` (before CONNECT: ``CONNECT_MAX_BYTES``)
  are refused from their fixed header, before any buffer is allocated for them.

Memory is bounded, because it ships with the quickstart and a client can be hostile or just
gone (400 QoS 1 messages of 1 MiB to an offline session once took 435 MiB):
- Per session, QoS 1 messages queued plus in flight hold at most ``max_session_bytes``
  (and ``max_queued`` messages). Past it the oldest queued message is dropped; when only
  unacknowledged in-flight ones are left, the new message is dropped instead. Each drop is
  counted and logged (``broker_queue_full``), never silent.
- At most ``max_connections`` sockets, counting those that have not sent CONNECT yet; one
  more is closed as soon as it is accepted (``broker_connection_refused``).
- At most ``max_retained`` retained topics holding ``max_retained_bytes``. A retained
  PUBLISH past either is refused whole, neither stored nor forwarded: PUBACK 0x97 (Quota
  exceeded) to a v5 client, a logged drop for 3.1.1, which has no negative PUBACK.
  Replacing or deleting a stored topic is always accepted within the byte budget.
- A client that asked for keepalive 0 ("never check") is closed after ``max_idle_s``
  without a packet, with DISCONNECT 0x8D like a keepalive timeout.
Not bounded: the number of offline persistent sessions (each within its byte cap) and
subscriptions per session.

Concurrency: one asyncio event loop. Every packet is handled synchronously inside
``data_received``, so broker state needs no locks; timers (keepalive, session expiry, will
delay) are loop callbacks. ``run_in_thread()`` runs that loop in a daemon thread for callers
that are not async (tests, the fleet controller).

Run it alone with ``python -m agent.fleet.broker --port 1883 [--host 127.0.0.1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import threading
import uuid
from collections import deque
from typing import Any

from agent.errors import BrokerError, EdgeAgentError
from agent.log import configure_logging, get_logger
from agent.mqtt.topics import filter_matches, is_valid_filter

log = get_logger("agent.fleet.broker")

__all__ = ["EmbeddedBroker", "topic_matches", "valid_topic_filter", "main"]

MQTT_311 = 4
MQTT_5 = 5
DEFAULT_MAX_PACKET_SIZE = 1 << 20
# QoS 1 messages waiting per session beyond the in-flight window (offline, or online and
# not keeping up), oldest dropped past it: a device that never comes back cannot exhaust
# memory. Same meaning and value as max_queued_messages in the project's Mosquitto config.
DEFAULT_MAX_QUEUED = 10000
# Bytes one session may hold in QoS 1 messages, queued plus in flight: sixteen maximum-size
# packets, far more than a device's status/meta/events or a controller's replies pile up.
DEFAULT_MAX_SESSION_BYTES = 16 << 20
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_RETAINED = 10000
DEFAULT_MAX_RETAINED_BYTES = 64 << 20
# A keepalive-0 client is closed after this long without a packet.
DEFAULT_MAX_IDLE_S = 300.0
# CONNECT carries a client id, a will and credentials; until a client is accepted it may not
# make the broker buffer a full max_packet_size (times max_connections).
CONNECT_MAX_BYTES = 64 << 10
# Unacknowledged QoS 1 sends per client; a v5 client's Receive Maximum can only lower it.
DEFAULT_MAX_INFLIGHT = 100
# A subscriber whose socket buffer grows past this is not reading: QoS 0 to it is dropped
# (as the spec allows), QoS 1 waits behind the in-flight window instead of piling up here.
WRITE_BUFFER_LIMIT = 8 << 20
CONNECT_TIMEOUT_S = 10.0
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
_CONNECT_PROPERTIES = frozenset({
    P_SESSION_EXPIRY, P_RECEIVE_MAXIMUM, P_MAXIMUM_PACKET_SIZE, P_TOPIC_ALIAS_MAXIMUM,
    P_REQUEST_RESPONSE_INFO, P_REQUEST_PROBLEM_INFO, P_USER_PROPERTY, P_AUTH_METHOD,
    P_AUTH_DATA,
})
_WILL_PROPERTIES = frozenset({
    P_WILL_DELAY, P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_CONTENT_TYPE, P_RESPONSE_TOPIC,
    P_CORRELATION_DATA, P_USER_PROPERTY,
})
_PUBLISH_PROPERTIES = frozenset({
    P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_TOPIC_ALIAS, P_RESPONSE_TOPIC, P_CORRELATION_DATA,
    P_USER_PROPERTY, P_CONTENT_TYPE,
})
_ACK_PROPERTIES = frozenset({P_REASON_STRING, P_USER_PROPERTY})
_SUBSCRIBE_PROPERTIES = frozenset({P_SUBSCRIPTION_ID, P_USER_PROPERTY})
_UNSUBSCRIBE_PROPERTIES = frozenset({P_USER_PROPERTY})
_DISCONNECT_PROPERTIES = frozenset({
    P_SESSION_EXPIRY, P_REASON_STRING, P_USER_PROPERTY, P_SERVER_REFERENCE,
})
# Forwarded to subscribers as published; Message Expiry is re-sent as the time left.
_FORWARDED_PROPERTIES = frozenset({
    P_PAYLOAD_FORMAT, P_CONTENT_TYPE, P_RESPONSE_TOPIC, P_CORRELATION_DATA, P_USER_PROPERTY,
})
# Fixed-header flags that packets other than PUBLISH must carry (MQTT 5.0 section 2.1.3).
_REQUIRED_FLAGS = {PUBREL: 0b0010, SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010}

Properties = list[tuple[int, Any]]


class _Reject(Exception):
    """Ends one connection: ``reason`` is the v5 reason code sent before closing it."""

    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------- wire format


class _Reader:
    """Cursor over one packet's body; running off its end means the packet is malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Reject(RC_MALFORMED, "packet shorter than its fields")
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
        raise _Reject(RC_MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self) -> str:
        try:
            text = self.binary().decode("utf-8")  # strict: also refuses UTF-16 surrogates
        except UnicodeDecodeError:
            raise _Reject(RC_MALFORMED, "string is not valid UTF-8") from None
        if "\x00" in text:
            raise _Reject(RC_MALFORMED, "string contains U+0000")
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
            raise _Reject(RC_MALFORMED, "property length runs past the packet")
        found: Properties = []
        seen: set[int] = set()
        while self.pos < end:
            pid = self.varint()
            kind = _PROPERTY_TYPES.get(pid)
            if kind is None:
                raise _Reject(RC_MALFORMED, f"unknown property 0x{pid:02x}")
            if pid not in allowed:
                raise _Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} not allowed here")
            if pid in seen and pid not in _REPEATABLE:
                raise _Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} repeated")
            seen.add(pid)
            value = self._property_value(kind)
            if (pid in _ZERO_OR_ONE and value > 1) or (pid in _NONZERO and value == 0):
                raise _Reject(RC_PROTOCOL_ERROR, f"property 0x{pid:02x} has value {value}")
            if pid == P_RESPONSE_TOPIC and not valid_topic_name(value):
                raise _Reject(RC_PROTOCOL_ERROR, "response topic is not a valid topic name")
            found.append((pid, value))
        if self.pos != end:
            raise _Reject(RC_MALFORMED, "property overruns its length")
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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        digit, value = value & 0x7F, value >> 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _encode_properties(properties: Properties) -> bytes:
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
            body += _varint(value)
        elif kind == _UTF8:
            body += _string(value)
        elif kind == _BINARY:
            body += len(value).to_bytes(2, "big") + value
        else:
            body += _string(value[0]) + _string(value[1])
    return _varint(len(body)) + body


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def _remaining_length(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(remaining length, offset of the body), or None while the header is incomplete."""
    value = 0
    for index in range(4):
        if start + index >= len(buffer):
            return None
        digit = buffer[start + index]
        value |= (digit & 0x7F) << (7 * index)
        if not digit & 0x80:
            return value, start + index + 1
    raise _Reject(RC_MALFORMED, "remaining length longer than 4 bytes")


# ---------------------------------------------------------------------------- topics


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """The contract's filter syntax without its ban on ``$`` filters: to a broker
    ``$SYS/#`` is plain MQTT (only a leading wildcard must not match such topics)."""
    if topic_filter.startswith("$"):
        # '$' is an ordinary character to the syntax: check the same shape without it.
        return is_valid_filter("x" + topic_filter[1:])
    return is_valid_filter(topic_filter)


def _split_shared(full_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> (group, filter); a plain filter -> (None, filter)."""
    if not full_filter.startswith("$share/"):
        if not valid_topic_filter(full_filter):
            raise ValueError(full_filter)
        return None, full_filter
    parts = full_filter.split("/", 2)
    if len(parts) != 3 or not parts[1] or any(c in parts[1] for c in "+#"):
        raise ValueError(full_filter)
    if not valid_topic_filter(parts[2]):
        raise ValueError(full_filter)
    return parts[1], parts[2]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; a filter starting with a wildcard does not match a ``$`` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return filter_matches(topic_filter, topic)


# ---------------------------------------------------------------------------- state


class _Message:
    """One application message as published; its encoded topic and properties are kept
    so fan-out to many subscribers does not re-encode them."""

    __slots__ = ("topic", "payload", "qos", "retain", "properties", "expires_at", "origin",
                 "topic_wire", "properties_wire", "size")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties, expires_at: float | None, origin: str | None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.origin = origin
        self.topic_wire = _string(topic)
        self.properties_wire = _encode_properties(properties)
        self.size = len(payload) + len(self.topic_wire) + len(self.properties_wire)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _message(topic: str, payload: bytes, qos: int, retain: bool, properties: Properties,
             origin: str | None, now: float) -> _Message:
    expires_at = None
    forwarded: Properties = []
    for pid, value in properties:
        if pid == P_MESSAGE_EXPIRY:
            expires_at = now + value
        elif pid in _FORWARDED_PROPERTIES:
            forwarded.append((pid, value))
    return _Message(topic, payload, qos, retain, forwarded, expires_at, origin)


class _Will:
    __slots__ = ("topic", "payload", "qos", "retain", "properties", "delay_s")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.delay_s = next((v for p, v in properties if p == P_WILL_DELAY), 0)


class _Session:
    """What outlives a connection: subscriptions, queued and unacknowledged QoS 1 messages."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.expiry_s: int | None = 0  # None: never expires
        self.subscriptions: dict[str, _Subscription] = {}  # by full filter, $share prefix kept
        self.pending: deque[tuple[_Message, bool]] = deque()
        self.inflight: dict[int, tuple[_Message, bool]] = {}
        self.held_bytes = 0  # sizes of the messages in pending and inflight
        self.awaiting_release: set[int] = set()  # 3.1.1 QoS 2 ids between PUBREC and PUBREL
        self.connection: _Connection | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self._last_packet_id = 0

    def next_packet_id(self) -> int:
        while True:
            self._last_packet_id = self._last_packet_id % 0xFFFF + 1
            if self._last_packet_id not in self.inflight:
                return self._last_packet_id

    def cancel_timers(self) -> None:
        for timer in (self.expiry_timer, self.will_timer):
            if timer is not None:
                timer.cancel()
        self.expiry_timer = self.will_timer = None


class _Subscription:
    __slots__ = ("session", "topic_filter", "share_group", "qos", "no_local",
                 "retain_as_published", "retain_handling")

    def __init__(self, session: _Session, topic_filter: str, share_group: str | None,
                 options: int) -> None:
        self.session = session
        self.topic_filter = topic_filter
        self.share_group = share_group
        self.qos = min(options & 0x03, 1)
        self.no_local = bool(options & 0x04)
        self.retain_as_published = bool(options & 0x08)
        self.retain_handling = (options >> 4) & 0x03


class _SharedGroup:
    """Members of one ``$share/<group>/<filter>``; each message goes to the next one."""

    __slots__ = ("members", "cursor")

    def __init__(self) -> None:
        self.members: dict[str, _Subscription] = {}
        self.cursor = 0

    def pick(self) -> _Subscription:
        members = list(self.members.values())
        count = len(members)
        # Prefer a connected member; with none connected, queue to the next in turn.
        for step in range(count):
            index = (self.cursor + step) % count
            if members[index].session.connection is not None:
                self.cursor = index + 1
                return members[index]
        chosen = members[self.cursor % count]
        self.cursor += 1
        return chosen


class _FilterEntry:
    """Everyone subscribed to one topic filter: plain subscribers and shared groups."""

    __slots__ = ("topic_filter", "plain", "groups")

    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self.plain: dict[str, _Subscription] = {}
        self.groups: dict[str, _SharedGroup] = {}


# ---------------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One client socket: frames and parses packets, encodes replies. Semantics (sessions,
    routing) live in ``EmbeddedBroker``."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.loop = broker._loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.version = 0  # protocol level once CONNECT is parsed
        self.session: _Session | None = None  # set once CONNACK is sent
        self.will: _Will | None = None
        self.keepalive_s = 0
        self.last_received = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.send_quota = broker.max_inflight
        self.max_packet_out: int | None = None
        self.closed = False
        self.peer = ""

    # asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str(transport.get_extra_info("peername"))
        if len(self.broker._connections) >= self.broker.max_connections:
            # Before CONNECT there is no protocol version to answer in: just close.
            self.closed = True
            self.broker._refused_connections += 1
            refused = self.broker._refused_connections
            if refused == 1 or refused % 1000 == 0:
                log.warning("broker_connection_refused", peer=self.peer, refused=refused,
                            limit=self.broker.max_connections)
            transport.abort()
            return
        self.last_received = self.loop.time()
        self.timer = self.loop.call_later(self.broker.connect_timeout_s, self._connect_timeout)
        self.broker._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.loop.time()
        buffer = self.buffer
        buffer += data
        position = 0
        try:
            while len(buffer) - position >= 2:
                header = _remaining_length(buffer, position + 1)
                if header is None:
                    break
                length, body_start = header
                end = body_start + length
                limit = self.broker.max_packet_size
                if self.session is None:
                    limit = min(limit, CONNECT_MAX_BYTES)
                if end - position > limit:
                    raise _Reject(RC_PACKET_TOO_LARGE, f"packet of {end - position} bytes")
                if end > len(buffer):
                    break
                first_byte = buffer[position]
                body = bytes(buffer[body_start:end])
                position = end
                self._handle(first_byte >> 4, first_byte & 0x0F, body)
                if self.closed:
                    return
        except _Reject as rejection:
            log.warning("broker_client_rejected", client_id=self.client_id, peer=self.peer,
                        reason=f"0x{rejection.reason:02x}", detail=rejection.detail)
            self.close(rejection.reason)
            return
        except Exception:
            log.exception("broker_internal_error", client_id=self.client_id, peer=self.peer)
            self.close(RC_UNSPECIFIED)
            return
        del buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()  # no-op after a close we started; an abnormal end otherwise

    # sending ----------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        return self.session.client_id if self.session else None

    def send(self, data: bytes) -> None:
        # is_closing: the peer may be gone before connection_lost has run.
        if not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def congested(self) -> bool:
        return self.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT

    def send_publish(self, message: _Message, qos: int, retain: bool, packet_id: int,
                     dup: bool) -> bool:
        """Write one PUBLISH; False when it must not go (expired, too big for the client)."""
        body = bytearray(message.topic_wire)
        if qos:
            body += packet_id.to_bytes(2, "big")
        if self.version == MQTT_5:
            if message.expires_at is None:
                body += message.properties_wire
            else:
                remaining = message.expires_at - self.loop.time()
                if remaining <= 0 and not dup:
                    return False
                left = max(0, math.ceil(remaining))
                body += _encode_properties([(P_MESSAGE_EXPIRY, left), *message.properties])
        body += message.payload
        packet = _packet(0x30 | dup << 3 | qos << 1 | retain, body)
        if self.max_packet_out is not None and len(packet) > self.max_packet_out:
            return False  # the spec says discard: the client told us it cannot take it
        self.send(packet)
        return True

    def close(self, reason: int | None = None, *, publish_will: bool = True,
              end_session: bool = True) -> None:
        """Close once. ``reason`` goes to a v5 client as DISCONNECT (or CONNACK before it
        was accepted); the will is published unless the client disconnected cleanly."""
        if self.closed:
            return
        self.closed = True
        if reason is not None and self.version == MQTT_5 and self.transport is not None:
            if self.session is not None:
                self.transport.write(_packet(DISCONNECT << 4, bytes((reason, 0))))
            elif reason >= 0x80:
                self.transport.write(_packet(CONNACK << 4, bytes((0, reason, 0))))
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()
        self.broker._connection_ended(self, publish_will, end_session)

    # timers -----------------------------------------------------------------

    def _connect_timeout(self) -> None:
        if self.session is None:
            log.info("broker_connect_timeout", peer=self.peer)
            self.close()

    def start_keepalive(self) -> None:
        self.timer.cancel()
        self.timer = self.loop.call_later(self._idle_limit_s(), self._check_keepalive)

    def _idle_limit_s(self) -> float:
        # Keepalive 0 means "never check" to the spec; here it means max_idle_s, or an idle
        # socket would hold its slot and session forever.
        return self.keepalive_s * 1.5 if self.keepalive_s else self.broker.max_idle_s

    def _check_keepalive(self) -> None:
        limit = self._idle_limit_s()
        idle = self.loop.time() - self.last_received
        if idle >= limit:
            log.info("broker_keepalive_timeout", client_id=self.client_id,
                     keepalive_s=self.keepalive_s, idle_s=round(idle, 1))
            self.close(RC_KEEP_ALIVE_TIMEOUT)
        else:
            self.timer = self.loop.call_later(limit - idle, self._check_keepalive)

    # packets ----------------------------------------------------------------

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind != PUBLISH and flags != _REQUIRED_FLAGS.get(kind, 0):
            raise _Reject(RC_MALFORMED, f"packet type {kind} with flags {flags:#06b}")
        if self.session is None:
            if kind != CONNECT:
                raise _Reject(RC_PROTOCOL_ERROR, "first packet is not CONNECT")
            self._on_connect(body)
        elif kind == PUBLISH:
            self._on_publish(flags, body)
        elif kind == PUBACK:
            self._on_puback(body)
        elif kind == PUBREL:
            self._on_pubrel(body)
        elif kind == SUBSCRIBE:
            self._on_subscribe(body)
        elif kind == UNSUBSCRIBE:
            self._on_unsubscribe(body)
        elif kind == PINGREQ:
            if body:
                raise _Reject(RC_MALFORMED, "PINGREQ with a body")
            self.send(b"\xd0\x00")
        elif kind == DISCONNECT:
            self._on_disconnect(body)
        else:  # a second CONNECT, PUBREC/PUBCOMP (we never send QoS 2), AUTH, server packets
            raise _Reject(RC_PROTOCOL_ERROR, f"unexpected packet type {kind}")

    def _on_connect(self, body: bytes) -> None:
        reader = _Reader(body)
        name = reader.utf8()
        level = reader.byte()
        if name != "MQTT" or level not in (MQTT_311, MQTT_5):
            if name in ("MQTT", "MQIsdp"):  # an MQTT client, just another version
                self.send(bytes((CONNACK << 4, 2, 0, 0x01)))  # 3.1.1: unacceptable version
            raise _Reject(RC_UNSUPPORTED_VERSION, f"protocol {name!r} level {level}")
        self.version = level
        flags = reader.byte()
        will_flag, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, bool(flags & 0x20)
        if flags & 0x01 or will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise _Reject(RC_MALFORMED, f"CONNECT flags {flags:#010b}")
        if level == MQTT_311 and flags & 0x40 and not flags & 0x80:
            raise _Reject(RC_MALFORMED, "password without user name")
        clean_start = bool(flags & 0x02)
        keepalive_s = reader.u16()
        properties = reader.properties(_CONNECT_PROPERTIES) if level == MQTT_5 else []
        client_id = reader.utf8()
        will = None
        if will_flag:
            will_properties = reader.properties(_WILL_PROPERTIES) if level == MQTT_5 else []
            will_topic = reader.utf8()
            will = _Will(will_topic, reader.binary(), will_qos, will_retain, will_properties)
            if not valid_topic_name(will_topic):
                raise _Reject(RC_TOPIC_NAME_INVALID, f"will topic {will_topic!r}")
        if flags & 0x80:
            reader.utf8()  # user name: accepted and ignored (no authentication)
        if flags & 0x40:
            reader.binary()
        if not reader.at_end():
            raise _Reject(RC_MALFORMED, "bytes after the CONNECT payload")
        found = dict(properties)
        if P_AUTH_METHOD in found:
            raise _Reject(RC_BAD_AUTH_METHOD, "enhanced authentication is not supported")
        if level == MQTT_5 and will_qos == 2:
            raise _Reject(RC_QOS_NOT_SUPPORTED, "will QoS 2 (Maximum QoS is 1)")
        if level == MQTT_311:
            expiry_s = 0 if clean_start else None
            if not client_id and not clean_start:
                self.send(bytes((CONNACK << 4, 2, 0, 0x02)))  # identifier rejected
                raise _Reject(RC_CLIENT_ID_INVALID, "empty client id with clean_session=0")
        else:
            expiry = found.get(P_SESSION_EXPIRY, 0)
            expiry_s = None if expiry == NEVER_EXPIRES else expiry
            self.send_quota = min(self.send_quota, found.get(P_RECEIVE_MAXIMUM, 0xFFFF))
            self.max_packet_out = found.get(P_MAXIMUM_PACKET_SIZE)
        self.keepalive_s = keepalive_s
        self.will = will
        self.broker._accept(self, client_id, clean_start, expiry_s)

    def send_connack(self, session_present: bool, assigned_id: str | None) -> None:
        if self.version == MQTT_311:
            self.send(bytes((CONNACK << 4, 2, int(session_present), 0)))
            return
        properties: Properties = [
            (P_MAXIMUM_QOS, 1), (P_RETAIN_AVAILABLE, 1), (P_SHARED_SUBSCRIPTION_AVAILABLE, 1),
            (P_WILDCARD_SUBSCRIPTION_AVAILABLE, 1), (P_TOPIC_ALIAS_MAXIMUM, 0),
            (P_SUBSCRIPTION_IDS_AVAILABLE, 0),
            (P_MAXIMUM_PACKET_SIZE, self.broker.max_packet_size),
        ]
        if assigned_id is not None:
            properties.append((P_ASSIGNED_CLIENT_ID, assigned_id))
        body = bytes((int(session_present), RC_SUCCESS)) + _encode_properties(properties)
        self.send(_packet(CONNACK << 4, body))

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3 or (qos == 0 and flags & 0x08):
            raise _Reject(RC_MALFORMED, f"PUBLISH flags {flags:#06b}")
        reader = _Reader(body)
        topic = reader.utf8()
        packet_id = reader.u16() if qos else 0
        if qos and not packet_id:
            raise _Reject(RC_MALFORMED, "packet identifier 0")
        properties = reader.properties(_PUBLISH_PROPERTIES) if self.version == MQTT_5 else []
        if any(pid == P_TOPIC_ALIAS for pid, _ in properties):
            raise _Reject(RC_TOPIC_ALIAS_INVALID, "topic aliases are not supported (maximum 0)")
        if not valid_topic_name(topic):
            raise _Reject(RC_TOPIC_NAME_INVALID, f"topic name {topic!r}")
        if qos == 2 and self.version == MQTT_5:
            raise _Reject(RC_QOS_NOT_SUPPORTED, "QoS 2 PUBLISH (Maximum QoS is 1)")
        message = _message(topic, reader.rest(), qos, retain, properties,
                           self.session.client_id, self.loop.time())
        id_bytes = packet_id.to_bytes(2, "big")
        if qos == 2:
            # 3.1.1 exactly-once: forward on first receipt, ignore resends until PUBREL.
            if packet_id not in self.session.awaiting_release:
                self.session.awaiting_release.add(packet_id)
                self.broker._publish(message)
            self.send(bytes((PUBREC << 4, 2)) + id_bytes)
            return
        accepted = self.broker._publish(message)
        if qos == 1:
            if accepted or self.version != MQTT_5:
                self.send(bytes((PUBACK << 4, 2)) + id_bytes)
            else:
                self.send(bytes((PUBACK << 4, 3)) + id_bytes + bytes((RC_QUOTA_EXCEEDED,)))

    def _read_ack(self, body: bytes) -> int:
        reader = _Reader(body)
        packet_id = reader.u16()
        if self.version == MQTT_5 and not reader.at_end():
            reader.byte()  # reason code: a refusal by the client still completes the flow
            if not reader.at_end():
                reader.properties(_ACK_PROPERTIES)
        if not reader.at_end():
            raise _Reject(RC_MALFORMED, "bytes after an acknowledgement")
        return packet_id

    def _on_puback(self, body: bytes) -> None:
        self.broker._acknowledged(self.session, self._read_ack(body))

    def _on_pubrel(self, body: bytes) -> None:
        packet_id = self._read_ack(body)
        id_bytes = packet_id.to_bytes(2, "big")
        if packet_id in self.session.awaiting_release:
            self.session.awaiting_release.discard(packet_id)
            self.send(bytes((PUBCOMP << 4, 2)) + id_bytes)
        elif self.version == MQTT_5:
            self.send(bytes((PUBCOMP << 4, 3)) + id_bytes + bytes((RC_PACKET_ID_NOT_FOUND,)))
        else:
            self.send(bytes((PUBCOMP << 4, 2)) + id_bytes)

    def _on_subscribe(self, body: bytes) -> None:
        reader = _Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise _Reject(RC_MALFORMED, "packet identifier 0")
        if self.version == MQTT_5:
            if any(pid == P_SUBSCRIPTION_ID for pid, _ in reader.properties(_SUBSCRIBE_PROPERTIES)):
                raise _Reject(RC_SUBSCRIPTION_IDS_NOT_SUPPORTED, "subscription identifier")
        requests: list[tuple[str, int]] = []
        while not reader.at_end():
            topic_filter, options = reader.utf8(), reader.byte()
            reserved = 0xC0 if self.version == MQTT_5 else 0xFC
            if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
                raise _Reject(RC_MALFORMED, f"subscription options {options:#010b}")
            requests.append((topic_filter, options))
        if not requests:
            raise _Reject(RC_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes, retained_for = self.broker._subscribe(self.session, requests, self.version)
        properties = b"\x00" if self.version == MQTT_5 else b""
        self.send(_packet(SUBACK << 4, packet_id.to_bytes(2, "big") + properties + bytes(codes)))
        for subscription in retained_for:  # after SUBACK, as the spec orders
            self.broker._send_retained(subscription)

    def _on_unsubscribe(self, body: bytes) -> None:
        reader = _Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise _Reject(RC_MALFORMED, "packet identifier 0")
        if self.version == MQTT_5:
            reader.properties(_UNSUBSCRIBE_PROPERTIES)
        filters = []
        while not reader.at_end():
            filters.append(reader.utf8())
        if not filters:
            raise _Reject(RC_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        codes = [self.broker._unsubscribe(self.session, f) for f in filters]
        id_bytes = packet_id.to_bytes(2, "big")
        if self.version == MQTT_5:
            self.send(_packet(UNSUBACK << 4, id_bytes + b"\x00" + bytes(codes)))
        else:
            self.send(_packet(UNSUBACK << 4, id_bytes))

    def _on_disconnect(self, body: bytes) -> None:
        if self.version == MQTT_311:
            if body:
                raise _Reject(RC_MALFORMED, "DISCONNECT with a body")
            self.close(publish_will=False)
            return
        reader = _Reader(body)
        reason = reader.byte() if body else RC_SUCCESS
        properties = dict(reader.properties(_DISCONNECT_PROPERTIES)) if len(body) > 1 else {}
        if not reader.at_end():
            raise _Reject(RC_MALFORMED, "bytes after DISCONNECT properties")
        if P_SESSION_EXPIRY in properties:
            expiry = properties[P_SESSION_EXPIRY]
            if self.session.expiry_s == 0 and expiry != 0:
                raise _Reject(RC_PROTOCOL_ERROR, "session expiry raised from 0 at DISCONNECT")
            self.session.expiry_s = None if expiry == NEVER_EXPIRES else expiry
        # Only "normal disconnection" (0x00) discards the will; 0x04 and errors publish it.
        self.close(publish_will=reason != RC_SUCCESS)


# ---------------------------------------------------------------------------- broker


class EmbeddedBroker:
    """In-memory MQTT 3.1.1/5.0 broker. ``await start()`` returns the bound port (pass
    ``port=0`` for a free one); ``run_in_thread()``/``stop_thread()`` do the same from
    synchronous code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_retained: int = DEFAULT_MAX_RETAINED,
                 max_retained_bytes: int = DEFAULT_MAX_RETAINED_BYTES,
                 max_idle_s: float = DEFAULT_MAX_IDLE_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.max_packet_size = max_packet_size
        self.max_queued = max_queued
        self.max_inflight = max_inflight
        self.max_session_bytes = max_session_bytes
        self.max_connections = max_connections
        self.max_retained = max_retained
        self.max_retained_bytes = max_retained_bytes
        self.max_idle_s = max_idle_s
        self.connect_timeout_s = connect_timeout_s
        self._refused_connections = 0
        self._refused_retained = 0
        self._retained_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._exact: dict[str, _FilterEntry] = {}  # filters without wildcards: one dict lookup
        self._wildcard: dict[str, _FilterEntry] = {}
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # lifecycle --------------------------------------------------------------

    async def start(self) -> int:
        if self._server is not None:
            raise BrokerError("the embedded broker is already running", port=self.port)
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise BrokerError(
                f"the embedded broker cannot listen on {self.host}:{self.port}: {exc.strerror};"
                " pick another --port or stop what is using it",
                host=self.host, port=self.port) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        for session in self._sessions.values():  # sessions kept across stop()/start()
            if session.connection is None and session.expiry_s is not None:
                session.expiry_timer = self._loop.call_later(
                    session.expiry_s, self._expire_session, session)
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("broker_not_loopback", host=self.host,
                        detail="no authentication: any client that can reach it may connect")
        log.info("broker_started", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close(RC_SERVER_SHUTTING_DOWN, publish_will=False, end_session=False)
        for session in self._sessions.values():
            session.cancel_timers()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let transports run connection_lost before the loop may close
        self._server = None
        log.info("broker_stopped", port=self.port)

    def run_in_thread(self) -> int:
        """Start on a private event loop in a daemon thread; returns the port."""
        started = threading.Event()
        outcome: list[Any] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            try:
                outcome.append(loop.run_until_complete(self.start()))
            except BaseException as exc:  # handed to the caller below
                outcome.append(exc)
                loop.close()
                started.set()
                return
            self._thread_loop = loop
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="embedded-broker", daemon=True)
        self._thread.start()
        started.wait()
        if isinstance(outcome[0], BaseException):
            self._thread.join()
            self._thread = None
            raise outcome[0]
        return outcome[0]

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = self._thread_loop = None

    # sessions ---------------------------------------------------------------

    def _accept(self, connection: _Connection, client_id: str, clean_start: bool,
                expiry_s: int | None) -> None:
        assigned_id = None
        if not client_id:
            client_id = assigned_id = f"auto-{uuid.uuid4().hex}"
        session = self._sessions.get(client_id)
        if session is not None:
            if session.connection is not None:
                log.info("broker_session_taken_over", client_id=client_id)
                session.connection.close(RC_SESSION_TAKEN_OVER, end_session=False)
            session.cancel_timers()  # a reconnect cancels session expiry and a delayed will
            if clean_start:
                self._discard_session(session)
                session = None
        session_present = session is not None
        if session is None:
            session = self._sessions[client_id] = _Session(client_id)
        session.expiry_s = expiry_s
        session.connection = connection
        connection.session = session
        connection.send_connack(session_present, assigned_id)
        connection.start_keepalive()
        log.debug("broker_client_connected", client_id=client_id, version=connection.version,
                  session_present=session_present, peer=connection.peer)
        for packet_id, (message, retain) in list(session.inflight.items()):
            if not connection.send_publish(message, 1, retain, packet_id, dup=True):
                # Too big for this connection: discarded as if delivered (MQTT 5 3.1.2.11.4),
                # so it gives back its bytes and its send-quota slot.
                del session.inflight[packet_id]
                session.held_bytes -= message.size
        if session.dropped:
            log.warning("broker_queue_overflowed", client_id=client_id, dropped=session.dropped)
            session.dropped = 0
        self._pump(session)

    def _connection_ended(self, connection: _Connection, publish_will: bool,
                          end_session: bool) -> None:
        self._connections.discard(connection)
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.connection = None
        will, connection.will = connection.will, None
        log.debug("broker_client_disconnected", client_id=session.client_id,
                  will=bool(will and publish_will))
        if will is not None and publish_will:
            delay_s = will.delay_s if session.expiry_s is None else min(will.delay_s,
                                                                         session.expiry_s)
            if delay_s:
                session.will_timer = self._loop.call_later(
                    delay_s, self._publish_will, session, will)
            else:
                self._publish_will(session, will)
        if not end_session:
            return
        if session.expiry_s == 0:
            self._discard_session(session)
        elif session.expiry_s is not None:
            session.expiry_timer = self._loop.call_later(
                session.expiry_s, self._expire_session, session)

    def _publish_will(self, session: _Session, will: _Will) -> None:
        session.will_timer = None
        self._publish(_message(will.topic, will.payload, will.qos, will.retain,
                                      will.properties, session.client_id, self._loop.time()))

    def _expire_session(self, session: _Session) -> None:
        session.expiry_timer = None
        if session.connection is None and self._sessions.get(session.client_id) is session:
            log.debug("broker_session_expired", client_id=session.client_id)
            self._discard_session(session)

    def _discard_session(self, session: _Session) -> None:
        for subscription in session.subscriptions.values():
            self._unindex(subscription)
        session.subscriptions.clear()
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    # subscriptions ----------------------------------------------------------

    def _subscribe(self, session: _Session, requests: list[tuple[str, int]],
                   version: int) -> tuple[list[int], list[_Subscription]]:
        codes: list[int] = []
        retained_for: list[_Subscription] = []
        for full_filter, options in requests:
            try:
                share_group, topic_filter = _split_shared(full_filter)
            except ValueError:
                codes.append(RC_TOPIC_FILTER_INVALID if version == MQTT_5 else RC_UNSPECIFIED)
                continue
            if share_group is not None and options & 0x04:
                raise _Reject(RC_PROTOCOL_ERROR, "No Local on a shared subscription")
            previous = session.subscriptions.get(full_filter)
            if previous is not None:
                self._unindex(previous)
            subscription = _Subscription(session, topic_filter, share_group, options)
            session.subscriptions[full_filter] = subscription
            self._index(subscription)
            codes.append(subscription.qos)
            handling = subscription.retain_handling
            if share_group is None and (handling == 0 or (handling == 1 and previous is None)):
                retained_for.append(subscription)
        return codes, retained_for

    def _unsubscribe(self, session: _Session, full_filter: str) -> int:
        subscription = session.subscriptions.pop(full_filter, None)
        if subscription is None:
            return RC_NO_SUBSCRIPTION_EXISTED
        self._unindex(subscription)
        return RC_SUCCESS

    def _table(self, topic_filter: str) -> dict[str, _FilterEntry]:
        wild = "+" in topic_filter or "#" in topic_filter
        return self._wildcard if wild else self._exact

    def _index(self, subscription: _Subscription) -> None:
        table = self._table(subscription.topic_filter)
        entry = table.get(subscription.topic_filter)
        if entry is None:
            entry = table[subscription.topic_filter] = _FilterEntry(subscription.topic_filter)
        client_id = subscription.session.client_id
        if subscription.share_group is None:
            entry.plain[client_id] = subscription
        else:
            entry.groups.setdefault(subscription.share_group, _SharedGroup()).members[
                client_id] = subscription

    def _unindex(self, subscription: _Subscription) -> None:
        table = self._table(subscription.topic_filter)
        entry = table.get(subscription.topic_filter)
        if entry is None:
            return
        client_id = subscription.session.client_id
        if subscription.share_group is None:
            if entry.plain.get(client_id) is subscription:
                del entry.plain[client_id]
        else:
            group = entry.groups.get(subscription.share_group)
            if group is not None and group.members.get(client_id) is subscription:
                del group.members[client_id]
                if not group.members:
                    del entry.groups[subscription.share_group]
        if not entry.plain and not entry.groups:
            del table[subscription.topic_filter]

    # routing ----------------------------------------------------------------

    def _publish(self, message: _Message) -> bool:
        """Store (if retained) and forward one application message; False when the
        retained store is full and the message was refused whole."""
        if message.retain:
            if message.payload:
                if not self._retain(message):
                    return False
            else:
                self._unretain(message.topic)  # empty retained payload deletes
        entries = []
        exact = self._exact.get(message.topic)
        if exact is not None:
            entries.append(exact)
        if self._wildcard:
            entries.extend(e for e in self._wildcard.values()
                           if topic_matches(e.topic_filter, message.topic))
        # One copy per client for overlapping plain subscriptions, at the highest QoS.
        targets: dict[str, list[Any]] = {}
        for entry in entries:
            for client_id, subscription in entry.plain.items():
                if subscription.no_local and client_id == message.origin:
                    continue
                qos = min(message.qos, subscription.qos)
                retain = message.retain and subscription.retain_as_published
                target = targets.get(client_id)
                if target is None:
                    targets[client_id] = [subscription.session, qos, retain]
                else:
                    target[1] = max(target[1], qos)
                    target[2] = target[2] or retain
            for group in entry.groups.values():
                member = group.pick()
                self._deliver(member.session, message, min(message.qos, member.qos), False)
        for session, qos, retain in targets.values():
            self._deliver(session, message, qos, retain)
        return True

    def _retain(self, message: _Message) -> bool:
        old = self._retained.get(message.topic)
        held = self._retained_bytes - (old.size if old else 0) + message.size
        if (old is None and len(self._retained) >= self.max_retained) or (
                held > self.max_retained_bytes):
            self._refused_retained += 1
            refused = self._refused_retained
            if refused == 1 or refused % 1000 == 0:
                log.warning("broker_retained_full", topic=message.topic, origin=message.origin,
                            refused=refused, limit_topics=self.max_retained,
                            limit_bytes=self.max_retained_bytes)
            return False
        self._retained[message.topic] = message
        self._retained_bytes = held
        return True

    def _unretain(self, topic: str) -> None:
        old = self._retained.pop(topic, None)
        if old is not None:
            self._retained_bytes -= old.size

    def _send_retained(self, subscription: _Subscription) -> None:
        now = self._loop.time()
        if self._table(subscription.topic_filter) is self._exact:
            candidates = [self._retained.get(subscription.topic_filter)]
        else:
            candidates = [m for topic, m in self._retained.items()
                          if topic_matches(subscription.topic_filter, topic)]
        for message in candidates:
            if message is None:
                continue
            if message.expired(now):
                self._unretain(message.topic)
                continue
            self._deliver(subscription.session, message, min(message.qos, subscription.qos), True)

    def _deliver(self, session: _Session, message: _Message, qos: int, retain: bool) -> None:
        connection = session.connection
        if qos == 0:
            # QoS 0 is not queued for absent clients nor piled onto a client not reading.
            if connection is not None and not connection.congested():
                connection.send_publish(message, 0, retain, 0, False)
            return
        # Room by count and by bytes: the oldest queued go first. In-flight messages wait for
        # their PUBACK and cannot be taken back, so when they alone fill the budget the new
        # message is the one dropped.
        while session.pending and (
                len(session.pending) >= self.max_queued
                or session.held_bytes + message.size > self.max_session_bytes):
            oldest, _ = session.pending.popleft()
            session.held_bytes -= oldest.size
            self._dropped(session, "oldest queued QoS 1 message dropped")
        if session.held_bytes + message.size > self.max_session_bytes:
            self._dropped(session, "in-flight messages fill the session: new message dropped")
            return
        session.held_bytes += message.size
        if (connection is not None and not session.pending
                and len(session.inflight) < connection.send_quota):
            self._send_tracked(session, connection, message, retain)
            return
        session.pending.append((message, retain))

    def _dropped(self, session: _Session, detail: str) -> None:
        session.dropped += 1
        if session.dropped == 1 or session.dropped % 1000 == 0:
            log.warning("broker_queue_full", client_id=session.client_id,
                        limit=self.max_queued, limit_bytes=self.max_session_bytes,
                        dropped=session.dropped, detail=detail)

    def _send_tracked(self, session: _Session, connection: _Connection, message: _Message,
                      retain: bool) -> None:
        packet_id = session.next_packet_id()
        if connection.send_publish(message, 1, retain, packet_id, False):
            session.inflight[packet_id] = (message, retain)
        else:
            session.held_bytes -= message.size  # expired, or too big for this client

    def _acknowledged(self, session: _Session, packet_id: int) -> None:
        sent = session.inflight.pop(packet_id, None)
        if sent is not None:
            session.held_bytes -= sent[0].size
            self._pump(session)

    def _pump(self, session: _Session) -> None:
        connection = session.connection
        while (connection is not None and session.pending
               and len(session.inflight) < connection.send_quota):
            message, retain = session.pending.popleft()
            self._send_tracked(session, connection, message, retain)


# ---------------------------------------------------------------------------- entry point


async def _serve(broker: EmbeddedBroker) -> None:
    await broker.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.fleet.broker",
        description="Embedded MQTT 3.1.1/5.0 broker (anonymous, in-memory; loopback only).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (0: any free port)")
    parser.add_argument("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET_SIZE,
                        help="largest packet accepted, in bytes")
    parser.add_argument("--max-session-bytes", type=int, default=DEFAULT_MAX_SESSION_BYTES,
                        help="QoS 1 bytes one session may hold, queued plus in flight; the"
                             " oldest queued message is dropped past it")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open sockets; one more is closed at once")
    parser.add_argument("--max-retained", type=int, default=DEFAULT_MAX_RETAINED,
                        help="retained topics; a retained PUBLISH past it is refused")
    parser.add_argument("--max-retained-bytes", type=int, default=DEFAULT_MAX_RETAINED_BYTES,
                        help="bytes of all retained messages together")
    parser.add_argument("--max-idle", type=float, default=DEFAULT_MAX_IDLE_S,
                        help="seconds a keepalive-0 client may stay silent before it is closed")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    broker = EmbeddedBroker(
        args.host, args.port, max_packet_size=args.max_packet_size,
        max_session_bytes=args.max_session_bytes, max_connections=args.max_connections,
        max_retained=args.max_retained, max_retained_bytes=args.max_retained_bytes,
        max_idle_s=args.max_idle)
    try:
        asyncio.run(_serve(broker))
    except EdgeAgentError as exc:
        print(f"edge-agent broker: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
