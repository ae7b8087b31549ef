"""The rules for names and topics of the MQTT contract (DESIGN.md): which text is a device id,
a topic level, a topic a client may publish to, or a subscription filter.

A bottom-layer module (pure string work, imports nothing of the agent) so that agent.config
validates with the same rules agent.mqtt.topics and agent.fleet.acl apply.
"""

from __future__ import annotations

import re

# Topic levels a device id or request id must never contain: they would change the topic's shape.
_RESERVED_IN_LEVEL = frozenset("/+#\x00")
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string limit

# One rule for device ids (and the ACL's account and pool names), the same as install.sh's
# --device-id check: the id is a topic level, the MQTT client id, the username the ACL keys on and
# a word of the ACL file, whose lines mosquitto splits on whitespace. Starting with a letter or
# digit also keeps out '$' (the broker's own topics and $share).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# The fixed words of the contract. ``all`` and ``pool`` sit where a device id sits
# (``<prefix>/all/cmd``, ``<prefix>/pool/<pool>/prompt``): a device with such an id would own
# the broadcast command or the pool prompts under any ACL keyed on the username. The per-device
# words are reserved as well, so that no id can ever be read as a part of the contract.
RESERVED_DEVICE_IDS = frozenset(
    {"all", "pool", "status", "meta", "telemetry", "prompt", "cmd", "result", "events", "reply"}
)


def is_valid_level(text: str) -> bool:
    """True when ``text`` can be one topic level: non-empty, no separators or wildcards."""
    return bool(text) and not (_RESERVED_IN_LEVEL & set(text)) and len(text.encode()) <= 1024


def device_id_problem(device_id: str) -> str | None:
    """Why ``device_id`` cannot name a device, or None when it can."""
    if device_id in RESERVED_DEVICE_IDS:
        return (f"{device_id!r} is a reserved topic word; none of "
                f"{', '.join(sorted(RESERVED_DEVICE_IDS))} can be a device id")
    if not SAFE_NAME.fullmatch(device_id):
        return (f"{device_id[:80]!r}: use letters, digits, '.', '_', '-', starting with a letter "
                "or digit (at most 64)")
    return None


def is_valid_device_id(device_id: str) -> bool:
    return device_id_problem(device_id) is None


def is_valid_publish_topic(topic: str) -> bool:
    """True when a client may publish to ``topic`` (no wildcards, no NUL, not $-reserved)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic or topic.startswith("$"):
        return False
    return len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES and _encodes(topic)


def is_valid_filter(topic_filter: str) -> bool:
    """True for a subscription filter: ``+`` alone in a level, ``#`` alone and last, not ``$``."""
    if not topic_filter or "\x00" in topic_filter or topic_filter.startswith("$"):
        return False
    if not _encodes(topic_filter) or len(topic_filter.encode()) > MAX_TOPIC_BYTES:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _encodes(topic: str) -> bool:
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800"
        return False
    return True
