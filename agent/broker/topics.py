"""Topic names and filters as a broker sees them: the contract's rules from agent.mqtt.topics,
with ``$`` an ordinary first character (only a leading wildcard must not match ``$`` topics)
and ``$share/<group>/<filter>`` shared subscriptions."""

from __future__ import annotations

from agent.mqtt.topics import filter_matches, is_valid_filter, is_valid_publish_topic


def valid_topic_name(topic: str) -> bool:
    """The contract's topic-name rule without its ban on ``$`` topics, as for filters."""
    if topic.startswith("$"):
        return is_valid_publish_topic("x" + topic[1:])
    return is_valid_publish_topic(topic)


def valid_topic_filter(topic_filter: str) -> bool:
    """The contract's filter syntax without its ban on ``$`` filters: to a broker
    ``$SYS/#`` is plain MQTT (only a leading wildcard must not match such topics)."""
    if topic_filter.startswith("$"):
        # '$' is an ordinary character to the syntax: check the same shape without it.
        return is_valid_filter("x" + topic_filter[1:])
    return is_valid_filter(topic_filter)


def split_shared(full_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> (group, filter); a plain filter -> (None, filter)."""
    if not full_filter.startswith("$share/"):
        if not valid_topic_filter(full_filter):
            raise ValueError(full_filter)
        return None, full_filter
    parts = full_filter.split("/", 2)
    if len(parts) != 3 or not parts[1] or any(c in parts[1] for c in "+#"):
        raise ValueError(full_filter)
    if not valid_topic_filter(parts[2]):
        raise ValueError(full_filter)
    return parts[1], parts[2]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; a filter starting with a wildcard does not match a ``$`` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return filter_matches(topic_filter, topic)


def has_wildcard(topic_filter: str) -> bool:
    """A filter without wildcards matches one topic, its own name: found by a dict lookup."""
    return "+" in topic_filter or "#" in topic_filter
