"""Topic names of the MQTT contract (DESIGN.md), shared by the device daemon and the fleet controller.

Everything under ``<prefix>/<device_id>/`` belongs to one device; ``<prefix>/pool/<pool>/prompt``
and ``<prefix>/all/cmd`` are shared. Pure string work: no I/O, no paho.
"""

from __future__ import annotations

from dataclasses import dataclass

# Topic levels a device id or request id must never contain: they would change the topic's shape.
_RESERVED_IN_LEVEL = frozenset("/+#\x00")
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string limit


def is_valid_level(text: str) -> bool:
    """True when ``text`` can be one topic level: non-empty, no separators or wildcards."""
    return bool(text) and not (_RESERVED_IN_LEVEL & set(text)) and len(text.encode()) <= 1024


def is_valid_publish_topic(topic: str) -> bool:
    """True when a client may publish to ``topic`` (no wildcards, no NUL, not $-reserved)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic or topic.startswith("$"):
        return False
    return len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES and _encodes(topic)


def _encodes(topic: str) -> bool:
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800"
        return False
    return True


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device."""

    device_id: str
    prefix: str = "edge/v1"

    def __post_init__(self) -> None:
        if not is_valid_level(self.device_id):
            raise ValueError(f"device id {self.device_id!r} cannot be a topic level")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def meta(self) -> str:
        return f"{self.base}/meta"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def prompt(self) -> str:
        return f"{self.base}/prompt"

    @property
    def cmd(self) -> str:
        return f"{self.base}/cmd"

    @property
    def cmd_result(self) -> str:
        return f"{self.base}/cmd/result"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def reply(self, request_id: str) -> str:
        """Default reply topic when neither a Response Topic nor ``reply_to`` was given."""
        return f"{self.base}/reply/{request_id}"

    @property
    def broadcast_cmd(self) -> str:
        return broadcast_cmd(self.prefix)


def pool_prompt(pool: str, prefix: str = "edge/v1") -> str:
    """Where a controller publishes a prompt for any device of ``pool``."""
    return f"{prefix}/pool/{pool}/prompt"


def shared_pool_subscription(pool: str, prefix: str = "edge/v1") -> str:
    """What a device of ``pool`` subscribes to, so the broker gives each prompt to one device."""
    return f"$share/{pool}/{pool_prompt(pool, prefix)}"


def broadcast_cmd(prefix: str = "edge/v1") -> str:
    return f"{prefix}/all/cmd"


def device_of(topic: str, prefix: str = "edge/v1") -> tuple[str, str] | None:
    """Split ``<prefix>/<device>/<rest>`` into (device, rest); None for other topics."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    device, _, rest = topic[len(head) :].partition("/")
    if not device or not rest or device in ("pool", "all"):
        return None
    return device, rest
