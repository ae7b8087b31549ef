"""Embedded MQTT 3.1.1 + 5.0 broker: what the quickstart runs where Mosquitto is not installed.

What it is for: a new user can try edge-agent without root and without installing a broker.
Nothing else in edge-agent uses it; its tests run the same clients against it and against a
real Mosquitto.
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
that are not async (the tests).

Modules: ``codec`` (packet and property encoding, reason codes), ``topics`` (name and filter
rules, shared with agent.mqtt.topics), ``sessions`` (messages, sessions, subscriptions as
plain state), ``connection`` (one client socket: framing, writes, close, keepalive),
``connect`` (CONNECT parsed into a ``ConnectRequest``, CONNACK), ``handler`` (what each
packet from a client means), ``registry`` (sessions by client id: takeover, expiry, wills),
``subscriptions`` (the filter index), ``routing`` (fan-out of one message), ``retained``
(the bounded retained store), ``delivery`` (QoS 0/1 to one session: in-flight window and
bounded queue), ``server`` (``EmbeddedBroker``: listener, lifecycle and connection limit,
defaults from ``limits``) and ``cli``. Run it alone with
``python -m agent.broker --port 1883 [--host 127.0.0.1]``.
"""

from agent.broker.server import EmbeddedBroker
from agent.broker.topics import topic_matches, valid_topic_filter, valid_topic_name

__all__ = ["EmbeddedBroker", "topic_matches", "valid_topic_filter", "valid_topic_name"]
