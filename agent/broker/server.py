"""``EmbeddedBroker``: the listener, sessions, subscriptions, routing, retained messages and
the memory bounds (see the package docstring for what it does and must not do)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from agent.broker.codec import (
    MQTT_5,
    RC_NO_SUBSCRIPTION_EXISTED,
    RC_PROTOCOL_ERROR,
    RC_SERVER_SHUTTING_DOWN,
    RC_SESSION_TAKEN_OVER,
    RC_SUCCESS,
    RC_TOPIC_FILTER_INVALID,
    RC_UNSPECIFIED,
    Reject,
)
from agent.broker.connection import Connection
from agent.broker.limits import (
    CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDLE_S,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_BYTES,
    DEFAULT_MAX_SESSION_BYTES,
)
from agent.broker.sessions import (
    FilterEntry,
    Message,
    Session,
    SharedGroup,
    Subscription,
    Will,
    new_message,
)
from agent.broker.topics import split_shared, topic_matches
from agent.errors import BrokerError
from agent.log import get_logger

log = get_logger(__name__)

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
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._sessions: dict[str, Session] = {}
        self._retained: dict[str, Message] = {}
        self._exact: dict[str, FilterEntry] = {}  # filters without wildcards: one dict lookup
        self._wildcard: dict[str, FilterEntry] = {}
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # lifecycle --------------------------------------------------------------

    async def start(self) -> int:
        if self._server is not None:
            raise BrokerError("the embedded broker is already running", port=self.port)
        self.loop = asyncio.get_running_loop()
        try:
            self._server = await self.loop.create_server(
                lambda: Connection(self), self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise BrokerError(
                f"the embedded broker cannot listen on {self.host}:{self.port}: {exc.strerror};"
                " pick another --port or stop what is using it",
                host=self.host, port=self.port) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        for session in self._sessions.values():  # sessions kept across stop()/start()
            if session.connection is None and session.expiry_s is not None:
                session.expiry_timer = self.loop.call_later(
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

    def admit(self, connection: Connection) -> bool:
        """Count a new socket in, or refuse it past ``max_connections`` (logged, not silent)."""
        if len(self._connections) >= self.max_connections:
            self._refused_connections += 1
            refused = self._refused_connections
            if refused == 1 or refused % 1000 == 0:
                log.warning("broker_connection_refused", peer=connection.peer, refused=refused,
                            limit=self.max_connections)
            return False
        self._connections.add(connection)
        return True

    def accept(self, connection: Connection, client_id: str, clean_start: bool,
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
            session = self._sessions[client_id] = Session(client_id)
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

    def connection_ended(self, connection: Connection, publish_will: bool,
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
                session.will_timer = self.loop.call_later(
                    delay_s, self._publish_will, session, will)
            else:
                self._publish_will(session, will)
        if not end_session:
            return
        if session.expiry_s == 0:
            self._discard_session(session)
        elif session.expiry_s is not None:
            session.expiry_timer = self.loop.call_later(
                session.expiry_s, self._expire_session, session)

    def _publish_will(self, session: Session, will: Will) -> None:
        session.will_timer = None
        self.publish(new_message(will.topic, will.payload, will.qos, will.retain,
                                      will.properties, session.client_id, self.loop.time()))

    def _expire_session(self, session: Session) -> None:
        session.expiry_timer = None
        if session.connection is None and self._sessions.get(session.client_id) is session:
            log.debug("broker_session_expired", client_id=session.client_id)
            self._discard_session(session)

    def _discard_session(self, session: Session) -> None:
        for subscription in session.subscriptions.values():
            self._unindex(subscription)
        session.subscriptions.clear()
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    # subscriptions ----------------------------------------------------------

    def subscribe(self, session: Session, requests: list[tuple[str, int]],
                   version: int) -> tuple[list[int], list[Subscription]]:
        codes: list[int] = []
        retained_for: list[Subscription] = []
        for full_filter, options in requests:
            try:
                share_group, topic_filter = split_shared(full_filter)
            except ValueError:
                codes.append(RC_TOPIC_FILTER_INVALID if version == MQTT_5 else RC_UNSPECIFIED)
                continue
            if share_group is not None and options & 0x04:
                raise Reject(RC_PROTOCOL_ERROR, "No Local on a shared subscription")
            previous = session.subscriptions.get(full_filter)
            if previous is not None:
                self._unindex(previous)
            subscription = Subscription(session, topic_filter, share_group, options)
            session.subscriptions[full_filter] = subscription
            self._index(subscription)
            codes.append(subscription.qos)
            handling = subscription.retain_handling
            if share_group is None and (handling == 0 or (handling == 1 and previous is None)):
                retained_for.append(subscription)
        return codes, retained_for

    def unsubscribe(self, session: Session, full_filter: str) -> int:
        subscription = session.subscriptions.pop(full_filter, None)
        if subscription is None:
            return RC_NO_SUBSCRIPTION_EXISTED
        self._unindex(subscription)
        return RC_SUCCESS

    def _table(self, topic_filter: str) -> dict[str, FilterEntry]:
        wild = "+" in topic_filter or "#" in topic_filter
        return self._wildcard if wild else self._exact

    def _index(self, subscription: Subscription) -> None:
        table = self._table(subscription.topic_filter)
        entry = table.get(subscription.topic_filter)
        if entry is None:
            entry = table[subscription.topic_filter] = FilterEntry(subscription.topic_filter)
        client_id = subscription.session.client_id
        if subscription.share_group is None:
            entry.plain[client_id] = subscription
        else:
            entry.groups.setdefault(subscription.share_group, SharedGroup()).members[
                client_id] = subscription

    def _unindex(self, subscription: Subscription) -> None:
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

    def publish(self, message: Message) -> bool:
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

    def _retain(self, message: Message) -> bool:
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

    def send_retained(self, subscription: Subscription) -> None:
        now = self.loop.time()
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

    def _deliver(self, session: Session, message: Message, qos: int, retain: bool) -> None:
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

    def acknowledged(self, session: Session, packet_id: int) -> None:
        sent = session.inflight.pop(packet_id, None)
        if sent is not None:
            session.held_bytes -= sent[0].size
            self._pump(session)

    def _pump(self, session: Session) -> None:
        connection = session.connection
        while (connection is not None and session.pending
               and len(session.inflight) < connection.send_quota):
            message, retain = session.pending.popleft()
            self._send_tracked(session, connection, message, retain)
