"""What the broker keeps between packets: messages, wills, sessions (which outlive their
connection), subscriptions and shared groups. Plain state; what happens to it is decided
by the session registry, the subscription index and delivery."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from agent.broker.codec import (
    FORWARDED_PROPERTIES,
    P_MESSAGE_EXPIRY,
    P_WILL_DELAY,
    Properties,
    encode_properties,
    encode_string,
)

if TYPE_CHECKING:
    from agent.broker.connection import Connection

class Message:
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
        self.topic_wire = encode_string(topic)
        self.properties_wire = encode_properties(properties)
        self.size = len(payload) + len(self.topic_wire) + len(self.properties_wire)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def new_message(topic: str, payload: bytes, qos: int, retain: bool, properties: Properties,
             origin: str | None, now: float) -> Message:
    expires_at = None
    forwarded: Properties = []
    for pid, value in properties:
        if pid == P_MESSAGE_EXPIRY:
            expires_at = now + value
        elif pid in FORWARDED_PROPERTIES:
            forwarded.append((pid, value))
    return Message(topic, payload, qos, retain, forwarded, expires_at, origin)


class Will:
    __slots__ = ("topic", "payload", "qos", "retain", "properties", "delay_s")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.delay_s = next((v for p, v in properties if p == P_WILL_DELAY), 0)


class Session:
    """What outlives a connection: subscriptions, queued and unacknowledged QoS 1 messages."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.expiry_s: int | None = 0  # None: never expires
        self.subscriptions: dict[str, Subscription] = {}  # by full filter, $share prefix kept
        self.pending: deque[tuple[Message, bool]] = deque()
        self.inflight: dict[int, tuple[Message, bool]] = {}
        self.held_bytes = 0  # sizes of the messages in pending and inflight
        self.awaiting_release: set[int] = set()  # 3.1.1 QoS 2 ids between PUBREC and PUBREL
        self.connection: Connection | None = None
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


class Subscription:
    __slots__ = ("session", "topic_filter", "share_group", "qos", "no_local",
                 "retain_as_published", "retain_handling")

    def __init__(self, session: Session, topic_filter: str, share_group: str | None,
                 options: int) -> None:
        self.session = session
        self.topic_filter = topic_filter
        self.share_group = share_group
        self.qos = min(options & 0x03, 1)
        self.no_local = bool(options & 0x04)
        self.retain_as_published = bool(options & 0x08)
        self.retain_handling = (options >> 4) & 0x03


class SharedGroup:
    """Members of one ``$share/<group>/<filter>``; each message goes to the next one."""

    __slots__ = ("members", "cursor")

    def __init__(self) -> None:
        self.members: dict[str, Subscription] = {}
        self.cursor = 0

    def pick(self) -> Subscription:
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


class FilterEntry:
    """Everyone subscribed to one topic filter: plain subscribers and shared groups."""

    __slots__ = ("topic_filter", "plain", "groups")

    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self.plain: dict[str, Subscription] = {}
        self.groups: dict[str, SharedGroup] = {}
