"""One client socket of the embedded broker: frames bytes into packets, parses them, encodes
replies, and enforces keepalive. What a packet means for sessions and routing is the
server's (``EmbeddedBroker``) to decide."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from agent.broker.codec import (
    ACK_PROPERTIES,
    CONNACK,
    CONNECT,
    CONNECT_PROPERTIES,
    DISCONNECT,
    DISCONNECT_PROPERTIES,
    MQTT_311,
    MQTT_5,
    NEVER_EXPIRES,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBLISH_PROPERTIES,
    PUBREC,
    PUBREL,
    P_ASSIGNED_CLIENT_ID,
    P_AUTH_METHOD,
    P_MAXIMUM_PACKET_SIZE,
    P_MAXIMUM_QOS,
    P_MESSAGE_EXPIRY,
    P_RECEIVE_MAXIMUM,
    P_RETAIN_AVAILABLE,
    P_SESSION_EXPIRY,
    P_SHARED_SUBSCRIPTION_AVAILABLE,
    P_SUBSCRIPTION_ID,
    P_SUBSCRIPTION_IDS_AVAILABLE,
    P_TOPIC_ALIAS,
    P_TOPIC_ALIAS_MAXIMUM,
    P_WILDCARD_SUBSCRIPTION_AVAILABLE,
    Properties,
    RC_BAD_AUTH_METHOD,
    RC_CLIENT_ID_INVALID,
    RC_KEEP_ALIVE_TIMEOUT,
    RC_MALFORMED,
    RC_PACKET_ID_NOT_FOUND,
    RC_PACKET_TOO_LARGE,
    RC_PROTOCOL_ERROR,
    RC_QOS_NOT_SUPPORTED,
    RC_QUOTA_EXCEEDED,
    RC_SUBSCRIPTION_IDS_NOT_SUPPORTED,
    RC_SUCCESS,
    RC_TOPIC_ALIAS_INVALID,
    RC_TOPIC_NAME_INVALID,
    RC_UNSPECIFIED,
    RC_UNSUPPORTED_VERSION,
    REQUIRED_FLAGS,
    Reader,
    Reject,
    SUBACK,
    SUBSCRIBE,
    SUBSCRIBE_PROPERTIES,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUBSCRIBE_PROPERTIES,
    WILL_PROPERTIES,
    encode_packet,
    encode_properties,
    remaining_length,
)
from agent.broker.limits import CONNECT_MAX_BYTES, WRITE_BUFFER_LIMIT
from agent.broker.sessions import Message, Session, Will, new_message
from agent.broker.topics import valid_topic_name
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.broker.server import EmbeddedBroker

log = get_logger(__name__)

class Connection(asyncio.Protocol):
    """One client socket: frames and parses packets, encodes replies. Semantics (sessions,
    routing) live in ``EmbeddedBroker``."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.loop = broker.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.version = 0  # protocol level once CONNECT is parsed
        self.session: Session | None = None  # set once CONNACK is sent
        self.will: Will | None = None
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
        if not self.broker.admit(self):
            # Before CONNECT there is no protocol version to answer in: just close.
            self.closed = True
            transport.abort()
            return
        self.last_received = self.loop.time()
        self.timer = self.loop.call_later(self.broker.connect_timeout_s, self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.loop.time()
        buffer = self.buffer
        buffer += data
        position = 0
        try:
            while len(buffer) - position >= 2:
                header = remaining_length(buffer, position + 1)
                if header is None:
                    break
                length, body_start = header
                end = body_start + length
                limit = self.broker.max_packet_size
                if self.session is None:
                    limit = min(limit, CONNECT_MAX_BYTES)
                if end - position > limit:
                    raise Reject(RC_PACKET_TOO_LARGE, f"packet of {end - position} bytes")
                if end > len(buffer):
                    break
                first_byte = buffer[position]
                body = bytes(buffer[body_start:end])
                position = end
                self._handle(first_byte >> 4, first_byte & 0x0F, body)
                if self.closed:
                    return
        except Reject as rejection:
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

    def send_publish(self, message: Message, qos: int, retain: bool, packet_id: int,
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
                body += encode_properties([(P_MESSAGE_EXPIRY, left), *message.properties])
        body += message.payload
        packet = encode_packet(0x30 | dup << 3 | qos << 1 | retain, body)
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
                self.transport.write(encode_packet(DISCONNECT << 4, bytes((reason, 0))))
            elif reason >= 0x80:
                self.transport.write(encode_packet(CONNACK << 4, bytes((0, reason, 0))))
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()
        self.broker.connection_ended(self, publish_will, end_session)

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
        if kind != PUBLISH and flags != REQUIRED_FLAGS.get(kind, 0):
            raise Reject(RC_MALFORMED, f"packet type {kind} with flags {flags:#06b}")
        if self.session is None:
            if kind != CONNECT:
                raise Reject(RC_PROTOCOL_ERROR, "first packet is not CONNECT")
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
                raise Reject(RC_MALFORMED, "PINGREQ with a body")
            self.send(b"\xd0\x00")
        elif kind == DISCONNECT:
            self._on_disconnect(body)
        else:  # a second CONNECT, PUBREC/PUBCOMP (we never send QoS 2), AUTH, server packets
            raise Reject(RC_PROTOCOL_ERROR, f"unexpected packet type {kind}")

    def _on_connect(self, body: bytes) -> None:
        reader = Reader(body)
        name = reader.utf8()
        level = reader.byte()
        if name != "MQTT" or level not in (MQTT_311, MQTT_5):
            if name in ("MQTT", "MQIsdp"):  # an MQTT client, just another version
                self.send(bytes((CONNACK << 4, 2, 0, 0x01)))  # 3.1.1: unacceptable version
            raise Reject(RC_UNSUPPORTED_VERSION, f"protocol {name!r} level {level}")
        self.version = level
        flags = reader.byte()
        will_flag, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, bool(flags & 0x20)
        if flags & 0x01 or will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise Reject(RC_MALFORMED, f"CONNECT flags {flags:#010b}")
        if level == MQTT_311 and flags & 0x40 and not flags & 0x80:
            raise Reject(RC_MALFORMED, "password without user name")
        clean_start = bool(flags & 0x02)
        keepalive_s = reader.u16()
        properties = reader.properties(CONNECT_PROPERTIES) if level == MQTT_5 else []
        client_id = reader.utf8()
        will = None
        if will_flag:
            will_properties = reader.properties(WILL_PROPERTIES) if level == MQTT_5 else []
            will_topic = reader.utf8()
            will = Will(will_topic, reader.binary(), will_qos, will_retain, will_properties)
            if not valid_topic_name(will_topic):
                raise Reject(RC_TOPIC_NAME_INVALID, f"will topic {will_topic!r}")
        if flags & 0x80:
            reader.utf8()  # user name: accepted and ignored (no authentication)
        if flags & 0x40:
            reader.binary()
        if not reader.at_end():
            raise Reject(RC_MALFORMED, "bytes after the CONNECT payload")
        found = dict(properties)
        if P_AUTH_METHOD in found:
            raise Reject(RC_BAD_AUTH_METHOD, "enhanced authentication is not supported")
        if level == MQTT_5 and will_qos == 2:
            raise Reject(RC_QOS_NOT_SUPPORTED, "will QoS 2 (Maximum QoS is 1)")
        if level == MQTT_311:
            expiry_s = 0 if clean_start else None
            if not client_id and not clean_start:
                self.send(bytes((CONNACK << 4, 2, 0, 0x02)))  # identifier rejected
                raise Reject(RC_CLIENT_ID_INVALID, "empty client id with clean_session=0")
        else:
            expiry = found.get(P_SESSION_EXPIRY, 0)
            expiry_s = None if expiry == NEVER_EXPIRES else expiry
            self.send_quota = min(self.send_quota, found.get(P_RECEIVE_MAXIMUM, 0xFFFF))
            self.max_packet_out = found.get(P_MAXIMUM_PACKET_SIZE)
        self.keepalive_s = keepalive_s
        self.will = will
        self.broker.accept(self, client_id, clean_start, expiry_s)

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
        body = bytes((int(session_present), RC_SUCCESS)) + encode_properties(properties)
        self.send(encode_packet(CONNACK << 4, body))

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3 or (qos == 0 and flags & 0x08):
            raise Reject(RC_MALFORMED, f"PUBLISH flags {flags:#06b}")
        reader = Reader(body)
        topic = reader.utf8()
        packet_id = reader.u16() if qos else 0
        if qos and not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        properties = reader.properties(PUBLISH_PROPERTIES) if self.version == MQTT_5 else []
        if any(pid == P_TOPIC_ALIAS for pid, _ in properties):
            raise Reject(RC_TOPIC_ALIAS_INVALID, "topic aliases are not supported (maximum 0)")
        if not valid_topic_name(topic):
            raise Reject(RC_TOPIC_NAME_INVALID, f"topic name {topic!r}")
        if qos == 2 and self.version == MQTT_5:
            raise Reject(RC_QOS_NOT_SUPPORTED, "QoS 2 PUBLISH (Maximum QoS is 1)")
        message = new_message(topic, reader.rest(), qos, retain, properties,
                           self.session.client_id, self.loop.time())
        id_bytes = packet_id.to_bytes(2, "big")
        if qos == 2:
            # 3.1.1 exactly-once: forward on first receipt, ignore resends until PUBREL.
            if packet_id not in self.session.awaiting_release:
                self.session.awaiting_release.add(packet_id)
                self.broker.publish(message)
            self.send(bytes((PUBREC << 4, 2)) + id_bytes)
            return
        accepted = self.broker.publish(message)
        if qos == 1:
            if accepted or self.version != MQTT_5:
                self.send(bytes((PUBACK << 4, 2)) + id_bytes)
            else:
                self.send(bytes((PUBACK << 4, 3)) + id_bytes + bytes((RC_QUOTA_EXCEEDED,)))

    def _read_ack(self, body: bytes) -> int:
        reader = Reader(body)
        packet_id = reader.u16()
        if self.version == MQTT_5 and not reader.at_end():
            reader.byte()  # reason code: a refusal by the client still completes the flow
            if not reader.at_end():
                reader.properties(ACK_PROPERTIES)
        if not reader.at_end():
            raise Reject(RC_MALFORMED, "bytes after an acknowledgement")
        return packet_id

    def _on_puback(self, body: bytes) -> None:
        self.broker.acknowledged(self.session, self._read_ack(body))

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
        reader = Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        if self.version == MQTT_5:
            if any(pid == P_SUBSCRIPTION_ID for pid, _ in reader.properties(SUBSCRIBE_PROPERTIES)):
                raise Reject(RC_SUBSCRIPTION_IDS_NOT_SUPPORTED, "subscription identifier")
        requests: list[tuple[str, int]] = []
        while not reader.at_end():
            topic_filter, options = reader.utf8(), reader.byte()
            reserved = 0xC0 if self.version == MQTT_5 else 0xFC
            if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
                raise Reject(RC_MALFORMED, f"subscription options {options:#010b}")
            requests.append((topic_filter, options))
        if not requests:
            raise Reject(RC_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes, retained_for = self.broker.subscribe(self.session, requests, self.version)
        properties = b"\x00" if self.version == MQTT_5 else b""
        self.send(encode_packet(SUBACK << 4,
                                packet_id.to_bytes(2, "big") + properties + bytes(codes)))
        for subscription in retained_for:  # after SUBACK, as the spec orders
            self.broker.send_retained(subscription)

    def _on_unsubscribe(self, body: bytes) -> None:
        reader = Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        if self.version == MQTT_5:
            reader.properties(UNSUBSCRIBE_PROPERTIES)
        filters = []
        while not reader.at_end():
            filters.append(reader.utf8())
        if not filters:
            raise Reject(RC_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        codes = [self.broker.unsubscribe(self.session, f) for f in filters]
        id_bytes = packet_id.to_bytes(2, "big")
        if self.version == MQTT_5:
            self.send(encode_packet(UNSUBACK << 4, id_bytes + b"\x00" + bytes(codes)))
        else:
            self.send(encode_packet(UNSUBACK << 4, id_bytes))

    def _on_disconnect(self, body: bytes) -> None:
        if self.version == MQTT_311:
            if body:
                raise Reject(RC_MALFORMED, "DISCONNECT with a body")
            self.close(publish_will=False)
            return
        reader = Reader(body)
        reason = reader.byte() if body else RC_SUCCESS
        properties = dict(reader.properties(DISCONNECT_PROPERTIES)) if len(body) > 1 else {}
        if not reader.at_end():
            raise Reject(RC_MALFORMED, "bytes after DISCONNECT properties")
        if P_SESSION_EXPIRY in properties:
            expiry = properties[P_SESSION_EXPIRY]
            if self.session.expiry_s == 0 and expiry != 0:
                raise Reject(RC_PROTOCOL_ERROR, "session expiry raised from 0 at DISCONNECT")
            self.session.expiry_s = None if expiry == NEVER_EXPIRES else expiry
        # Only "normal disconnection" (0x00) discards the will; 0x04 and errors publish it.
        self.close(publish_will=reason != RC_SUCCESS)
