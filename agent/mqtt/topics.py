"""Topic names of the MQTT contract (DESIGN.md), shared by the device daemon and the fleet controller.

Everything under ``<prefix>/<device_id>/`` belongs to one device; ``<prefix>/pool/<pool>/prompt``
and ``<prefix>/all/cmd`` are shared; ``<prefix>/reply/<requester>/`` is a requester's reply inbox
(a controller's: it subscribes to its own only). Which topics a device may answer on is decided here too
(``ReplyPolicy``), so the daemon and its tests share one rule. Pure string work: no I/O, no paho.
"""

from __future__ import annotations

from dataclasses import dataclass

# The validity rules live in the bottom layer so that agent.config shares them; re-exported here
# for the daemon, the controller and the payload parsers.
from agent.topic_rules import (  # noqa: F401
    RESERVED_DEVICE_IDS,
    device_id_problem,
    is_valid_device_id,
    is_valid_filter,
    is_valid_level,
    is_valid_publish_topic,
)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of one topic against one (valid) filter: ``+`` one level, ``#`` the rest."""
    wanted = topic_filter.split("/")
    levels = topic.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True  # also matches the parent itself: "a/#" matches "a"
        if index >= len(levels) or (level != "+" and level != levels[index]):
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device."""

    device_id: str
    prefix: str = "edge/v1"

    def __post_init__(self) -> None:
        problem = device_id_problem(self.device_id)
        if problem:
            raise ValueError(f"device id {problem}")  # the problem names the id

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


@dataclass(frozen=True)
class ReplyPolicy:
    """Which topics a device answers on when a prompt names one (Response Topic or ``reply_to``).

    A requester could otherwise make the device write into any topic of the fleet: another
    device's ``cmd`` or ``status``, its own ``status``, Home Assistant's discovery configs. So
    inside the protected trees (the topic prefix, the discovery prefix) only the device's own
    ``reply/`` subtree and the configured filters are allowed; outside them anything a client
    may publish to is (the broker's ACL decides the rest)."""

    own_replies: str  # "<prefix>/<device>/reply": its subtree is always allowed
    protected: tuple[str, ...]  # topic trees a reply may not enter
    allowed: tuple[str, ...] = ()  # filters inside them that replies may use (mqtt.reply_topics)
    # "<prefix>/reply": requesters' inboxes, <requester>/<key> below it, always allowed.
    # ``reply`` is never a device id, so no device's topics are in there; a reply written into
    # someone else's inbox is dropped there, as its key is not one they are waiting on.
    inboxes: str = ""

    @classmethod
    def for_device(cls, topics: DeviceTopics, *, discovery_prefix: str,
                   allowed: list[str] | tuple[str, ...] = ()) -> "ReplyPolicy":
        return cls(f"{topics.base}/reply", (topics.prefix, discovery_prefix), tuple(allowed),
                   inboxes=reply_inboxes(topics.prefix))

    def refusal(self, topic: str) -> str | None:
        """Why replies may not go to ``topic``, or None when they may."""
        if not is_valid_publish_topic(topic):
            return "must be a topic without wildcards, NUL or a leading '$'"
        if topic.startswith(self.own_replies + "/"):
            return None
        if self.inboxes and filter_matches(f"{self.inboxes}/+/+", topic):
            return None
        if any(filter_matches(allowed, topic) for allowed in self.allowed):
            return None
        for root in self.protected:
            if topic == root or topic.startswith(root + "/"):
                return (f"{topic[:120]!r} is inside the topic tree {root}/; use this device's "
                        f"{self.own_replies}/ subtree, a topic outside it, or list it in "
                        "mqtt.reply_topics")
        return None


def reply_inboxes(prefix: str = "edge/v1") -> str:
    """The tree of requesters' reply inboxes: ``<prefix>/reply/<requester id>/<key>``."""
    return f"{prefix}/reply"


def reply_inbox(requester_id: str, prefix: str = "edge/v1") -> str:
    """Where replies to ``requester_id`` (a controller's or an application's id) go."""
    return f"{reply_inboxes(prefix)}/{requester_id}"


def pool_prompt(pool: str, prefix: str = "edge/v1") -> str:
    """Where a controller publishes a prompt for any device of ``pool``."""
    return f"{prefix}/pool/{pool}/prompt"


def shared_pool_subscription(pool: str, prefix: str = "edge/v1") -> str:
    """What a device of ``pool`` subscribes to, so the broker gives each prompt to one device."""
    return f"$share/{pool}/{pool_prompt(pool, prefix)}"


def broadcast_cmd(prefix: str = "edge/v1") -> str:
    return f"{prefix}/all/cmd"


def device_of(topic: str, prefix: str = "edge/v1") -> tuple[str, str] | None:
    """Split ``<prefix>/<device>/<rest>`` into (device, rest); None for other topics, and for
    a level that cannot be a device id (``pool``, ``all``, …): nobody is learned from those."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    device, _, rest = topic[len(head) :].partition("/")
    if not rest or not is_valid_device_id(device):
        return None
    return device, rest
