"""Retained messages, one per topic, bounded in topics and in bytes. A retained PUBLISH past
either bound is refused whole (counted and logged); replacing or deleting a stored topic is
always accepted within the byte budget."""

from __future__ import annotations

from agent.broker.sessions import Message
from agent.broker.topics import has_wildcard, topic_matches
from agent.log import get_logger

log = get_logger(__name__)


class RetainedStore:
    def __init__(self, max_topics: int, max_bytes: int) -> None:
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self._messages: dict[str, Message] = {}
        self._bytes = 0
        self._refused = 0

    def update(self, message: Message) -> bool:
        """Store a retained message, or delete its topic's when its payload is empty; False
        when the store is full and the message must be refused."""
        if not message.payload:
            self._remove(message.topic)
            return True
        old = self._messages.get(message.topic)
        held = self._bytes - (old.size if old else 0) + message.size
        if (old is None and len(self._messages) >= self.max_topics) or held > self.max_bytes:
            self._refused += 1
            if self._refused == 1 or self._refused % 1000 == 0:
                log.warning("broker_retained_full", topic=message.topic, origin=message.origin,
                            refused=self._refused, limit_topics=self.max_topics,
                            limit_bytes=self.max_bytes)
            return False
        self._messages[message.topic] = message
        self._bytes = held
        return True

    def matching(self, topic_filter: str, now: float) -> list[Message]:
        """The live retained messages ``topic_filter`` matches; expired ones are deleted."""
        if has_wildcard(topic_filter):
            candidates = [m for topic, m in self._messages.items()
                          if topic_matches(topic_filter, topic)]
        else:
            candidates = [self._messages.get(topic_filter)]
        live = []
        for message in candidates:
            if message is None:
                continue
            if message.expired(now):
                self._remove(message.topic)
            else:
                live.append(message)
        return live

    def _remove(self, topic: str) -> None:
        old = self._messages.pop(topic, None)
        if old is not None:
            self._bytes -= old.size
