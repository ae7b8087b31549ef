"""What each packet from a client means: CONNECT taken into a session, PUBLISH with its QoS 1
and 3.1.1 QoS 2 flows, PUBACK and PUBREL, SUBSCRIBE and UNSUBSCRIBE with their acks, PINGREQ
and DISCONNECT. A packet that breaks the protocol raises ``Reject``. Bytes come in and go out
through the ``Connection``; sessions, subscriptions and routing belong to the broker's parts
that this calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.broker.codec import (
    ACK_PROPERTIES,
    CONNECT,
    DISCONNECT,
    DISCONNECT_PROPERTIES,
    MQTT_5,
    MQTT_311,
    NEVER_EXPIRES,
    P_SESSION_EXPIRY,
    P_SUBSCRIPTION_ID,
    P_TOPIC_ALIAS,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBLISH_PROPERTIES,
    PUBREC,
    PUBREL,
    RC_MALFORMED,
    RC_PACKET_ID_NOT_FOUND,
    RC_PROTOCOL_ERROR,
    RC_QOS_NOT_SUPPORTED,
    RC_QUOTA_EXCEEDED,
    RC_SUBSCRIPTION_IDS_NOT_SUPPORTED,
    RC_SUCCESS,
    RC_TOPIC_ALIAS_INVALID,
    RC_TOPIC_NAME_INVALID,
    REQUIRED_FLAGS,
    SUBACK,
    SUBSCRIBE,
    SUBSCRIBE_PROPERTIES,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUBSCRIBE_PROPERTIES,
    Reader,
    Reject,
    encode_packet,
)
from agent.broker.connect import encode_connack, parse_connect, read_protocol_level
from agent.broker.sessions import new_message
from agent.broker.topics import valid_topic_name
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.broker.connection import Connection

log = get_logger(__name__)

class PacketHandler:
    """The packets of one connection, one at a time, in the order they arrived."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.broker = connection.broker

    def handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind != PUBLISH and flags != REQUIRED_FLAGS.get(kind, 0):
            raise Reject(RC_MALFORMED, f"packet type {kind} with flags {flags:#06b}")
        if self.connection.session is None:
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
            self.connection.send(b"\xd0\x00")
        elif kind == DISCONNECT:
            self._on_disconnect(body)
        else:  # a second CONNECT, PUBREC/PUBCOMP (we never send QoS 2), AUTH, server packets
            raise Reject(RC_PROTOCOL_ERROR, f"unexpected packet type {kind}")

    def _on_connect(self, body: bytes) -> None:
        connection = self.connection
        reader = Reader(body)
        # Known before the rest is read, so a bad CONNECT from MQTT 5 gets a CONNACK reason.
        connection.version = read_protocol_level(reader)
        request = parse_connect(reader, connection.version)
        connection.keepalive_s = request.keepalive_s
        connection.will = request.will
        if request.receive_maximum is not None:
            connection.send_quota = min(connection.send_quota, request.receive_maximum)
        connection.max_packet_out = request.maximum_packet_size
        session, session_present, assigned_id = self.broker.sessions.attach(
            connection, request.client_id, request.clean_start, request.expiry_s)
        connection.send(encode_connack(connection.version, session_present, assigned_id,
                                       self.broker.max_packet_size))
        connection.start_keepalive()
        log.debug("broker_client_connected", client_id=session.client_id,
                  version=connection.version, session_present=session_present,
                  peer=connection.peer)
        self.broker.delivery.resume(session, connection)

    def _on_publish(self, flags: int, body: bytes) -> None:
        connection = self.connection
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3 or (qos == 0 and flags & 0x08):
            raise Reject(RC_MALFORMED, f"PUBLISH flags {flags:#06b}")
        reader = Reader(body)
        topic = reader.utf8()
        packet_id = reader.u16() if qos else 0
        if qos and not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        version = connection.version
        properties = reader.properties(PUBLISH_PROPERTIES) if version == MQTT_5 else []
        if any(pid == P_TOPIC_ALIAS for pid, _ in properties):
            raise Reject(RC_TOPIC_ALIAS_INVALID, "topic aliases are not supported (maximum 0)")
        if not valid_topic_name(topic):
            raise Reject(RC_TOPIC_NAME_INVALID, f"topic name {topic!r}")
        if qos == 2 and version == MQTT_5:
            raise Reject(RC_QOS_NOT_SUPPORTED, "QoS 2 PUBLISH (Maximum QoS is 1)")
        session = connection.session
        message = new_message(topic, reader.rest(), qos, retain, properties,
                              session.client_id, connection.loop.time())
        id_bytes = packet_id.to_bytes(2, "big")
        if qos == 2:
            # 3.1.1 exactly-once: forward on first receipt, ignore resends until PUBREL.
            if packet_id not in session.awaiting_release:
                session.awaiting_release.add(packet_id)
                self.broker.router.publish(message)
            connection.send(bytes((PUBREC << 4, 2)) + id_bytes)
            return
        accepted = self.broker.router.publish(message)
        if qos == 1:
            if accepted or version != MQTT_5:
                connection.send(bytes((PUBACK << 4, 2)) + id_bytes)
            else:
                connection.send(bytes((PUBACK << 4, 3)) + id_bytes + bytes((RC_QUOTA_EXCEEDED,)))

    def _read_ack(self, body: bytes) -> int:
        reader = Reader(body)
        packet_id = reader.u16()
        if self.connection.version == MQTT_5 and not reader.at_end():
            reader.byte()  # reason code: a refusal by the client still completes the flow
            if not reader.at_end():
                reader.properties(ACK_PROPERTIES)
        if not reader.at_end():
            raise Reject(RC_MALFORMED, "bytes after an acknowledgement")
        return packet_id

    def _on_puback(self, body: bytes) -> None:
        self.broker.delivery.acknowledged(self.connection.session, self._read_ack(body))

    def _on_pubrel(self, body: bytes) -> None:
        connection = self.connection
        packet_id = self._read_ack(body)
        id_bytes = packet_id.to_bytes(2, "big")
        if packet_id in connection.session.awaiting_release:
            connection.session.awaiting_release.discard(packet_id)
            connection.send(bytes((PUBCOMP << 4, 2)) + id_bytes)
        elif connection.version == MQTT_5:
            connection.send(bytes((PUBCOMP << 4, 3)) + id_bytes
                            + bytes((RC_PACKET_ID_NOT_FOUND,)))
        else:
            connection.send(bytes((PUBCOMP << 4, 2)) + id_bytes)

    def _on_subscribe(self, body: bytes) -> None:
        connection = self.connection
        version = connection.version
        reader = Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        if version == MQTT_5 and any(
                pid == P_SUBSCRIPTION_ID for pid, _ in reader.properties(SUBSCRIBE_PROPERTIES)):
            raise Reject(RC_SUBSCRIPTION_IDS_NOT_SUPPORTED, "subscription identifier")
        requests: list[tuple[str, int]] = []
        while not reader.at_end():
            topic_filter, options = reader.utf8(), reader.byte()
            reserved = 0xC0 if version == MQTT_5 else 0xFC
            if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
                raise Reject(RC_MALFORMED, f"subscription options {options:#010b}")
            requests.append((topic_filter, options))
        if not requests:
            raise Reject(RC_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes, retained_for = self.broker.subscriptions.subscribe(
            connection.session, requests, version)
        properties = b"\x00" if version == MQTT_5 else b""
        connection.send(encode_packet(SUBACK << 4,
                                      packet_id.to_bytes(2, "big") + properties + bytes(codes)))
        for subscription in retained_for:  # after SUBACK, as the spec orders
            self.broker.router.send_retained(subscription, connection.loop.time())

    def _on_unsubscribe(self, body: bytes) -> None:
        connection = self.connection
        reader = Reader(body)
        packet_id = reader.u16()
        if not packet_id:
            raise Reject(RC_MALFORMED, "packet identifier 0")
        if connection.version == MQTT_5:
            reader.properties(UNSUBSCRIBE_PROPERTIES)
        filters = []
        while not reader.at_end():
            filters.append(reader.utf8())
        if not filters:
            raise Reject(RC_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        subscriptions = self.broker.subscriptions
        codes = [subscriptions.unsubscribe(connection.session, f) for f in filters]
        id_bytes = packet_id.to_bytes(2, "big")
        if connection.version == MQTT_5:
            connection.send(encode_packet(UNSUBACK << 4, id_bytes + b"\x00" + bytes(codes)))
        else:
            connection.send(encode_packet(UNSUBACK << 4, id_bytes))

    def _on_disconnect(self, body: bytes) -> None:
        connection = self.connection
        if connection.version == MQTT_311:
            if body:
                raise Reject(RC_MALFORMED, "DISCONNECT with a body")
            connection.close(publish_will=False)
            return
        reader = Reader(body)
        reason = reader.byte() if body else RC_SUCCESS
        properties = dict(reader.properties(DISCONNECT_PROPERTIES)) if len(body) > 1 else {}
        if not reader.at_end():
            raise Reject(RC_MALFORMED, "bytes after DISCONNECT properties")
        if P_SESSION_EXPIRY in properties:
            expiry = properties[P_SESSION_EXPIRY]
            if connection.session.expiry_s == 0 and expiry != 0:
                raise Reject(RC_PROTOCOL_ERROR, "session expiry raised from 0 at DISCONNECT")
            connection.session.expiry_s = None if expiry == NEVER_EXPIRES else expiry
        # Only "normal disconnection" (0x00) discards the will; 0x04 and errors publish it.
        connection.close(publish_will=reason != RC_SUCCESS)
