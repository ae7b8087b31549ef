"""Issue 12's size rule, kept true: no class in agent/ over about 250 lines, no function over
about 60. A part that outgrows it is doing two jobs; split it by responsibility."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def _oversized(root: Path = AGENT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                             f"is {lines} lines (at most {limit})")
    return found


def test_no_class_or_function_in_agent_is_over_the_size_rule():
    assert _oversized() == []


def test_the_rule_sees_an_oversized_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "big.py").write_text(f"def big():\n{body}\n\n\ndef small():\n    pass\n")
    assert [line.split()[1] for line in _oversized(tmp_path / "agent")] == ["big"]
