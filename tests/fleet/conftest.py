"""Fleet fixtures: a real controller (MQTT + HTTP) on the real broker, and simulated devices.

The simulated devices are scripts/simulate_fleet.py, the same code `scripts/simulate-fleet`
runs: protocol-correct status/meta/telemetry/events/replies, no model.

The registry is SQLite unless a test module runs on both databases with ``BOTH_REGISTRIES``
(``pytestmark = BOTH_REGISTRIES``): then each test runs once on SQLite and once on its own
database in the session's real PostgreSQL (tests/support/postgres.py).
"""

from __future__ import annotations

import importlib.util
import secrets
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from agent.config import FleetAuthConfig, FleetConfig, FleetRegistryConfig, MQTTConfig
from agent.fleet.auth import hash_secret
from tests.support.broker import free_port
from tests.support.postgres import Postgres

REPO = Path(__file__).resolve().parents[2]


def load_simulator():
    spec = importlib.util.spec_from_file_location(
        "simulate_fleet", REPO / "scripts" / "simulate_fleet.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate_fleet"] = module
    spec.loader.exec_module(module)
    return module


simulate_fleet = load_simulator()


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Credentials:
    token = secrets.token_urlsafe(24)
    password = "correct horse battery staple"
    # Hashed once per session: scrypt is deliberately slow.
    token_hash = hash_secret(token, method="pbkdf2_sha256")
    password_hash = hash_secret(password)


@pytest.fixture(scope="session")
def credentials() -> type[Credentials]:
    return Credentials


def make_config(tmp_path: Path, broker, **overrides) -> FleetConfig:
    values = dict(
        controller_id=f"fleet-test-{secrets.token_hex(3)}",
        mqtt=MQTTConfig(host=broker.host, port=broker.port),
        http_port=free_port(),
        db_path=str(tmp_path / "fleet.db"),
        model_dir=str(tmp_path / "models"),
        wheel_dir=str(tmp_path / "wheels"),
        telemetry_sample_s=0.0,
        ingest_flush_s=0.1,
        default_telemetry_interval_s=1.0,
        auth=FleetAuthConfig(
            admin_password_hash=Credentials.password_hash, api_token_hashes=[Credentials.token_hash]
        ),
    )
    values.update(overrides)
    return FleetConfig(**values)


BOTH_REGISTRIES = pytest.mark.parametrize(
    "registry_backend", ["sqlite", "postgresql"], indirect=True
)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL for the session; tests take databases from it."""
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def registry_backend(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def registry_location(request, registry_backend: str, tmp_path: Path) -> str:
    """What ``Registry`` opens: a SQLite path, or the URL of a fresh PostgreSQL database."""
    if registry_backend == "postgresql":
        return request.getfixturevalue("postgres").fresh_database()
    return str(tmp_path / "fleet.db")


@pytest.fixture
def fleet_config(tmp_path: Path, broker, registry_backend: str, request) -> FleetConfig:
    if registry_backend == "postgresql":
        url = request.getfixturevalue("postgres").fresh_database()
        return make_config(tmp_path, broker, registry=FleetRegistryConfig(url=url))
    return make_config(tmp_path, broker)


@pytest.fixture
def fleet(fleet_config: FleetConfig):
    """A running controller: ``fleet.url``, ``fleet.controller``, ``fleet.config``."""
    from agent.fleet.service import FleetService

    service = FleetService(fleet_config).start()
    assert service.controller.mqtt.wait_connected(10), "controller did not connect to the broker"
    yield service
    service.stop()


@pytest.fixture
def sim(broker):
    """Start simulated devices: ``sim(count, **options) -> SimulatedFleet``; all stopped after."""
    started = []

    def start(count: int, **options):
        options.setdefault("interval_s", 0.5)
        devices = simulate_fleet.SimulatedFleet(broker.host, broker.port, count, **options).start()
        started.append(devices)
        return devices

    yield start
    for devices in started:
        devices.stop()


@pytest.fixture
def api(fleet, credentials):
    """An httpx client with the bearer token, based at the controller."""
    import httpx

    with httpx.Client(
        base_url=fleet.url, headers={"Authorization": f"Bearer {credentials.token}"}, timeout=30
    ) as client:
        yield client
