"""agent.upgrade on this machine: the op's bounds, the guard's decisions on a real releases
directory, refusals (tampered or mislabelled wheels from a real HTTP server) that leave
everything as it was, and a whole install: a real wheel built at another version, pip into a
copy of the current venv, the switch. The restart through systemd and the rollback of a
version that fails to start run in tests/service/test_container.py."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import msgspec
import pytest

from agent import __version__
from agent.catalog.wheels import AgentWheel, WheelIndex, encode_index
from agent.config import FetchConfig, SigningConfig, UpgradeConfig
from agent.errors import EdgeAgentError, RequestError
from agent.mqtt import payloads
from agent.upgrade import (
    EXIT_RESTART_FOR_UPGRADE,
    EXIT_TRIAL_FAILED,
    AgentUpgrades,
    Releases,
    Trial,
    guard,
)
from tests.service.container import ensure_wheelhouse
from tests.support.agent_wheels import build_agent_wheel
from tests.support.signing import TEST_PRIVATE_KEY, TEST_PUBLIC_KEY, sign_file

NEW = f"{__version__}.post7"


def upgrade_cmd(**args: object) -> bytes:
    base = {"version": NEW, "url": "http://127.0.0.1:9/w.whl", "sha256": "a" * 64, "size": 10}
    return json.dumps({"id": "up-1", "op": "upgrade", "args": {**base, **args}}).encode()


@pytest.mark.parametrize("args, field", [
    ({"version": "../../etc"}, "args.version"),
    ({"version": ""}, "args.version"),
    ({"version": "1" * 65}, "args.version"),
    ({"url": "file:///etc/shadow"}, "args.url"),
    ({"url": "ftp://controller/w.whl"}, "args.url"),
    ({"url": "http://user:pw@controller/w.whl"}, "args.url"),
    ({"url": "http://c/" + "x" * 3000}, "args.url"),
    ({"sha256": "0" * 63}, "args.sha256"),
    ({"size": 0}, "args.size"),
    ({"size": payloads.MAX_WHEEL_BYTES + 1}, "args.size"),
    ({"extra": 1}, "args.extra"),
])
def test_upgrade_args_are_bounded_at_the_boundary(args: dict, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        payloads.decode_command(upgrade_cmd(**args), max_bytes=64 * 1024)
    assert caught.value.details["field"] == field


def test_a_well_formed_upgrade_decodes_to_its_struct() -> None:
    command = payloads.decode_command(upgrade_cmd(), max_bytes=64 * 1024)
    assert isinstance(command.args, payloads.UpgradeArgs) and command.args.version == NEW


# -- the guard ---------------------------------------------------------------------------------

def layout(tmp_path: Path, *, trial_version: str = NEW, previous: bool = True) -> Releases:
    """installed (a stand-in venv), a new version dir, current on it, previous on installed."""
    root = tmp_path / "releases"
    root.mkdir()
    base = tmp_path / "venv"
    base.mkdir()
    releases = Releases(root)
    releases.point(releases.installed, base)
    (root / trial_version).mkdir()
    if previous:
        releases.point(releases.previous, base)
    releases.point(releases.current, root / trial_version)
    releases.write_trial(Trial(version=trial_version, previous_version=__version__,
                               deadline=time.time() + 600))
    return releases


def test_guard_gives_a_new_version_one_start_then_rolls_back(tmp_path: Path) -> None:
    releases = layout(tmp_path)
    assert guard(releases.root) == "trying"
    assert releases.target(releases.current) == (releases.root / NEW).resolve()
    # The same trial at the next start: the new version stopped before it was healthy.
    assert guard(releases.root) == "rolled_back"
    assert releases.target(releases.current) == (tmp_path / "venv").resolve()
    assert releases.read_trial() is None
    outcome = releases.read_outcome()
    assert outcome is not None and outcome.event == "agent_rolled_back" and outcome.version == NEW
    assert guard(releases.root) == "none"  # and the old version starts normally from then on


def test_guard_rolls_back_past_the_deadline_to_installed_without_previous(tmp_path: Path) -> None:
    releases = layout(tmp_path, previous=False)
    assert guard(releases.root, now=time.time() + 3600) == "rolled_back"
    assert releases.target(releases.current) == (tmp_path / "venv").resolve()
    outcome = releases.read_outcome()
    assert outcome is not None and "deadline" in (outcome.reason or "")


def test_guard_drops_a_trial_that_current_no_longer_points_at(tmp_path: Path) -> None:
    releases = layout(tmp_path)
    releases.point(releases.current, tmp_path / "venv")  # an admin ran install.sh again
    assert guard(releases.root) == "stale"
    assert releases.read_trial() is None and releases.read_outcome() is None
    assert releases.target(releases.current) == (tmp_path / "venv").resolve()


# -- the op --------------------------------------------------------------------------------------

class Calls:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.exits: list[int] = []


SIGNED = SigningConfig(public_key=TEST_PUBLIC_KEY)
UNSIGNED = SigningConfig(allow_unsigned=True)


def upgrades_for(releases: Releases | None, calls: Calls,
                 signing: SigningConfig = SIGNED) -> AgentUpgrades:
    return AgentUpgrades(
        UpgradeConfig(releases_dir=str(releases.root) if releases else None),
        FetchConfig(retries=0), signing,
        publish_event=lambda name, **f: calls.events.append({"event": name, **f}),
        request_exit=calls.exits.append, connected=lambda: True, model_loaded=lambda: True)


@pytest.fixture(scope="module")
def new_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent_wheel(tmp_path_factory.mktemp("wheels"), NEW, find_links=ensure_wheelhouse())


def running_layout(tmp_path: Path) -> Releases:
    """What install.sh leaves: current and installed on the venv it built."""
    base = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True,
                   timeout=120)
    # The venv's dependencies (and pip) are this test environment's, through a .pth line: a
    # stand-in for install.sh's venv without installing every package again.
    purelib = sysconfig.get_paths()["purelib"]
    site = next((base / "lib").glob("python3*/site-packages"))
    (site / "test-environment.pth").write_text(purelib + "\n")
    root = tmp_path / "releases"
    root.mkdir()
    releases = Releases(root)
    releases.point(releases.installed, base)
    releases.point(releases.current, base)
    return releases


def serve(range_server, wheel: Path, *, listed_sha256: str | None = None,
          private_key: str = TEST_PRIVATE_KEY) -> str:
    """The wheel under a wheelhouse as a controller serves it, with an index signed by
    ``private_key`` that lists it (with ``listed_sha256``, if given, instead of its own)."""
    path = f"agent/{NEW}/{wheel.name}"
    wheels = range_server.root / "files" / "wheels"
    (wheels / path).parent.mkdir(parents=True, exist_ok=True)
    (wheels / path).write_bytes(wheel.read_bytes())
    sha256 = listed_sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    index = WheelIndex(agent=[AgentWheel(version=NEW, file=wheel.name, path=path,
                                         size=wheel.stat().st_size, sha256=sha256)])
    (wheels / "index.json").write_bytes(encode_index(index))
    sign_file(wheels / "index.json", private_key)
    return f"http://127.0.0.1:{range_server.port}/files/wheels/{path}"


def upgrade_args(wheel: Path, url: str, **override: object) -> payloads.UpgradeArgs:
    fields = {"version": NEW, "url": url, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
              "size": wheel.stat().st_size, **override}
    return msgspec.convert(fields, payloads.UpgradeArgs)


def assert_untouched(releases: Releases, tmp_path: Path) -> None:
    assert releases.target(releases.current) == (tmp_path / "venv").resolve()
    assert releases.read_trial() is None and not (releases.root / "previous").exists()
    assert not (releases.root / NEW).exists()


def test_a_tampered_wheel_is_refused_and_nothing_changes(tmp_path: Path, range_server,
                                                         new_wheel: Path) -> None:
    releases = running_layout(tmp_path)
    calls = Calls()
    url = serve(range_server, new_wheel)
    with pytest.raises(EdgeAgentError) as caught:
        # Signatures off, so the bytes themselves are what is checked.
        upgrades_for(releases, calls, UNSIGNED).upgrade(
            upgrade_args(new_wheel, url, sha256="0" * 64))
    assert caught.value.code == "checksum_mismatch"
    assert_untouched(releases, tmp_path)
    assert calls.exits == []
    assert [e["event"] for e in calls.events] == ["agent_upgrade_refused"]
    assert calls.events[0]["error"]["code"] == "checksum_mismatch"
    assert list((releases.root / ".downloads").iterdir()) == []


def test_a_wheel_of_another_version_than_commanded_is_refused(tmp_path: Path, range_server,
                                                               new_wheel: Path) -> None:
    releases = running_layout(tmp_path)
    calls = Calls()
    args = upgrade_args(new_wheel, serve(range_server, new_wheel), version=f"{NEW}.dev1")
    with pytest.raises(EdgeAgentError) as caught:
        upgrades_for(releases, calls, UNSIGNED).upgrade(args)
    assert caught.value.code == "upgrade_failed" and NEW in caught.value.message
    assert calls.exits == [] and releases.target(releases.current) == (tmp_path / "venv").resolve()


def test_without_a_releases_directory_the_op_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(EdgeAgentError) as caught:
        upgrades_for(None, Calls()).upgrade(msgspec.convert(
            {"version": NEW, "url": "http://127.0.0.1:9/w.whl", "sha256": "a" * 64, "size": 1},
            payloads.UpgradeArgs))
    assert caught.value.code == "upgrade_failed" and "install.sh" in caught.value.message


def test_upgrade_installs_beside_the_current_venv_and_switches(tmp_path: Path, range_server,
                                                               new_wheel: Path) -> None:
    releases = running_layout(tmp_path)
    before = sorted(str(p) for p in (tmp_path / "venv").rglob("*"))
    calls = Calls()
    result = upgrades_for(releases, calls).upgrade(
        upgrade_args(new_wheel, serve(range_server, new_wheel)))
    assert result == {"changed": True, "version": NEW, "previous_version": __version__,
                      "restarting": True}
    assert calls.exits == [EXIT_RESTART_FOR_UPGRADE]
    assert [e["event"] for e in calls.events] == ["agent_upgrade_restarting"]
    assert releases.target(releases.current) == (releases.root / NEW).resolve()
    assert releases.target(releases.previous) == (tmp_path / "venv").resolve()
    trial = releases.read_trial()
    assert trial is not None and trial.version == NEW and trial.starts == 0 and trial.needs_model
    # What systemd will start: the new version's own console script, from the new venv.
    shown = subprocess.run([str(releases.current / "bin" / "edge-agent"), "--version"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.split() == ["edge-agent", NEW]
    # The venv it was copied from is as it was: the previous version still starts.
    assert sorted(str(p) for p in (tmp_path / "venv").rglob("*")) == before


def test_upgrade_to_the_running_version_changes_nothing(tmp_path: Path) -> None:
    releases = running_layout(tmp_path)
    calls = Calls()
    args = msgspec.convert({"version": __version__, "url": "http://127.0.0.1:9/w.whl",
                            "sha256": "a" * 64, "size": 1}, payloads.UpgradeArgs)
    assert upgrades_for(releases, calls).upgrade(args) == {"changed": False, "version": __version__}
    assert calls.exits == [] and calls.events == []


# -- the watch over a trial (what the new version runs) ---------------------------------------

def watched(tmp_path: Path, *, connected: bool, model_loaded: bool, deadline: float,
            needs_model: bool = True) -> tuple[Releases, Calls]:
    releases = layout(tmp_path, trial_version=__version__)
    releases.write_trial(Trial(version=__version__, previous_version="0.0.9", deadline=deadline,
                               starts=1, needs_model=needs_model))
    calls = Calls()
    upgrades = AgentUpgrades(
        UpgradeConfig(releases_dir=str(releases.root)), FetchConfig(), SIGNED,
        publish_event=lambda name, **f: calls.events.append({"event": name, **f}),
        request_exit=calls.exits.append, connected=lambda: connected,
        model_loaded=lambda: model_loaded)
    stop = threading.Event()
    thread = threading.Thread(target=upgrades.watch, args=(stop,), daemon=True)
    thread.start()
    thread.join(timeout=30)
    stop.set()
    assert not thread.is_alive()
    return releases, calls


def test_a_healthy_new_version_closes_its_trial_and_reports_it(tmp_path: Path) -> None:
    releases, calls = watched(tmp_path, connected=True, model_loaded=True,
                              deadline=time.time() + 600)
    assert releases.read_trial() is None and releases.read_outcome() is None  # reported
    assert calls.exits == []
    assert calls.events == [{"event": "agent_upgraded", "version": __version__,
                             "previous_version": "0.0.9", "reason": None, "running": __version__}]


def test_a_new_version_with_no_model_where_the_old_had_none_is_healthy(tmp_path: Path) -> None:
    releases, calls = watched(tmp_path, connected=True, model_loaded=False,
                              deadline=time.time() + 600, needs_model=False)
    assert releases.read_trial() is None and calls.exits == []
    assert calls.events[0]["event"] == "agent_upgraded"


def test_a_new_version_unhealthy_at_its_deadline_exits_for_the_guard(tmp_path: Path) -> None:
    releases, calls = watched(tmp_path, connected=True, model_loaded=False,
                              deadline=time.time() - 1)
    assert calls.exits == [EXIT_TRIAL_FAILED] and calls.events == []
    assert releases.read_trial() is not None  # the guard of the next start rolls it back
    assert guard(releases.root) == "rolled_back"


# -- signatures (a pinned controller key): the wheel must be one the signed index lists --------

@pytest.mark.parametrize("how", ["another key signed the index", "the index lists other bytes",
                                 "not from a wheelhouse"])
def test_with_signatures_required_a_wheel_the_signed_index_does_not_vouch_for_is_refused(
        tmp_path: Path, range_server, new_wheel: Path, how: str) -> None:
    releases = running_layout(tmp_path)
    calls = Calls()
    if how == "another key signed the index":
        url = serve(range_server, new_wheel, private_key=base64.b64encode(b"x" * 32).decode())
    elif how == "the index lists other bytes":
        url = serve(range_server, new_wheel, listed_sha256="0" * 64)
    else:
        serve(range_server, new_wheel)
        (range_server.root / new_wheel.name).write_bytes(new_wheel.read_bytes())
        url = f"http://127.0.0.1:{range_server.port}/{new_wheel.name}"
    with pytest.raises(EdgeAgentError) as caught:
        upgrades_for(releases, calls).upgrade(upgrade_args(new_wheel, url))
    assert caught.value.code == "bad_signature", caught.value.message
    assert_untouched(releases, tmp_path)
    assert calls.exits == [] and [e["event"] for e in calls.events] == ["agent_upgrade_refused"]
