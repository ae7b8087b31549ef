"""CONNECT and CONNACK: what a client asks for when it connects (protocol level, clean start,
keepalive, will, session expiry, its limits on what it is sent), read and checked in the order
that decides which reason code a bad CONNECT gets, and the CONNACK that accepts it. There is no
authentication: a user name and password are read past and ignored."""

from __future__ import annotations

from dataclasses import dataclass

from agent.broker.codec import (
    CONNACK,
    CONNECT_PROPERTIES,
    MQTT_5,
    MQTT_311,
    NEVER_EXPIRES,
    P_ASSIGNED_CLIENT_ID,
    P_AUTH_METHOD,
    P_MAXIMUM_PACKET_SIZE,
    P_MAXIMUM_QOS,
    P_RECEIVE_MAXIMUM,
    P_RETAIN_AVAILABLE,
    P_SESSION_EXPIRY,
    P_SHARED_SUBSCRIPTION_AVAILABLE,
    P_SUBSCRIPTION_IDS_AVAILABLE,
    P_TOPIC_ALIAS_MAXIMUM,
    P_WILDCARD_SUBSCRIPTION_AVAILABLE,
    RC_BAD_AUTH_METHOD,
    RC_CLIENT_ID_INVALID,
    RC_MALFORMED,
    RC_QOS_NOT_SUPPORTED,
    RC_SUCCESS,
    RC_TOPIC_NAME_INVALID,
    RC_UNSUPPORTED_VERSION,
    WILL_PROPERTIES,
    Properties,
    Reader,
    Reject,
    encode_packet,
    encode_properties,
)
from agent.broker.sessions import Will
from agent.broker.topics import valid_topic_name


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One accepted CONNECT, after the protocol level."""

    client_id: str  # empty: the broker assigns one
    clean_start: bool
    keepalive_s: int
    expiry_s: int | None  # None: the session never expires
    will: Will | None
    receive_maximum: int | None  # MQTT 5 only: unacknowledged QoS 1 sends it takes at once
    maximum_packet_size: int | None  # MQTT 5 only: a larger packet must not be sent to it


def read_protocol_level(reader: Reader) -> int:
    """MQTT 3.1.1 or 5, or Reject; an MQTT client of another version is refused with the
    3.1.1 CONNACK 0x01 (unacceptable protocol version)."""
    name = reader.utf8()
    level = reader.byte()
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):
        reply = bytes((CONNACK << 4, 2, 0, 0x01)) if name in ("MQTT", "MQIsdp") else b""
        raise Reject(RC_UNSUPPORTED_VERSION, f"protocol {name!r} level {level}", reply=reply)
    return level


def parse_connect(reader: Reader, level: int) -> ConnectRequest:
    """The rest of a CONNECT whose protocol level ``read_protocol_level`` returned."""
    flags = reader.byte()
    will_flag, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, bool(flags & 0x20)
    if flags & 0x01 or will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise Reject(RC_MALFORMED, f"CONNECT flags {flags:#010b}")
    if level == MQTT_311 and flags & 0x40 and not flags & 0x80:
        raise Reject(RC_MALFORMED, "password without user name")
    clean_start = bool(flags & 0x02)
    keepalive_s = reader.u16()
    properties = dict(reader.properties(CONNECT_PROPERTIES)) if level == MQTT_5 else {}
    client_id = reader.utf8()
    will = _read_will(reader, level, will_qos, will_retain) if will_flag else None
    if flags & 0x80:
        reader.utf8()  # user name: accepted and ignored (no authentication)
    if flags & 0x40:
        reader.binary()
    if not reader.at_end():
        raise Reject(RC_MALFORMED, "bytes after the CONNECT payload")
    if P_AUTH_METHOD in properties:
        raise Reject(RC_BAD_AUTH_METHOD, "enhanced authentication is not supported")
    if level == MQTT_5 and will_qos == 2:
        raise Reject(RC_QOS_NOT_SUPPORTED, "will QoS 2 (Maximum QoS is 1)")
    if level == MQTT_311:
        if not client_id and not clean_start:
            raise Reject(RC_CLIENT_ID_INVALID, "empty client id with clean_session=0",
                         reply=bytes((CONNACK << 4, 2, 0, 0x02)))  # identifier rejected
        return ConnectRequest(client_id, clean_start, keepalive_s, 0 if clean_start else None,
                              will, None, None)
    expiry = properties.get(P_SESSION_EXPIRY, 0)
    return ConnectRequest(client_id, clean_start, keepalive_s,
                          None if expiry == NEVER_EXPIRES else expiry, will,
                          properties.get(P_RECEIVE_MAXIMUM, 0xFFFF),
                          properties.get(P_MAXIMUM_PACKET_SIZE))


def _read_will(reader: Reader, level: int, qos: int, retain: bool) -> Will:
    properties = reader.properties(WILL_PROPERTIES) if level == MQTT_5 else []
    topic = reader.utf8()
    will = Will(topic, reader.binary(), qos, retain, properties)
    if not valid_topic_name(topic):
        raise Reject(RC_TOPIC_NAME_INVALID, f"will topic {topic!r}")
    return will


def encode_connack(level: int, session_present: bool, assigned_id: str | None,
                   max_packet_size: int) -> bytes:
    """The CONNACK that accepts a client; to MQTT 5 it also states this broker's limits."""
    if level == MQTT_311:
        return bytes((CONNACK << 4, 2, int(session_present), 0))
    properties: Properties = [
        (P_MAXIMUM_QOS, 1), (P_RETAIN_AVAILABLE, 1), (P_SHARED_SUBSCRIPTION_AVAILABLE, 1),
        (P_WILDCARD_SUBSCRIPTION_AVAILABLE, 1), (P_TOPIC_ALIAS_MAXIMUM, 0),
        (P_SUBSCRIPTION_IDS_AVAILABLE, 0), (P_MAXIMUM_PACKET_SIZE, max_packet_size),
    ]
    if assigned_id is not None:
        properties.append((P_ASSIGNED_CLIENT_ID, assigned_id))
    body = bytes((int(session_present), RC_SUCCESS)) + encode_properties(properties)
    return encode_packet(CONNACK << 4, body)
