"""MQTT test fixtures: real paho observer clients on the test broker."""

from __future__ import annotations

import pytest

from tests.support.observer import Observer


@pytest.fixture
def observer(broker):
    made: list[Observer] = []

    def connect() -> Observer:
        made.append(Observer(broker.host, broker.port))
        return made[-1]

    yield connect
    for o in made:
        o.close()
