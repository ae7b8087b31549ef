"""macOS ``sysctl``: the one source for Apple CPU, memory and GPU facts.

``read_sysctl`` runs the tool (live root on macOS only) or reads a fake root's captured
``.captured/sysctl.txt``; ``parse_sysctl`` is pure. Linux has a sysctl with other
names, so this never runs it there.
"""

from __future__ import annotations

import platform
import shutil
import subprocess

from agent.hardware.sysfs import is_live, read_text

TOOL_TIMEOUT_S = 5.0
SYSCTL_NAMES = (
    "machdep.cpu.brand_string", "hw.model", "hw.memsize", "hw.physicalcpu", "hw.logicalcpu",
    "hw.nperflevels", "hw.perflevel0.name", "hw.perflevel0.logicalcpu",
    "hw.perflevel1.name", "hw.perflevel1.logicalcpu", "hw.optional.arm64",
    "hw.optional.neon", "hw.optional.arm.AdvSIMD", "hw.optional.arm.FEAT_FP16",
    "hw.optional.arm.FEAT_DotProd", "hw.optional.arm.FEAT_I8MM", "hw.optional.arm.FEAT_BF16",
    "hw.optional.arm.FEAT_SME", "hw.optional.avx1_0", "hw.optional.avx2_0",
    "hw.optional.fma", "hw.optional.f16c", "hw.optional.avx512f",
)  # fmt: skip


def read_sysctl(root: str = "/") -> str | None:
    """ "name: value" lines for SYSCTL_NAMES, or None off macOS."""
    if not is_live(root):
        return read_text(root, "/.captured/sysctl.txt")
    if platform.system() != "Darwin" or shutil.which("sysctl") is None:
        return None
    try:
        # A name this macOS lacks makes sysctl exit non-zero after printing the rest,
        # so stdout is used whatever the exit status.
        done = subprocess.run(
            ["sysctl", *SYSCTL_NAMES],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout or None


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl name …`` output ("name: value" lines) → dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values
