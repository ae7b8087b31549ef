"""Which devices a rollout targets: explicit ids, a glob on ids, a pool, an inventory filter
(agent.fleet.inventory), or any union of these. Pure over the registry's device records.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from agent.errors import RequestError
from agent.fleet.inventory import InventoryFilter, facts_of, parse_filter
from agent.fleet.registry import DeviceRecord
from agent.fleet.rollout._spec import RolloutSpec


class Target:
    """A spec's target, its filter parsed once."""

    def __init__(self, spec: RolloutSpec) -> None:
        self.spec = spec
        self.named = frozenset(spec.devices)  # matches() runs per device, per SYNC_S
        self.filter: InventoryFilter | None = (
            parse_filter(spec.filter) if spec.filter is not None else None
        )

    @property
    def dynamic(self) -> bool:
        """Whether devices may join while it runs: a group, pool or filter, not ``pinned``."""
        spec = self.spec
        return not spec.pinned and (spec.group, spec.pool, spec.filter) != (None, None, None)

    def matches(self, record: DeviceRecord) -> bool:
        spec = self.spec
        if record.id in self.named:
            return True
        if spec.group is not None and fnmatch.fnmatchcase(record.id, spec.group):
            return True
        if spec.pool is not None and record.meta.get("pool") == spec.pool:
            return True
        return self.filter is not None and self.filter.matches(facts_of(record))

    def chosen(self, records: Iterable[DeviceRecord]) -> list[DeviceRecord]:
        """The matching records: explicit ids in their order first, then the rest by id.
        Refuses unknown explicit ids and an empty target."""
        by_id = {record.id: record for record in records}
        unknown = [d for d in self.spec.devices if d not in by_id]
        if unknown:
            raise RequestError(
                f"devices: unknown device(s) {', '.join(unknown[:5])}", field="devices"
            )
        chosen = [by_id[d] for d in dict.fromkeys(self.spec.devices)]
        chosen += [
            by_id[i] for i in sorted(by_id) if i not in self.named and self.matches(by_id[i])
        ]
        if not chosen:
            raise RequestError(
                "target: no device matches devices/group/pool/filter", field="devices"
            )
        return chosen
