"""What a rollout does to one device, per kind: what to remember before it starts, the commands
that start it, whether it serves the new target, and the commands that put back what it ran.

Every kind goes through the same health gate (agent.fleet.rollout._gate): start commands
answered ok, then ``serving`` true, then the canary prompt answered, then ``soak_s``
without a state in ``fatal_states``, a fatal event or a worker restart. A kind only says
what those words mean for it: ``model`` (a manifest and a pin) and ``upgrade`` (the agent's
own version, agent/upgrade.py on the device).

``expectations`` may read the manifest (a file here or an http(s) URL): the manager calls it
once, from a thread, when the rollout is created. Everything else is pure.
"""

from __future__ import annotations

from typing import Any, Protocol

from agent.catalog.manifest import load_manifest
from agent.errors import EdgeAgentError, RequestError
from agent.fleet.registry import DeviceRecord
from agent.fleet.rollout._spec import RolloutSpec

Command = tuple[str, dict[str, Any]]
SERVING_STATES = ("ready", "busy")  # busy: it is answering a prompt, the canary included


class RolloutKind(Protocol):
    name: str
    # A status that fails a device once its start commands were answered ok.
    fatal_states: frozenset[str]
    # Events (by name) that fail a device from then on.
    fatal_events: frozenset[str]

    def expectations(self, spec: RolloutSpec, manifest_location: str) -> dict[str, Any]:
        """What a device serving the new target reports, resolved once (JSON-able)."""
        ...

    def previous_of(self, record: DeviceRecord) -> dict[str, Any]:
        """What the device runs now, to roll back to (JSON-able)."""
        ...

    def start_commands(self, spec: RolloutSpec, source: str) -> list[Command]: ...

    def rollback_commands(
        self, spec: RolloutSpec, previous: dict[str, Any]
    ) -> list[Command] | None:
        """None: nothing known to roll back to."""
        ...

    def serving(self, expect: dict[str, Any], record: DeviceRecord) -> tuple[bool, str]:
        """Whether the device serves the new target, and a sentence saying what it serves."""
        ...


class ModelKind:
    """Move a device to a manifest (and a pinned quant): set_manifest, then pin."""

    name = "model"
    fatal_states = frozenset({"degraded", "lost", "stopped"})
    fatal_events = frozenset({"worker_crashed", "restart_failed"})

    def expectations(self, spec: RolloutSpec, manifest_location: str) -> dict[str, Any]:
        try:
            manifest = load_manifest(manifest_location)
        except EdgeAgentError as exc:
            raise RequestError(f"manifest: {exc.message}", field="manifest") from None
        variants = [v for m in manifest.models for v in m.variants]
        if spec.pin is not None:
            variants = [v for v in variants if v.quant == spec.pin]
            if not variants:
                raise RequestError(f"pin: the manifest has no {spec.pin!r} variant", field="pin")
        # A split variant's Selection.sha256 is its first part's, as is the manifest's.
        return {"sha256": sorted({v.sha256 for v in variants})}

    def previous_of(self, record: DeviceRecord) -> dict[str, Any]:
        meta = record.meta
        selection = meta.get("selection") or {}
        return {
            "source": meta.get("manifest") or selection.get("manifest_url"),
            "pin": meta.get("pin"),
            "quant": selection.get("quant"),
        }

    def start_commands(self, spec: RolloutSpec, source: str) -> list[Command]:
        commands: list[Command] = [("set_manifest", {"source": source})]
        if spec.pin is not None:
            commands.append(("pin", {"quant": spec.pin}))
        return commands

    def rollback_commands(
        self, spec: RolloutSpec, previous: dict[str, Any]
    ) -> list[Command] | None:
        if not previous.get("source"):
            return None
        commands: list[Command] = [("set_manifest", {"source": previous["source"]})]
        if spec.pin is not None:  # the rollout changed the pin: put the old one (or none) back
            commands.append(("pin", {"quant": previous.get("pin")}))
        return commands

    def serving(self, expect: dict[str, Any], record: DeviceRecord) -> tuple[bool, str]:
        selection = record.meta.get("selection") or {}
        quant, sha256 = selection.get("quant"), selection.get("sha256")
        what = f"{quant or 'no model'} ({(sha256 or 'no sha256')[:12]})"
        if record.state not in SERVING_STATES:
            return False, f"reports {record.state or 'nothing'}, serving {what}"
        if sha256 not in expect.get("sha256", ()):
            return False, f"reports {record.state} with {what}, not the rollout's model"
        return True, f"reports {record.state} with the rollout's model {what}"


class UpgradeKind:
    """Move a device's agent to another edge-agent version: the ``upgrade`` op with a wheel the
    controller hosts. A version that does not come up is put back by the device itself (its
    unit's guard); the rollout sees ``agent_rolled_back`` and fails the device. A device that
    fails later (canary, soak, an abort) is upgraded back to the version it ran, when that
    version's wheel is hosted."""

    name = "upgrade"
    # Not stopped or lost: the restart into the new version passes through them.
    fatal_states = frozenset({"degraded"})
    fatal_events = frozenset({"agent_rolled_back", "worker_crashed", "restart_failed"})

    def expectations(self, spec: RolloutSpec, manifest_location: str) -> dict[str, Any]:
        return {"version": spec.version}

    def previous_of(self, record: DeviceRecord) -> dict[str, Any]:
        return {"version": record.agent_version}

    def start_commands(self, spec: RolloutSpec, source: str) -> list[Command]:
        assert spec.version is not None  # checked at creation (_spec.check)
        return [("upgrade", self._args(spec, spec.version))]

    def rollback_commands(
        self, spec: RolloutSpec, previous: dict[str, Any]
    ) -> list[Command] | None:
        version = previous.get("version")
        if not isinstance(version, str) or version not in spec.wheels:
            return None
        return [("upgrade", self._args(spec, version))]

    def serving(self, expect: dict[str, Any], record: DeviceRecord) -> tuple[bool, str]:
        what = f"agent {record.agent_version or 'of unknown version'}"
        if record.state not in SERVING_STATES:
            return False, f"reports {record.state or 'nothing'}, {what}"
        if record.agent_version != expect.get("version"):
            return False, f"reports {record.state} with {what}, not the rollout's version"
        return True, f"reports {record.state} with the rollout's {what}"

    @staticmethod
    def _args(spec: RolloutSpec, version: str) -> dict[str, Any]:
        wheel = spec.wheels[version]
        return {"version": version, "url": wheel.url, "sha256": wheel.sha256, "size": wheel.size}


KINDS: dict[str, RolloutKind] = {"model": ModelKind(), "upgrade": UpgradeKind()}
