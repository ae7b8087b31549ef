"""The Linux capabilities this process holds, from CapEff in /proc/self/status.

Tests that mount a tmpfs or boot a container check for the capabilities they use, not for
uid 0: root in an unprivileged container has uid 0 and no CAP_SYS_ADMIN, so a uid check
lets such a test run into a confusing failure, or skips it where it could run.
"""

from __future__ import annotations

from pathlib import Path

# Bit numbers from linux/capability.h.
CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_SETGID": 6, "CAP_SETUID": 7,
    "CAP_NET_ADMIN": 12, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
}


def parse_effective(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1], 16)
    return 0


def missing(*names: str) -> list[str]:
    """Those of ``names`` this process lacks (all of them where /proc cannot say)."""
    try:
        held = parse_effective(Path("/proc/self/status").read_text())
    except OSError:
        held = 0
    return [name for name in names if not held >> CAPABILITIES[name] & 1]


def missing_reason(purpose: str, *names: str) -> str | None:
    """A skip reason naming what is missing, or None when ``purpose`` can be done here."""
    lacking = missing(*names)
    if not lacking:
        return None
    return f"{purpose} needs {', '.join(lacking)} (an unprivileged container has none)"
