"""Who is subscribed to what: each session's subscriptions, and every filter indexed for
routing. Filters without wildcards sit in a dict looked up once per message; only wildcard
filters are matched one by one."""

from __future__ import annotations

from agent.broker.codec import (
    MQTT_5,
    RC_NO_SUBSCRIPTION_EXISTED,
    RC_PROTOCOL_ERROR,
    RC_SUCCESS,
    RC_TOPIC_FILTER_INVALID,
    RC_UNSPECIFIED,
    Reject,
)
from agent.broker.sessions import FilterEntry, Session, SharedGroup, Subscription
from agent.broker.topics import has_wildcard, split_shared, topic_matches


class SubscriptionIndex:
    def __init__(self) -> None:
        self._exact: dict[str, FilterEntry] = {}
        self._wildcard: dict[str, FilterEntry] = {}

    def subscribe(self, session: Session, requests: list[tuple[str, int]],
                  version: int) -> tuple[list[int], list[Subscription]]:
        """SUBACK's reason codes, and the subscriptions that are owed retained messages."""
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

    def remove_session(self, session: Session) -> None:
        for subscription in session.subscriptions.values():
            self._unindex(subscription)
        session.subscriptions.clear()

    def matching(self, topic: str) -> list[FilterEntry]:
        """Every indexed filter that ``topic`` matches."""
        entries = []
        exact = self._exact.get(topic)
        if exact is not None:
            entries.append(exact)
        if self._wildcard:
            entries.extend(e for e in self._wildcard.values()
                           if topic_matches(e.topic_filter, topic))
        return entries

    def _table(self, topic_filter: str) -> dict[str, FilterEntry]:
        return self._wildcard if has_wildcard(topic_filter) else self._exact

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
