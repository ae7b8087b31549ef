"""MQTT test fixtures: real paho observer clients on the test broker."""

from __future__ import annotations

import pytest

from tests.support.observer import Observers


@pytest.fixture
def observer(broker):
    observers = Observers(broker)
    yield observers.connect
    observers.close()
