"""The rollouts one controller knows, and which of them it drives.

Several controllers may share one registry: exactly one drives each rollout, the one holding
its lease (``Registry.take_lease``, renewed every ``lease_s / 4`` while the rollout runs, so a
dead holder's lease runs out after ``lease_s`` and another controller takes over), renewed in
the registry before each command it sends. A save that finds the lease taken (a rollback
forced by another controller) writes nothing, and this controller stops driving and shows the
registry's copy. Taking over reloads the rollout from the registry and has the driver resume
it; the rollouts it does not drive are reloaded every ``SYNC_S``.

No lock of its own: every method runs under the manager's lock. Leases read real time
(time.monotonic), never the manager's clock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.fleet.rollout._driver import RolloutDriver
from agent.fleet.rollout._state import ACTIVE, STILL_TO_DO, Rollout, rollout_of
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.fleet.controller import FleetController

log = get_logger(__name__)

SYNC_S = 1.0  # how often a controller reloads the rollouts it does not drive


class RolloutLeases:
    def __init__(
        self, controller: FleetController, *, lease_s: float, device_timeout_s: float
    ) -> None:
        self.controller = controller
        self.lease_s = lease_s
        self.owner = controller.config.controller_id
        # Every rollout in the registry: those this controller drives, as it drives them, and
        # copies of the others (for the API).
        self.rollouts: dict[str, Rollout] = {}
        # It drives the rollouts whose lease is held here, and forgets one whose lease is gone.
        self.driver = RolloutDriver(controller, device_timeout_s, self)
        self._held: dict[str, float] = {}  # rollout id -> when this controller last renewed
        self._synced = 0.0

    def restore(self) -> None:
        """Reload every rollout this controller does not drive from the registry: those other
        controllers drive or created, and (at start) all of them."""
        for row, stored_steps in self.controller.registry.rollout_rows():
            if row["id"] not in self._held:
                self.rollouts[row["id"]] = rollout_of(row, stored_steps)
        self._synced = time.monotonic()

    def restore_due(self) -> bool:
        return time.monotonic() - self._synced >= SYNC_S

    def hold(self, rollout: Rollout, now: float) -> Rollout | None:
        """The rollout to drive when this controller holds (or just took) its lease, else
        None."""
        renewed_at = time.monotonic()
        renewed = self._held.get(rollout.id)
        if renewed is not None and renewed_at - renewed < self.lease_s / 4:
            return rollout
        if not self.controller.registry.take_lease(rollout.id, self.owner, self.lease_s):
            if renewed is not None:
                log.warning("rollout_lease_lost", rollout=rollout.id, owner=self.owner)
                self._drop(rollout.id)
            return None
        self._held[rollout.id] = renewed_at
        if renewed is None:
            rollout = self._take_over(rollout.id, now) or rollout
        return rollout

    def renew_lease(self, rollout_id: str) -> bool:
        """Renew the lease in the registry now (before a command goes out): False, dropping
        nothing yet, when another controller holds it."""
        if not self.controller.registry.take_lease(rollout_id, self.owner, self.lease_s):
            return False
        self._held[rollout_id] = time.monotonic()
        return True

    def lease_lost(self, rollout_id: str) -> None:
        """Another controller drives the rollout (a save found its lease gone): stop, and
        show the registry's copy instead of this one's unsaved changes."""
        log.warning("rollout_lease_lost", rollout=rollout_id, owner=self.owner)
        self._drop(rollout_id)
        found = self.controller.registry.rollout_rows(rollout_id)
        if found:
            self.rollouts[rollout_id] = rollout_of(*found[0])

    def force(self, rollout_id: str, now: float) -> Rollout:
        """Take the lease from whoever holds it (a rollback asked of this controller)."""
        # Whoever drives it now stops at its next renewal; from here on this one does.
        self.controller.registry.take_lease(rollout_id, self.owner, self.lease_s, force=True)
        self._drop(rollout_id)
        rollout = self._take_over(rollout_id, now) or self.rollouts[rollout_id]
        self._held[rollout_id] = time.monotonic()
        return rollout

    def release(self, rollout_id: str) -> None:
        """Hand on the lease of a rollout that needs no driver any more, if held here."""
        if rollout_id in self._held:
            self._drop(rollout_id)
            self.controller.registry.release_lease(rollout_id, self.owner)

    def release_all(self) -> None:
        """A clean stop hands every rollout on at once instead of after lease_s."""
        for rollout_id in list(self._held):
            self.release(rollout_id)

    def busy_devices(self, except_rollout: str | None = None) -> set[str]:
        """Devices with a step still to do in an active rollout (other than one)."""
        return {
            step.device_id
            for rollout in self.rollouts.values()
            if rollout.id != except_rollout and rollout.state in ACTIVE
            for step in rollout.steps
            if step.state in STILL_TO_DO
        }

    def _drop(self, rollout_id: str) -> None:
        self._held.pop(rollout_id, None)
        self.driver.forget(rollout_id)

    def _take_over(self, rollout_id: str, now: float) -> Rollout | None:
        """Reload a rollout whose lease this controller just took, and have the driver settle
        the steps whose commands were answered meanwhile."""
        found = self.controller.registry.rollout_rows(rollout_id)
        if not found:
            return None
        rollout = rollout_of(*found[0])
        self.rollouts[rollout.id] = rollout
        log.info("rollout_lease_taken", rollout=rollout.id, owner=self.owner)
        if any(s.started_at for s in rollout.steps):
            rollout.record(now, "resume", f"controller {self.owner} drives the rollout")
        self.driver.resume(rollout, now)
        return rollout
