"""One client socket of the embedded broker: frames bytes into packets for its
``PacketHandler``, writes what goes out, closes once, and enforces the connect timeout and
keepalive. What a packet means is the handler's; sessions and routing are the broker's."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from agent.broker.codec import (
    CONNACK,
    DISCONNECT,
    MQTT_5,
    P_MESSAGE_EXPIRY,
    RC_KEEP_ALIVE_TIMEOUT,
    RC_PACKET_TOO_LARGE,
    RC_UNSPECIFIED,
    Reject,
    encode_packet,
    encode_properties,
    remaining_length,
)
from agent.broker.handler import PacketHandler
from agent.broker.limits import CONNECT_MAX_BYTES, WRITE_BUFFER_LIMIT
from agent.broker.sessions import Message, Session, Will
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.broker.server import EmbeddedBroker

log = get_logger(__name__)

class Connection(asyncio.Protocol):
    """One client socket and the protocol state of its client (version, session, will,
    keepalive, the client's limits on what it is sent)."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.loop = broker.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.version = 0  # protocol level once CONNECT is parsed
        self.session: Session | None = None  # set by the registry as CONNACK goes out
        self.will: Will | None = None
        self.keepalive_s = 0
        self.last_received = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.send_quota = broker.max_inflight
        self.max_packet_out: int | None = None
        self.closed = False
        self.peer = ""
        self.packets = PacketHandler(self)

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
                self.packets.handle(first_byte >> 4, first_byte & 0x0F, body)
                if self.closed:
                    return
        except Reject as rejection:
            if rejection.reply:
                self.send(rejection.reply)
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
