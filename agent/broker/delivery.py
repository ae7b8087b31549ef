"""Delivery of one message to one session. QoS 0 is written at once or dropped; QoS 1 goes
through the client's in-flight window (Receive Maximum) and, past it or while the client is
away, a queue bounded by count and by bytes. Drops are counted and logged, never silent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.broker.sessions import Message, Session
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.broker.connection import Connection

log = get_logger(__name__)


class Delivery:
    def __init__(self, max_queued: int, max_session_bytes: int) -> None:
        self.max_queued = max_queued
        self.max_session_bytes = max_session_bytes

    def deliver(self, session: Session, message: Message, qos: int, retain: bool) -> None:
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

    def resume(self, session: Session, connection: Connection) -> None:
        """After CONNACK: resend what was in flight (with DUP), then what queued meanwhile."""
        for packet_id, (message, retain) in list(session.inflight.items()):
            if not connection.send_publish(message, 1, retain, packet_id, dup=True):
                # Too big for this connection: discarded as if delivered (MQTT 5 3.1.2.11.4),
                # so it gives back its bytes and its send-quota slot.
                del session.inflight[packet_id]
                session.held_bytes -= message.size
        if session.dropped:
            log.warning("broker_queue_overflowed", client_id=session.client_id,
                        dropped=session.dropped)
            session.dropped = 0
        self._pump(session)

    def acknowledged(self, session: Session, packet_id: int) -> None:
        sent = session.inflight.pop(packet_id, None)
        if sent is not None:
            session.held_bytes -= sent[0].size
            self._pump(session)

    def _dropped(self, session: Session, detail: str) -> None:
        session.dropped += 1
        if session.dropped == 1 or session.dropped % 1000 == 0:
            log.warning("broker_queue_full", client_id=session.client_id,
                        limit=self.max_queued, limit_bytes=self.max_session_bytes,
                        dropped=session.dropped, detail=detail)

    def _send_tracked(self, session: Session, connection: Connection, message: Message,
                      retain: bool) -> None:
        packet_id = session.next_packet_id()
        if connection.send_publish(message, 1, retain, packet_id, False):
            session.inflight[packet_id] = (message, retain)
        else:
            session.held_bytes -= message.size  # expired, or too big for this client

    def _pump(self, session: Session) -> None:
        connection = session.connection
        while (connection is not None and session.pending
               and len(session.inflight) < connection.send_quota):
            message, retain = session.pending.popleft()
            self._send_tracked(session, connection, message, retain)
