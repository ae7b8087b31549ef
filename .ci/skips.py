"""Print every skip of a .ci/run pass with its reason; exit 1 when one is not expected.

Usage: python3 .ci/skips.py EXPECTED LOG[:LABEL]...  (LOG: JSON lines from tests/conftest.py)
Standard library only: it runs with the system python3, outside the venv.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path


def expected_skips(path: Path) -> list[tuple[str, str, str]]:
    rules = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split(" | ")]
        if len(fields) != 3 or not all(fields):
            raise SystemExit(f"{path}:{number}: want '<node id glob> | <reason glob> | <why>'")
        rules.append((fields[0], fields[1], fields[2]))
    return rules


def main(argv: list[str]) -> int:
    rules = expected_skips(Path(argv[0]))
    unexpected = 0
    for spec in argv[1:]:
        log, _, label = spec.partition(":")
        skips = []
        if Path(log).exists():
            skips = [json.loads(line) for line in Path(log).read_text().splitlines() if line]
        print(f"ci: {label or log}: {len(skips)} skipped")
        for skip in skips:
            why = next((why for node, reason, why in rules
                        if fnmatch.fnmatchcase(skip["nodeid"], node)
                        and fnmatch.fnmatchcase(skip["reason"], reason)), None)
            verdict = f"expected ({why})" if why else "UNEXPECTED"
            unexpected += why is None
            print(f"ci:   {skip['nodeid']}: {skip['reason']}  [{verdict}]")
    if unexpected:
        print(f"ci: {unexpected} unexpected skip(s): install what they need or list them, "
              "with a reason, in .ci/expected-skips")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
