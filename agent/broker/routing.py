"""Routing: who receives one published message. A retained message is stored first (and the
whole message refused when the store is full); then one copy goes to each client with a
matching plain subscription, at the highest QoS among its overlapping ones, and one to the
next member of each matching shared group."""

from __future__ import annotations

from typing import Any

from agent.broker.delivery import Delivery
from agent.broker.retained import RetainedStore
from agent.broker.sessions import Message, Subscription
from agent.broker.subscriptions import SubscriptionIndex


class Router:
    def __init__(self, subscriptions: SubscriptionIndex, retained: RetainedStore,
                 delivery: Delivery) -> None:
        self._subscriptions = subscriptions
        self._retained = retained
        self._delivery = delivery

    def publish(self, message: Message) -> bool:
        """Store (if retained) and forward one application message; False when the
        retained store is full and the message was refused whole."""
        if message.retain and not self._retained.update(message):
            return False
        targets: dict[str, list[Any]] = {}  # client id -> [session, qos, retain]
        for entry in self._subscriptions.matching(message.topic):
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
                self._delivery.deliver(member.session, message, min(message.qos, member.qos),
                                       False)
        for session, qos, retain in targets.values():
            self._delivery.deliver(session, message, qos, retain)
        return True

    def send_retained(self, subscription: Subscription, now: float) -> None:
        """What a new subscription is owed from the retained store, flagged retained."""
        for message in self._retained.matching(subscription.topic_filter, now):
            self._delivery.deliver(subscription.session, message,
                                   min(message.qos, subscription.qos), True)
