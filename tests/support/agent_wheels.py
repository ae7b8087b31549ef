"""Real edge-agent wheels at another version, built from a copy of this checkout with pip.

``fail_at_start`` builds one whose ``edge-agent run`` exits at once (what a broken release
looks like to systemd), while ``--version`` still works, so it installs like any other.
The build backend (setuptools, wheel) comes from ``find_links`` with no index: offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAIL_AT_START = '    raise SystemExit("edge-agent: a test build made to fail at start")\n'


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected one {old!r}; the test build needs updating"
    path.write_text(text.replace(old, new))


def _set_line(path: Path, prefix: str, line: str) -> None:
    lines = path.read_text().splitlines()
    found = [i for i, text in enumerate(lines) if text.startswith(prefix)]
    assert len(found) == 1, f"{path}: expected one line starting {prefix!r}"
    lines[found[0]] = line
    path.write_text("\n".join(lines) + "\n")


def build_agent_wheel(out_dir: Path, version: str, *, find_links: Path,
                      fail_at_start: bool = False) -> Path:
    """``edge_agent-<version>-py3-none-any.whl`` in ``out_dir``."""
    source = out_dir / f"source-{version}"
    source.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for tree in ("agent", "profiles"):
        shutil.copytree(REPO / tree, source / tree, ignore=ignore)
    _set_line(source / "pyproject.toml", "version = ", f'version = "{version}"')
    _set_line(source / "agent" / "__init__.py", "__version__ = ", f'__version__ = "{version}"')
    if fail_at_start:
        _rewrite(source / "agent" / "commands" / "run.py",
                 "def run(args: argparse.Namespace) -> int:\n",
                 "def run(args: argparse.Namespace) -> int:\n" + FAIL_AT_START)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
         "--find-links", str(find_links), "--wheel-dir", str(out_dir), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = out_dir / f"edge_agent-{version}-py3-none-any.whl"
    assert wheel.exists(), sorted(p.name for p in out_dir.iterdir())
    return wheel
