"""The paho-mqtt 2.x wrapper used by the device daemon (and reusable by the fleet controller).

What it guarantees:

- MQTT 5 by default, 3.1.1 selectable; TLS with verification on by default; username and a
  password read by the caller from a file or ``$CREDENTIALS_DIRECTORY``.
- A persistent session (clean start off + Session Expiry Interval on MQTT 5, clean session off
  on 3.1.1), so QoS 1 messages sent to the device while it was away are delivered; with
  ``session_expiry_s`` 0 the session ends with the connection on both protocols.
- Reconnect with exponential backoff (``agent.mqtt.network``), re-subscribe from a local
  registry on every connect, and no retrying at all once the broker says the credentials are bad.
- A publish is written to the socket by the thread that makes it (``agent.mqtt.network``):
  no hand-off to a network thread per streamed chunk. A small QoS 0 publish on a plain TCP
  connection is built here and written whole (``agent.mqtt.packets``), without paho's
  per-message bookkeeping; everything else is paho's.
- QoS 1 messages published while the broker is away stay in paho's outgoing queue (bounded by
  ``outgoing_queue_limit``) and go out after the reconnect.

What it must not do: run application code in paho's callbacks. They only decode a message into
an :class:`Inbound` or a :class:`ConnectionChange`, which the connection's thread puts on the
caller's queue; the caller's dispatcher thread does the rest.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MQTTConfig, TLSConfig
from agent.errors import ConfigError
from agent.log import get_logger
from agent.mqtt import packets
from agent.mqtt.network import NetworkLoop

log = get_logger(__name__)

# CONNACK reason codes after which retrying cannot help: identifier rejected, bad user name or
# password, not authorized, banned, bad authentication method. paho maps MQTT 3.1.1 return
# codes 2, 4 and 5 onto 133, 134 and 135, so one set covers both protocols.
FATAL_CONNACK_CODES = frozenset({133, 134, 135, 138, 140})
# The socket's send buffer (the kernel doubles it for its bookkeeping): a few hundred chunks,
# and at 100 ms of round trip still ~640 KB/s for a backlog of QoS 1 replies.
SEND_BUFFER_BYTES = 32 * 1024


@dataclass(frozen=True)
class Inbound:
    """One received message, decoded on the connection's I/O thread and handled elsewhere."""

    topic: str
    payload: bytes
    response_topic: str | None = None  # MQTT 5 Response Topic
    correlation_data: bytes | None = None  # MQTT 5 Correlation Data


@dataclass(frozen=True)
class ConnectionChange:
    connected: bool
    session_present: bool = False
    reason: str = ""
    fatal: bool = False  # the broker refused the credentials; the client gave up
    client_id: str = ""  # which connection changed, for a caller that holds more than one


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    delay_s: int = 0  # MQTT 5 Will Delay Interval; ignored on 3.1.1


class _PackedOnce(Properties):
    """PUBLISH properties that are packed once: paho packs them again for every publish."""

    _packed: bytes | None = None

    def pack(self) -> bytes:
        if self._packed is None:
            # Properties.__setattr__ accepts only MQTT property names.
            object.__setattr__(self, "_packed", super().pack())
        assert self._packed is not None
        return self._packed


def _nothing() -> None:
    """The ``on_written`` of a QoS 0 publish nobody waits for."""


class _Deliveries:
    """Which publishes paho has finished with: QoS 1 ones acknowledged (for ``flush``), QoS 0
    ones written to the socket (for a publish's ``on_written``). paho may report either
    before publish() returns the message id to us, so early reports are remembered briefly.
    Every publish is registered (a QoS 0 one without ``on_written`` too), so its report is
    not taken for an early one: left in ``_early``, it would outlive paho's 16-bit message
    ids and mark a later QoS 1 publish with the same id acknowledged before it was.
    Used under the connection's I/O lock, by the publishing threads and the I/O thread."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._unacked: set[int] = set()  # QoS 1 mids not yet acknowledged
        self._early: OrderedDict[int, None] = OrderedDict()  # mids paho finished first
        self._written: dict[int, Callable[[], None]] = {}  # QoS 0 mid -> its on_written

    def published(self, mid: int, qos: int, on_written: Callable[[], None] | None) -> None:
        with self._lock:
            finished = mid in self._early
            if finished:
                del self._early[mid]
            elif qos > 0:
                self._unacked.add(mid)
            else:
                self._written[mid] = on_written or _nothing
        if finished and qos == 0 and on_written is not None:
            on_written()

    def done(self, mid: int) -> None:
        """paho's on_publish: a QoS 1 ack, or a QoS 0 message written."""
        with self._lock:
            on_written = self._written.pop(mid, None)
            if mid in self._unacked:
                self._unacked.discard(mid)
                if not self._unacked:
                    self._lock.notify_all()
            elif on_written is None:
                self._early[mid] = None
                while len(self._early) > 4096:  # only reports of mids paho dropped stay
                    self._early.popitem(last=False)
        if on_written is not None:
            on_written()

    def connection_lost(self) -> None:
        """paho drops the QoS 0 messages still unwritten without a callback: whoever waits
        for them must not wait for ever."""
        with self._lock:
            unwritten, self._written = list(self._written.values()), {}
        for on_written in unwritten:
            on_written()

    def wait_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._unacked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True


class MQTTClient:
    def __init__(
        self,
        config: MQTTConfig,
        *,
        client_id: str,
        inbox: queue.Queue[Inbound | ConnectionChange],
        password: str | None = None,
        will: Will | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.is_v5 = config.protocol == "5"
        self.fatal_reason: str | None = None
        self._connected = threading.Event()
        self._subscriptions: dict[str, int] = {}
        self._subscriptions_lock = threading.Lock()
        self._deliveries = _Deliveries()
        self._last_properties: tuple[bytes, Properties] | None = None
        self._qos0_packets = packets.Qos0Packets(v5=self.is_v5)

        self._client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.is_v5 else paho.MQTTv311,
            # 3.1.1 has no expiry interval: a session either persists or ends with the connection.
            clean_session=None if self.is_v5 else config.session_expiry_s == 0,
        )
        self._client.suppress_exceptions = True  # a bug in a callback must not kill the I/O thread
        self._client.max_queued_messages_set(config.outgoing_queue_limit)
        self._network = NetworkLoop(
            self._client, name=client_id, deliver=inbox.put,
            reconnect_min_s=max(1, round(config.reconnect_min_s)),
            reconnect_max_s=max(1, round(config.reconnect_max_s)),
            on_connect_fail=self._on_connect_fail,
        )
        username = config.username or client_id
        self._client.username_pw_set(username, password)
        if config.tls.enabled:
            _configure_tls(self._client, config.tls)
        if will is not None:
            self._client.will_set(
                will.topic, will.payload, qos=will.qos, retain=will.retain,
                properties=_will_properties(will) if self.is_v5 else None,
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = self._on_socket_open

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; the connection's thread keeps reconnecting until stop()."""
        properties = None
        if self.is_v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_s
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False if self.is_v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._network.start()
        log.info("mqtt_connecting", host=self.config.host, port=self.config.port,
                 protocol=self.config.protocol, client_id=self.client_id, tls=self.config.tls.enabled)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS 1 message published so far was acknowledged; False on timeout."""
        return self._deliveries.wait_acked(timeout)

    def stop(self) -> None:
        """A normal disconnect (the broker discards the Will), then stop the connection's thread."""
        self._network.stop()
        self._connected.clear()

    # -- subscriptions and publishing -----------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add ``topic`` to the registry; it is (re-)subscribed on every connect."""
        with self._subscriptions_lock:
            self._subscriptions[topic] = qos
        if self.connected:
            with self._network.io:
                self._client.subscribe(topic, qos)
            self._network.written()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        on_written: Callable[[], None] | None = None,
    ) -> bool:
        """Publish now or, for QoS 1 while disconnected, after the reconnect.

        ``response_topic`` and ``correlation_data`` are MQTT 5 properties (left out on 3.1.1).
        False when the message was dropped: QoS 0 while disconnected, or the outgoing queue
        is full (logged). ``on_written`` (QoS 0): called once the message has been written to
        the socket, or the connection it waited for was lost; it runs under the connection's
        I/O lock (often inside this call), so it must only enqueue.
        """
        if qos == 0 and not retain and response_topic is None \
                and self._publish_whole(topic, payload, correlation_data, on_written):
            return True
        properties = None
        if response_topic is not None and self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        elif correlation_data is not None and self.is_v5:
            properties = self._correlation_properties(correlation_data)
        with self._network.io:
            info = self._client.publish(topic, payload, qos=qos, retain=retain,
                                        properties=properties)
        self._network.written()
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            log.error("mqtt_outgoing_queue_full", topic=topic, limit=self.config.outgoing_queue_limit)
            return False
        if qos == 0 and info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        self._deliveries.published(info.mid, qos, on_written)
        return True

    def _publish_whole(self, topic: str, payload: bytes, correlation_data: bytes | None,
                       on_written: Callable[[], None] | None) -> bool:
        """A QoS 0 publish built here and written at once (agent.mqtt.packets): a streamed
        reply's chunks skip paho's per-message bookkeeping. False: paho publishes it."""
        packet = self._qos0_packets.build(topic, payload, correlation_data)
        if packet is None:
            return False
        with self._network.io:
            if not self._network.send_whole(packet):
                return False
            if on_written is not None:
                on_written()
        return True

    def _correlation_properties(self, correlation_data: bytes) -> Properties:
        # A streamed reply publishes one chunk per token with the same Correlation Data;
        # building and packing paho's Properties each time was a measurable share of the
        # per-chunk cost, so the last one is reused (read-only once made; paho only packs it).
        cached = self._last_properties
        if cached is not None and cached[0] == correlation_data:
            return cached[1]
        properties = _PackedOnce(PacketTypes.PUBLISH)
        properties.CorrelationData = correlation_data
        self._last_properties = (correlation_data, properties)
        return properties

    # -- paho callbacks (under the I/O lock: decode and defer only) -------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Streamed chunks are small writes in quick succession. With Nagle's algorithm on (paho
        # leaves it on) a small write waits until the previous one is acknowledged, and the
        # peer delays that ACK by up to 40 ms: measured, ~30 ms of publish -> first chunk.
        # The broker needs the same for its side (mosquitto's set_tcp_nodelay).
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A bounded send buffer: Linux grows it to megabytes, and on a slow link every
            # chunk would then count as written at once and wait there, seconds behind. Bounded,
            # a backed-up line shows as unwritten publishes, which agent.replies coalesces.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            if reason_code.value in FATAL_CONNACK_CODES:
                self.fatal_reason = str(reason_code)
                log.error("mqtt_credentials_rejected", reason=self.fatal_reason,
                          username=self.config.username or self.client_id, host=self.config.host,
                          hint="check mqtt.username and the password file; not retrying")
                self._network.give_up()
                client.disconnect()
                self._network.defer(ConnectionChange(False, reason=self.fatal_reason, fatal=True,
                                                     client_id=self.client_id))
            else:
                log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        with self._subscriptions_lock:
            wanted = list(self._subscriptions.items())
        if wanted:
            client.subscribe(wanted)
        self._connected.set()
        log.info("mqtt_connected", session_present=bool(flags.session_present),
                 subscriptions=len(wanted))
        self._network.defer(ConnectionChange(True, session_present=bool(flags.session_present),
                                             client_id=self.client_id))

    def _on_connect_fail(self, error: OSError) -> None:
        log.warning("mqtt_connect_failed", host=self.config.host, port=self.config.port,
                    tls=self.config.tls.enabled, error=f"{type(error).__name__}: {error}")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._deliveries.connection_lost()
        if was_connected:
            log.warning("mqtt_disconnected", reason=str(reason_code))
            self._network.defer(ConnectionChange(False, reason=str(reason_code),
                                                 client_id=self.client_id))
        elif self.fatal_reason is None and reason_code.is_failure:
            # Closed before CONNACK: e.g. a broker that wants a client certificate (TLS 1.3
            # lets the handshake finish and refuses it at the first read).
            log.warning("mqtt_connect_failed", host=self.config.host, port=self.config.port,
                        tls=self.config.tls.enabled, error=str(reason_code),
                        hint="the broker closed the connection before CONNACK; its log says why "
                             "(a missing mqtt.tls.cert_file where it requires client certificates)")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        response_topic = correlation_data = None
        props = message.properties
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation_data = getattr(props, "CorrelationData", None)
        # Delivered by the connection's thread, which blocks while the dispatcher is far behind
        # and reads no more: TCP back-pressure instead of unbounded memory.
        self._network.defer(Inbound(
            topic=message.topic,
            payload=bytes(message.payload),
            response_topic=response_topic,
            correlation_data=bytes(correlation_data) if correlation_data is not None else None,
        ))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Any) -> None:
        self._deliveries.done(mid)


def _will_properties(will: Will) -> Properties:
    properties = Properties(PacketTypes.WILLMESSAGE)
    properties.WillDelayInterval = will.delay_s
    return properties


def _configure_tls(client: paho.Client, tls: TLSConfig) -> None:
    try:
        client.tls_set(
            ca_certs=tls.ca_file,
            certfile=tls.cert_file,
            keyfile=tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"mqtt.tls: cannot set up TLS: {exc}", key="mqtt.tls") from exc

