"""The ACL that `edge-agent fleet acl --inventory` generates, on the shipped broker example (real
mosquitto, TLS, passwords) with a real agent under it: pool membership is an ACL rule, and an
account the inventory does not list, such as `all` or `pool`, may do nothing."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.config import MQTTConfig, TLSConfig
from agent.fleet.controller import FleetController
from tests.fleet.conftest import make_config, wait_for
from tests.service.conftest import PASSWORDS

NOT_AUTHORIZED = 0x87
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
INVENTORY = """\
controllers: [controller]
applications: [app-1]
devices:
  - {id: dev-a, pool: kitchen}
  - {id: dev-b, pool: hall}
"""


def fleet_acl(tmp_path: Path, inventory: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "devices.yaml"
    path.write_text(inventory)
    return subprocess.run([EDGE_AGENT, "fleet", "acl", "--inventory", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def acl_text(tmp_path: Path) -> str:
    """Overrides tests/service/conftest.py: the broker runs the generated ACL."""
    generated = fleet_acl(tmp_path, INVENTORY)
    assert generated.returncode == 0, generated.stderr
    # Nothing is granted to unlisted accounts: no `pattern` line.
    assert not [line for line in generated.stdout.splitlines() if line.startswith("pattern")]
    return generated.stdout


def test_a_real_agent_in_a_pool_works_and_other_devices_and_pools_are_denied(
        connect_as, agent_as) -> None:
    controller = connect_as("controller")
    assert not controller.subscribe("edge/v1/#").is_failure
    snooper = connect_as("dev-b")  # a device of another pool
    for topic in ("edge/v1/pool/kitchen/prompt", "edge/v1/pool/+/prompt", "edge/v1/dev-a/prompt",
                  "edge/v1/dev-a/cmd"):
        snooper.subscribe(topic)
    agent_as("dev-a", pool="kitchen")
    controller.wait_for(lambda t, p: t == "edge/v1/dev-a/status"
                        and json.loads(p)["state"] in ("ready", "busy"))

    def ask(sender, topic: str, request_id: str) -> dict:
        body = {"id": request_id, "prompt": "Say hi", "max_tokens": 3, "temperature": 0}
        assert sender.publish(topic, json.dumps(body)) == 0
        _, final = controller.wait_for(lambda t, p: t == f"edge/v1/dev-a/reply/{request_id}"
                                       and json.loads(p).get("done"))
        return json.loads(final)

    # Its own prompt, and its pool's prompt through $share/kitchen/..., from the controller.
    assert "usage" in ask(controller, "edge/v1/dev-a/prompt", "direct")
    assert "usage" in ask(controller, "edge/v1/pool/kitchen/prompt", "pooled")
    # An application sends a pool prompt too and reads the answer on the default reply topic.
    app = connect_as("app-1")
    assert not app.subscribe("edge/v1/+/reply/#").is_failure
    assert "usage" in ask(app, "edge/v1/pool/kitchen/prompt", "from-app")
    app.wait_for(lambda t, p: t == "edge/v1/dev-a/reply/from-app" and json.loads(p).get("done"))
    assert app.publish("edge/v1/dev-a/cmd", '{"id": "c-app", "op": "drain"}') == NOT_AUTHORIZED

    # The device of pool `hall` read none of it, and cannot write into pool `kitchen` or dev-a.
    assert snooper.received(within_s=0.5) == []
    assert snooper.publish("edge/v1/pool/kitchen/prompt", '{"id": "evil"}') == NOT_AUTHORIZED
    assert snooper.publish("edge/v1/dev-a/cmd", '{"id": "evil", "op": "drain"}') == NOT_AUTHORIZED


@pytest.mark.parametrize(("account", "topic"), [
    ("all", "edge/v1/all/cmd"), ("pool", "edge/v1/pool/kitchen/prompt"), ("all", "edge/v1/all/status"),
])
def test_accounts_the_inventory_does_not_list_may_do_nothing(connect_as, account, topic) -> None:
    intruder = connect_as(account)  # it has a password: the ACL alone must stop it
    device = connect_as("dev-a")
    assert intruder.connect_reason == 0
    assert not device.subscribe("edge/v1/all/cmd").is_failure
    assert not device.subscribe("$share/kitchen/edge/v1/pool/kitchen/prompt").is_failure
    assert intruder.publish(topic, '{"id": "evil", "op": "drain"}') == NOT_AUTHORIZED
    assert device.received(within_s=0.5) == []


@pytest.mark.parametrize(("inventory", "message"), [
    ("devices: [all]\n", "devices[0].id: 'all' is a reserved topic word"),
    ("devices: [{id: pool}]\n", "devices[0].id: 'pool' is a reserved topic word"),
    ("devices: [dev-a, dev-a]\n", "devices[1].id: 'dev-a' is already devices[0].id"),
    ("devices: ['a b']\n", "devices[0].id: 'a b': use letters"),
    ("devices: [{id: x, pool: 'k#'}]\n", "devices[0].pool"),
    ("controllers: [dev-a]\ndevices: [dev-a]\n", "already controllers[0]"),
    ("devices: [x]\ncolour: red\n", "unknown field `colour`"),
    ("devices: ['dev 1']\n", "devices[0].id: 'dev 1': use letters"),
    ("devices: [kïtchen]\n", "devices[0].id: 'kïtchen': use letters"),
    # One Home Assistant node name (`a_b`) for both: each could write the other's discovery configs.
    ("home_assistant_prefix: homeassistant\ndevices: [a-b, a.b]\n",
     "devices[1].id: 'a.b' has the Home Assistant node name 'a_b' of devices[0].id 'a-b'"),
    ("devices: [a_b, {id: a-b, pool: k}]\n", "devices[1].id: 'a-b' has the Home Assistant node name"),
])
def test_the_generator_refuses_a_bad_inventory(tmp_path: Path, inventory: str, message: str) -> None:
    result = fleet_acl(tmp_path, inventory)
    assert result.returncode == 2 and result.stdout == ""
    assert "config_invalid" in result.stderr and message in result.stderr


def test_each_account_reads_its_own_reply_inbox_only(connect_as) -> None:
    # A device answers into edge/v1/reply/<account>/<key>; the controller reads its inbox and
    # not the application's, the application its own and not the controller's.
    controller, app = connect_as("controller"), connect_as("app-1")
    for reader in (controller, app):
        for topic in ("edge/v1/reply/controller/+", "edge/v1/reply/app-1/+", "edge/v1/reply/#"):
            reader.subscribe(topic)
    device = connect_as("dev-a")
    assert device.publish("edge/v1/reply/controller/k1", '{"id": "to-ctl"}') == 0
    assert device.publish("edge/v1/reply/app-1/k2", '{"id": "to-app"}') == 0
    assert {t for t, _ in controller.received()} == {"edge/v1/reply/controller/k1"}
    assert {t for t, _ in app.received()} == {"edge/v1/reply/app-1/k2"}
    # A device still writes no other device's replies.
    assert device.publish("edge/v1/dev-b/reply/x", '{"id": "evil"}') == NOT_AUTHORIZED


def test_a_controller_whose_id_is_not_its_account_gets_its_replies(
        acl_broker, agent_as, tmp_path: Path) -> None:
    """The inbox is keyed by the account the ACL lets read it, not by controller_id (which
    defaults to fleet-<host>): under the shipped account `controller`, replies arrive."""
    agent_as("dev-a", pool="kitchen")
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "mqtt-password").write_text(PASSWORDS["controller"])
    endpoint = SimpleNamespace(host="localhost", port=acl_broker.tls_port)
    mqtt = MQTTConfig(host=endpoint.host, port=endpoint.port, username="controller",
                      tls=TLSConfig(enabled=True, ca_file=str(acl_broker.ca_file)),
                      password_file=str(tmp_path / "ctl" / "mqtt-password"))
    config = make_config(tmp_path / "ctl", endpoint, controller_id="fleet-some-host", mqtt=mqtt)
    controller = FleetController(config).start()
    try:
        assert controller.mqtt.wait_connected(10)
        wait_for(lambda: getattr(controller.registry.devices.get("dev-a"), "state", None)
                 in ("ready", "busy"), 60, "the agent to be ready")
        records: queue.Queue[dict] = queue.Queue()
        sent = controller.send_prompt("dev-a", {"id": "acl-inbox", "prompt": "Say hi",
                                                "max_tokens": 3, "temperature": 0}, records.put)
        final: dict = {}
        while not final.get("done"):
            final = records.get(timeout=60)
        controller.remove_waiter(sent.key)
        assert final["id"] == "acl-inbox" and "usage" in final, final
    finally:
        controller.stop()
