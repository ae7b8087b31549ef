"""The embedded broker's default bounds: memory, connections and time a client may take."""

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
